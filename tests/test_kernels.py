"""Every kernel path of launch_conv2d against float64 ATen, on CPU through Triton's interpreter.

Each case is tiny (the interpreter runs every program instance in numpy).
"""
from __future__ import annotations

import random
import weakref

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import conv_backend.kernels.common as common_mod
import conv_backend.kernels.depthwise as depthwise_mod
import conv_backend.kernels.implicit_gemm as igemm_mod
import conv_backend.kernels.seed as seed_mod
from conv_backend import tuning
from conv_backend.dispatch import launch_conv2d
from conv_backend.kernels.implicit_gemm import implicit_gemm_conv2d
from conv_backend.layout import empty_output

from _util import Case, draw_case, format_flags, reference, rel_err, tolerance

pytestmark = pytest.mark.interpreter

PATHS = ("seed", "gemm_pointer", "gemm_tma", "gemm_nchw", "depthwise", "auto")
KERNEL_MODULES = {"seed": seed_mod, "gemm_pointer": igemm_mod, "gemm_tma": igemm_mod, "gemm_nchw": igemm_mod,
                  "depthwise": depthwise_mod}
# The Triton function each forced path must launch.
KERNEL_FUNCTIONS = {"seed": "seed_conv2d_kernel", "gemm_pointer": "igemm_pointer_kernel",
                    "gemm_tma": "igemm_tma_kernel", "gemm_nchw": "igemm_nchw_kernel", "depthwise": "depthwise_kernel"}
# The kernel the tuner records for a path (tuning.chosen_kernels, what the report prints).
TUNER_NAMES = {"gemm_pointer": "igemm_pointer[", "gemm_tma": "igemm_tma[", "gemm_nchw": "igemm_nchw[",
               "depthwise": "depthwise["}


def check(case: Case, algorithm: str, precision: str = "ieee", launches=None):
    x, w, b = case.tensors()
    stride, padding, dilation, groups = case.args()
    y = launch_conv2d(x, w, b, stride, padding, dilation, groups, precision, algorithm)
    eager = F.conv2d(x, w, b, stride, padding, dilation, groups)
    ref = reference(x, w, b, stride, padding, dilation, groups)
    assert y.shape == eager.shape == (case.n, case.oc, *case.out_hw())
    assert y.dtype == x.dtype
    assert y.device == x.device
    err = rel_err(y, ref)
    assert err <= tolerance(x.dtype, precision), f"{algorithm} {case}: relative error {err:.3g}"
    assert format_flags(y) == format_flags(eager), (
        f"{algorithm} {case}: output strides {y.stride()} vs eager {eager.stride()}")
    if launches is not None:
        assert len(launches) == 1, f"expected one Triton launch, got {launches.names}"
        if algorithm in KERNEL_FUNCTIONS:
            assert launches.names == [KERNEL_FUNCTIONS[algorithm]]
    if algorithm in TUNER_NAMES:
        chosen = tuning.chosen_kernels(x.shape, w.shape, stride, padding, dilation, groups, x.dtype)
        assert any(k.startswith(TUNER_NAMES[algorithm]) for k in chosen), chosen
    return y


# ---------------------------------------------------------------- randomized shapes, every path

RANDOM_SEEDS = list(range(8))


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
@pytest.mark.parametrize("algorithm", PATHS)
def test_random_fp32(algorithm, seed, kernel_launches):
    case = draw_case(random.Random(1000 * PATHS.index(algorithm) + seed), algorithm)
    check(case, algorithm, "ieee", kernel_launches)


# ---------------------------------------------------------------- named edge cases

EDGE_CASES = {
    "batch1_odd_sizes": Case(1, 3, 5, 7, 11, (3, 3), padding=(1, 1)),
    "kernel_larger_than_input": Case(2, 4, 6, 3, 4, (5, 7), padding=(2, 3)),
    "kernel_larger_dilated": Case(1, 4, 4, 2, 3, (3, 3), padding=(2, 3), dilation=(2, 3)),
    "seed_problem_miniature": Case(2, 4, 8, 12, 20, (5, 9), padding=(2, 4), dilation=(2, 3), bias=False),
    "one_by_one": Case(2, 8, 12, 5, 6, (1, 1)),
    "stride3_pad_asym": Case(2, 4, 8, 11, 9, (3, 2), stride=(3, 2), padding=(2, 1)),
    "single_output_pixel": Case(1, 4, 8, 5, 5, (5, 5)),
    "channels_last_in_and_weight": Case(2, 8, 12, 7, 6, (3, 3), padding=(1, 1), x_layout="channels_last",
                                        w_layout="channels_last"),
    "sliced_input": Case(2, 4, 8, 7, 9, (3, 3), padding=(1, 0), x_layout="sliced"),
    "transposed_view_input": Case(1, 4, 8, 6, 9, (3, 2), x_layout="transposed_hw", w_layout="transposed"),
    "channels_last_sliced": Case(2, 8, 8, 6, 7, (3, 3), padding=(1, 1), x_layout="channels_last_sliced"),
}


def adapt(case: Case, algorithm: str) -> Case | None:
    """The same problem in a form `algorithm` takes, or None when it cannot."""
    import dataclasses
    if algorithm == "gemm_tma":
        if case.stride != (1, 1):
            return None
        c = 4 * -(-case.c // 4)  # 16-byte channel rows in fp32
        return dataclasses.replace(case, c=c)
    if algorithm == "depthwise":
        return dataclasses.replace(case, groups=case.c, oc=case.c * 2)
    return case


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
@pytest.mark.parametrize("algorithm", PATHS)
def test_edge_cases(algorithm, name, kernel_launches):
    case = adapt(EDGE_CASES[name], algorithm)
    if case is None:
        pytest.skip(f"{algorithm} cannot take {name} (covered by the fallback tests)")
    check(case, algorithm, "ieee", kernel_launches)


GROUPED_CASES = [
    ("gemm_pointer", Case(2, 6, 9, 7, 8, (3, 3), padding=(1, 1), groups=3)),
    ("gemm_pointer", Case(1, 8, 4, 6, 7, (3, 1), stride=(2, 1), dilation=(1, 2), groups=4, x_layout="channels_last",
                          w_layout="channels_last")),
    ("gemm_pointer", Case(2, 4, 8, 6, 6, (3, 3), padding=(1, 1), groups=4, bias=False)),  # depthwise through GEMM
    ("gemm_tma", Case(1, 32, 24, 6, 7, (3, 3), padding=(1, 1), groups=2)),
    ("gemm_tma", Case(2, 32, 20, 5, 6, (2, 3), padding=(1, 1), dilation=(2, 1), groups=2, x_layout="channels_last")),
    ("auto", Case(2, 6, 6, 7, 5, (3, 3), padding=(1, 1), groups=2, x_layout="sliced")),
    ("depthwise", Case(2, 5, 15, 7, 9, (3, 3), stride=(2, 1), padding=(1, 1), groups=5)),  # multiplier 3
    ("depthwise", Case(1, 6, 12, 9, 8, (5, 3), stride=(1, 2), padding=(2, 1), dilation=(1, 2), groups=6,
                       x_layout="channels_last", w_layout="channels_last")),
    ("depthwise", Case(2, 3, 3, 6, 6, (3, 3), padding=(1, 1), groups=3, x_layout="transposed_hw", bias=False)),
    ("auto", Case(1, 4, 8, 6, 6, (3, 3), padding=(1, 1), groups=4, x_layout="channels_last")),  # auto -> depthwise
    # Channels spanning several BLOCK_K chunks, the last one partial.
    ("gemm_pointer", Case(1, 37, 9, 5, 6, (3, 3), padding=(1, 1))),
    ("gemm_pointer", Case(1, 40, 12, 5, 4, (3, 2), stride=(2, 1), padding=(1, 1), groups=2, x_layout="channels_last")),
    ("gemm_tma", Case(1, 20, 9, 5, 6, (3, 3), padding=(1, 1))),
    ("gemm_tma", Case(2, 36, 17, 4, 5, (2, 3), padding=(1, 1), x_layout="channels_last", w_layout="channels_last")),
    ("gemm_tma", Case(1, 64, 20, 4, 5, (3, 3), padding=(1, 1), groups=2)),
    ("seed", Case(1, 37, 9, 5, 6, (3, 3), padding=(1, 1))),
    # Strided TMA boxes ([N, H/sh, sh, W/sw, sw*C]): each stride phase, padding on both sides, dilation,
    # groups, and channel counts that are not a multiple of the box row (which would read the next pixel's).
    ("gemm_tma", Case(2, 8, 12, 8, 10, (3, 3), stride=(2, 2), padding=(1, 1))),
    ("gemm_tma", Case(1, 24, 9, 6, 8, (3, 2), stride=(1, 2), padding=(2, 1), x_layout="channels_last")),
    ("gemm_tma", Case(1, 8, 8, 9, 6, (2, 3), stride=(3, 2), padding=(1, 2), dilation=(2, 2), bias=False)),
    ("gemm_tma", Case(2, 32, 20, 6, 8, (3, 3), stride=(2, 2), padding=(1, 1), groups=2, x_layout="channels_last")),
    ("gemm_tma", Case(1, 8, 6, 8, 8, (1, 1), stride=(2, 2))),
    # Padding far wider than the kernel: whole tiles and TMA boxes lie in the padding.
    ("gemm_tma", Case(1, 8, 8, 4, 5, (1, 1), padding=(6, 9))),
    ("gemm_pointer", Case(1, 8, 8, 4, 5, (1, 1), padding=(6, 9))),
    ("gemm_nchw", Case(1, 8, 8, 4, 5, (1, 1), padding=(6, 9))),
    # The NCHW kernel: groups, channels over several chunks, 1x1 on dense planes (its flat-pixel variant).
    ("gemm_nchw", Case(2, 6, 9, 7, 8, (3, 3), padding=(1, 1), groups=3)),
    ("gemm_nchw", Case(1, 37, 9, 5, 6, (3, 3), padding=(1, 1))),
    ("gemm_nchw", Case(2, 40, 24, 6, 11, (1, 1))),
    ("gemm_nchw", Case(2, 16, 24, 6, 11, (1, 1), groups=2, bias=False)),
    ("depthwise", Case(1, 8, 8, 4, 5, (3, 3), padding=(7, 9), groups=8)),
    ("seed", Case(1, 8, 8, 4, 5, (1, 1), padding=(6, 9))),
]


@pytest.mark.parametrize("algorithm,case", GROUPED_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(GROUPED_CASES)])
def test_grouped_wide_and_padded(algorithm, case, kernel_launches):
    check(case, algorithm, "ieee", kernel_launches)


# ---------------------------------------------------------------- TMA tiles spanning several images

MULTI_IMAGE_TMA = tuning.Candidate.make("igemm_tma", BLOCK_B=2, BLOCK_H=2, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16)


@pytest.mark.parametrize("case", [
    Case(3, 8, 12, 3, 5, (3, 3), padding=(1, 1), x_layout="channels_last"),  # odd batch: the last tile's 2nd image
    Case(2, 20, 9, 2, 7, (3, 3), padding=(1, 1)),  # channels over two chunks, the last partial
    Case(3, 32, 24, 2, 6, (2, 3), padding=(1, 1), dilation=(1, 2), groups=2, bias=False),
], ids=["odd_batch", "partial_chunk", "grouped_dilated"])
def test_tma_tiles_of_several_images(case, monkeypatch, kernel_launches):
    """Boxes of BLOCK_B images (small maps): each image's pixels land in its own output, none past the batch."""
    monkeypatch.setattr(igemm_mod, "tma_candidates", lambda *a, **k: [MULTI_IMAGE_TMA])
    x, w, b = case.tensors()
    y = launch_conv2d(x, w, b, *case.args(), "ieee", "gemm_tma")
    assert kernel_launches.names == ["igemm_tma_kernel"]
    assert rel_err(y, reference(x, w, b, *case.args())) <= 1e-5


def test_tma_candidates_fit_small_maps(monkeypatch):
    """A map smaller than a tile's box gets a smaller box and several images per tile, at the same pixel count."""
    monkeypatch.setattr(igemm_mod, "interpreter_enabled", lambda: False)
    cands = igemm_mod.tma_candidates(256, 256, 7, 7, 32, 1, torch.bfloat16)
    assert cands
    for cand in cands:
        p = cand.params
        assert p["BLOCK_H"] <= 8 and p["BLOCK_W"] == 8, cand.describe()
        assert p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"] in (64, 128, 256), cand.describe()
    assert any(c.params["BLOCK_B"] > 1 for c in cands)


ROW_STACK_TMA = tuning.Candidate.make("igemm_tma", BLOCK_B=4, BLOCK_H=1, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16)


@pytest.mark.parametrize("case", [
    Case(6, 16, 12, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"),  # 6 images: the last stack half full
    Case(3, 16, 8, 10, 12, (3, 3), stride=(2, 2), padding=(1, 1)),  # 5x6 output rows of stride-2 boxes
    Case(4, 32, 20, 5, 6, (3, 3), padding=(2, 1), dilation=(2, 1), groups=2, dtype=torch.bfloat16, bias=False),
], ids=["7x7_partial_stack", "strided", "grouped_dilated_bf16"])
def test_tma_row_stacks(case, monkeypatch, kernel_launches):
    """Tiles of one output row of BLOCK_B images: rows past the map's top and bottom edges, and columns past
    its sides, are the copy engine's zero fill; images past the batch are not stored."""
    monkeypatch.setattr(igemm_mod, "tma_candidates", lambda *a, **k: [ROW_STACK_TMA])
    meta = check_twice(case, "gemm_tma", "igemm_tma_kernel", kernel_launches)
    assert (meta["BLOCK_B"], meta["BLOCK_H"]) == (4, 1)


@pytest.mark.parametrize("out_hw,offered", [((7, 7), True), ((14, 14), True), ((28, 28), True), ((56, 56), False),
                                            ((8, 200), False)])
def test_tma_row_stacks_offered_where_boxes_run_past_the_map(out_hw, offered, monkeypatch):
    monkeypatch.setattr(igemm_mod, "interpreter_enabled", lambda: False)
    cands = igemm_mod.tma_candidates(256, 256, *out_hw, 32, 1, torch.bfloat16)
    stacks = [c.params for c in cands if c.params["BLOCK_H"] == 1 and c.params["BLOCK_B"] > 1]
    assert bool(stacks) == offered
    for p in stacks:  # one row per image, the map's width rounded up to a power of two
        assert p["BLOCK_W"] == max(8, 1 << (out_hw[1] - 1).bit_length()), p


# ---------------------------------------------------------------- half precision and TF32 policy

DTYPE_CASES = {
    "seed": Case(2, 5, 7, 7, 8, (3, 3), padding=(1, 1), dilation=(1, 2)),
    "gemm_pointer": Case(2, 6, 10, 7, 6, (3, 3), stride=(2, 1), padding=(1, 1), groups=2),
    "gemm_tma": Case(1, 8, 12, 6, 7, (3, 3), padding=(1, 1), x_layout="channels_last"),
    "gemm_nchw": Case(2, 6, 10, 7, 6, (1, 1), groups=2),
    "depthwise": Case(2, 4, 8, 7, 7, (3, 3), padding=(1, 1), groups=4),
    "auto": Case(1, 16, 8, 6, 5, (3, 3), padding=(1, 1)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("algorithm", PATHS)
def test_half_precision(algorithm, dtype, kernel_launches):
    import dataclasses
    case = dataclasses.replace(DTYPE_CASES[algorithm], dtype=dtype)
    y = check(case, algorithm, "ieee", kernel_launches)
    assert y.dtype == dtype


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("algorithm", ["seed", "gemm_pointer", "gemm_tma", "gemm_nchw"])
def test_tf32_policy_runs(algorithm, precision, kernel_launches):
    # The interpreter computes TF32 dots exactly; on a GPU these are the 2e-3 and 1e-5 bounds.
    check(DTYPE_CASES["gemm_tma"], algorithm, precision, kernel_launches)
    assert kernel_launches[0][1]["INPUT_PRECISION"] == precision


@pytest.mark.parametrize("allowed", [False, True])
def test_auto_precision_is_exact_on_cpu(allowed, monkeypatch, kernel_launches):
    """'auto' does what eager does on the tensors' device: exact fp32 on the CPU, whatever cuDNN allows."""
    import conv_backend.runtime as runtime
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: allowed)
    check(DTYPE_CASES["gemm_pointer"], "gemm_pointer", "auto", kernel_launches)
    assert kernel_launches[0][1]["INPUT_PRECISION"] == "ieee"


# ---------------------------------------------------------------- which kernel "auto" picks

@pytest.mark.parametrize("case,expected", [
    (Case(1, 8, 8, 6, 6, (3, 3), padding=(1, 1)), "igemm_tma["),  # stride 1, 32-byte channel rows
    (Case(1, 8, 8, 8, 6, (3, 3), stride=(2, 2), padding=(1, 1)), "igemm_tma["),  # stride 2 dividing H and W
    (Case(1, 8, 8, 7, 7, (3, 3), stride=(2, 2)), "igemm_pointer["),  # stride 2 not dividing H: no box loads
    (Case(1, 3, 8, 6, 6, (3, 3)), "igemm_pointer["),  # 12-byte channel rows
    (Case(1, 4, 8, 6, 6, (3, 3), groups=4), "depthwise["),
], ids=["tma", "tma-stride2", "stride2-odd", "misaligned", "depthwise"])
def test_auto_picks_kernel(case, expected):
    x, w, b = case.tensors()
    y = launch_conv2d(x, w, b, *case.args(), "ieee", "auto")
    assert rel_err(y, reference(x, w, b, *case.args())) <= 1e-5
    groups = case.c if expected == "depthwise[" else case.groups
    chosen = tuning.chosen_kernels(x.shape, w.shape, case.stride, case.padding, case.dilation, groups, x.dtype)
    assert len(chosen) == 1 and chosen[0].startswith(expected), chosen


# ---------------------------------------------------------------- every output element is written

POISON_CASES = {
    "seed": Case(2, 3, 19, 7, 9, (3, 2), stride=(2, 1), padding=(1, 0), x_layout="channels_last"),
    "gemm_pointer": Case(2, 6, 21, 9, 7, (3, 3), stride=(1, 2), padding=(1, 1), groups=3),
    "gemm_tma": Case(1, 8, 19, 9, 11, (3, 3), padding=(1, 1), x_layout="channels_last"),
    "gemm_nchw": Case(2, 6, 21, 9, 7, (3, 3), stride=(1, 2), padding=(1, 1), groups=3),
    "depthwise": Case(2, 5, 10, 9, 10, (3, 3), stride=(2, 1), padding=(1, 1), groups=5, x_layout="channels_last"),
}


@pytest.mark.parametrize("output_format", ["eager", "contiguous", "channels_last"])
@pytest.mark.parametrize("algorithm", sorted(POISON_CASES))
def test_every_output_element_written(algorithm, output_format, monkeypatch, kernel_launches):
    case = POISON_CASES[algorithm]
    x, w, b = case.tensors()
    ref = reference(x, w, b, *case.args())
    module = KERNEL_MODULES[algorithm]
    made = []

    def nan_output(*args, **kwargs):  # the kernels' output allocator
        y = empty_output(*args, **kwargs).fill_(float("nan"))
        made.append(y)
        return y

    monkeypatch.setattr(module, "empty_output", nan_output)
    real_strided = torch.empty_strided

    def nan_strided(*args, **kwargs):  # launch plans allocate outputs with empty_strided
        t = real_strided(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
            made.append(t)
        return t

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty_strided", nan_strided)
        y = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm, output_format)
    assert kernel_launches.names and set(kernel_launches.names) == {KERNEL_FUNCTIONS[algorithm]}
    if output_format != "eager":
        fmt = torch.channels_last if output_format == "channels_last" else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt), y.stride()
    assert any(y.data_ptr() == t.data_ptr() for t in made), "the output was not one of the poisoned buffers"
    assert not torch.isnan(y).any(), f"{int(torch.isnan(y).sum())} output elements never written"
    assert rel_err(y, ref) <= 1e-5


# ---------------------------------------------------------------- pinned output formats (the graph pass's layout choice)

@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("output_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("algorithm", PATHS)
def test_pinned_output_format(algorithm, output_format, x_layout, kernel_launches):
    import dataclasses
    case = dataclasses.replace(adapt(EDGE_CASES["batch1_odd_sizes"], algorithm), x_layout=x_layout)
    x, w, b = case.tensors()
    y = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm, output_format)
    fmt = torch.channels_last if output_format == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), y.stride()
    assert len(kernel_launches) == 1
    assert rel_err(y, reference(x, w, b, *case.args())) <= 1e-5


@pytest.mark.parametrize("output_format", ["contiguous", "channels_last"])
def test_pinned_output_format_on_aten_fallback(output_format, kernel_launches):
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 2, 3, 3)  # groups=2: the seed kernel cannot take it
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 2, "ieee", "seed", output_format)
    assert not kernel_launches
    fmt = torch.channels_last if output_format == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), y.stride()
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1, 2))


# ---------------------------------------------------------------- the seed's direct kernel as a GEMM-plan candidate

SEED_DIRECT = tuning.Candidate.make("seed_direct", num_warps=4, num_stages=2, BLOCK_OC=16, BLOCK_HW=32, BLOCK_K=16)


@pytest.fixture
def only_seed_direct(monkeypatch):
    """The GPU tuner may pick the direct kernel for few-channel convs; under the interpreter it is never offered."""
    if not hasattr(igemm_mod, "seed_candidates"):
        pytest.skip("no direct-kernel candidates in this version")
    monkeypatch.setattr(igemm_mod, "tma_candidates", lambda *a, **k: [])
    monkeypatch.setattr(igemm_mod, "pointer_candidates", lambda *a, **k: [])
    monkeypatch.setattr(igemm_mod, "gather_candidates", lambda *a, **k: [])
    monkeypatch.setattr(igemm_mod, "nchw_candidates", lambda *a, **k: [])
    monkeypatch.setattr(igemm_mod, "seed_candidates", lambda *a, **k: [SEED_DIRECT])


SEED_DIRECT_CASES = [
    Case(2, 3, 20, 13, 11, (7, 7), stride=(2, 2), padding=(3, 3)),  # a ResNet stem, small
    Case(1, 3, 8, 9, 12, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1), x_layout="channels_last",
         w_layout="channels_last"),
    Case(2, 4, 17, 8, 9, (3, 3), padding=(1, 1), bias=False, x_layout="sliced", w_layout="transposed"),
    Case(1, 2, 6, 4, 5, (5, 5), padding=(2, 2), dtype=torch.float16),
    Case(1, 8, 12, 7, 6, (3, 3), stride=(2, 1), padding=(1, 1), dtype=torch.bfloat16, x_layout="channels_last"),
]


@pytest.mark.parametrize("case", SEED_DIRECT_CASES, ids=[str(i) for i in range(len(SEED_DIRECT_CASES))])
def test_seed_direct_candidate(case, only_seed_direct, kernel_launches):
    check(case, "auto", "ieee", kernel_launches)
    assert kernel_launches.names == ["seed_conv2d_kernel"]
    chosen = tuning.chosen_kernels((case.n, case.c, case.h, case.w), (case.oc, case.c, *case.kernel), case.stride,
                                   case.padding, case.dilation, case.groups, case.dtype)
    assert chosen == [SEED_DIRECT.describe()]


def test_seed_direct_with_strided_bias_and_pinned_format(only_seed_direct, kernel_launches):
    x, w, b = torch.randn(2, 3, 9, 9), torch.randn(8, 3, 3, 3), torch.randn(16)[::2]
    y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto", "channels_last")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, reference(x, w, b, (1, 1), (1, 1), (1, 1), 1)) <= 1e-5
    assert kernel_launches.names == ["seed_conv2d_kernel"]


def test_seed_candidates_only_for_few_channel_ungrouped_convs(monkeypatch):
    if not hasattr(igemm_mod, "seed_candidates"):
        pytest.skip("no direct-kernel candidates in this version")
    monkeypatch.setattr(igemm_mod, "interpreter_enabled", lambda: False)
    assert igemm_mod.seed_candidates(3, 1, 8)
    assert all(c.kernel == "seed_direct" for c in igemm_mod.seed_candidates(3, 1, 8))
    assert not igemm_mod.seed_candidates(64, 1, 8)
    assert not igemm_mod.seed_candidates(3, 3, 8)
    assert not igemm_mod.seed_candidates(3, 1, 70000)  # grid axis 2 is the batch: at most 65535


# ---------------------------------------------------------------- misaligned base addresses (TMA needs 16 bytes)

def misaligned_channels_last(shape, dtype=torch.float32):
    """A channels_last-contiguous view whose data pointer is one element past a 16-byte boundary."""
    n, c, h, w = shape
    t = torch.randn(n * h * w * c + 1).to(dtype)[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert t.is_contiguous(memory_format=torch.channels_last) and t.data_ptr() % 16 != 0
    return t


@pytest.mark.parametrize("algorithm", PATHS)
def test_misaligned_channels_last_input(algorithm, kernel_launches):
    groups = 8 if algorithm == "depthwise" else 1
    x = misaligned_channels_last((2, 8, 6, 7))
    w, b = torch.randn(8, 8 // groups, 3, 3), torch.randn(8)
    y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
    assert rel_err(y, reference(x, w, b, (1, 1), (1, 1), (1, 1), groups)) <= 1e-5
    assert len(kernel_launches) == 1
    if algorithm in ("auto", "gemm_tma"):
        assert kernel_launches.names == ["igemm_pointer_kernel"], "a misaligned base cannot be a TMA box source"


def test_alignment_is_part_of_the_launch_plan(kernel_launches):
    """Same shapes and strides, different alignment: each call gets the load path it can use.

    Regression: the in-process tuning choice (TMA, from the aligned call) was reused for the misaligned
    call and TensorDescriptor asserted 'base must be 16-byte aligned'.
    """
    w = torch.randn(8, 8, 3, 3)
    x_odd = misaligned_channels_last((1, 8, 6, 7))
    x_even = x_odd.clone(memory_format=torch.channels_last)
    assert x_even.stride() == x_odd.stride() and x_even.data_ptr() % 16 == 0
    for x in (x_even, x_odd, x_even):
        y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto")
        assert rel_err(y, reference(x, w, None, (1, 1), (1, 1), (1, 1), 1)) <= 1e-5
    assert kernel_launches.names == ["igemm_tma_kernel", "igemm_pointer_kernel", "igemm_tma_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_channels_last_weight_on_tma(dtype, kernel_launches):
    x = torch.randn(1, 16, 6, 7).to(dtype).to(memory_format=torch.channels_last)
    w = misaligned_channels_last((8, 16, 3, 3), dtype)  # 16 channels: the packed weight can be a view of it
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "gemm_tma")
    assert kernel_launches.names == ["igemm_tma_kernel"]
    assert rel_err(y, reference(x, w, None, (1, 1), (1, 1), (1, 1), 1)) <= tolerance(dtype)


# ---------------------------------------------------------------- 64-bit offsets

@pytest.mark.parametrize("algorithm", sorted(KERNEL_MODULES))
def test_int64_offset_path(algorithm, monkeypatch):
    """Force the USE_INT64 variant of each kernel on a small problem: same answer."""
    module = KERNEL_MODULES[algorithm]
    asked = []

    def force(*tensors):
        asked.append(len(tensors))
        return True

    monkeypatch.setattr(module, "needs_int64", force)
    case = POISON_CASES[algorithm]
    x, w, b = case.tensors()
    y = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm)
    assert asked, "the kernel never asked whether it needs 64-bit offsets"
    assert rel_err(y, reference(x, w, b, *case.args())) <= 1e-5



# ---------------------------------------------------------------- fallbacks to ATen

def test_zero_batch_falls_back(kernel_launches):
    for algorithm in PATHS:
        groups = 4 if algorithm == "depthwise" else 1
        x = torch.randn(0, 4, 6, 6)
        w = torch.randn(8, 4 // groups, 3, 3)
        b = torch.randn(8)
        y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
        assert y.shape == (0, 8, 6, 6)
        torch.testing.assert_close(y, F.conv2d(x, w, b, 1, 1, 1, groups))
    assert not kernel_launches


IMPOSSIBLE = [
    ("seed", Case(1, 4, 8, 6, 6, (3, 3), groups=2)),
    ("gemm_tma", Case(1, 8, 8, 7, 7, (3, 3), stride=(2, 2))),
    ("gemm_tma", Case(1, 3, 8, 6, 6, (3, 3))),  # 12-byte channel rows
    ("gemm_tma", Case(1, 16, 8, 6, 6, (3, 3), groups=2)),  # 8 channels per group
    ("depthwise", Case(1, 4, 8, 6, 6, (3, 3), groups=2)),
    ("depthwise", Case(1, 4, 8, 6, 6, (3, 3))),
]


@pytest.mark.parametrize("algorithm,case", IMPOSSIBLE, ids=[f"{a}-{i}" for i, (a, _) in enumerate(IMPOSSIBLE)])
def test_forced_impossible_algorithm_falls_back(algorithm, case, kernel_launches, caplog):
    x, w, b = case.tensors()
    with caplog.at_level("INFO", logger="conv_backend"):
        y = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm)
    assert not kernel_launches, "an impossible forced algorithm must not launch a kernel"
    torch.testing.assert_close(y, F.conv2d(x, w, b, *case.args()))
    assert any("falls back to ATen" in r.getMessage() and algorithm in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("algorithm", PATHS)
def test_float64_falls_back(algorithm, kernel_launches):
    groups = 4 if algorithm == "depthwise" else 1
    x, w = torch.randn(1, 4, 6, 6, dtype=torch.float64), torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
    assert not kernel_launches
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, 1, 1, groups))


def test_mixed_dtypes_fall_back_to_aten_error(kernel_launches):
    """ATen defines the behaviour (an error), not a silently converted Triton result."""
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w)
    with pytest.raises(RuntimeError):
        launch_conv2d(x, w, None, (1, 1), (0, 0), (1, 1), 1, "ieee", "auto")
    assert not kernel_launches


def test_tma_load_path_rejects_stride_not_dividing_input():
    x, w = torch.randn(1, 8, 7, 7), torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match="TMA"):
        implicit_gemm_conv2d(x, w, None, (2, 2), (0, 0), (1, 1), 1, "ieee", load_path="tma")


def test_tma_load_path_rejects_misaligned_channels():
    x, w = torch.randn(1, 3, 7, 7), torch.randn(8, 3, 3, 3)
    with pytest.raises(ValueError, match="TMA"):
        implicit_gemm_conv2d(x, w, None, (1, 1), (0, 0), (1, 1), 1, "ieee", load_path="tma")


def test_no_kernel_falls_back_to_aten(monkeypatch, caplog):
    """Every candidate failing (NoKernelError) leaves the convolution to ATen, with a warning."""
    def no_kernel(*args, **kwargs):
        raise tuning.NoKernelError("every kernel candidate failed")

    monkeypatch.setattr(common_mod, "select", no_kernel)
    x, w, b = torch.randn(1, 8, 6, 6), torch.randn(8, 8, 3, 3), torch.randn(8)
    with caplog.at_level("WARNING", logger="conv_backend"):
        y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto")
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, 1))
    assert any("falls back to ATen" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_custom_op_matches_launch_and_has_autograd():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = torch.ops.tritonconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1, "ieee", "gemm_pointer")
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x2, w2, b2, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- regressions (bugs this suite found)

@pytest.mark.parametrize("bias_kind", ["strided", "expanded"])
@pytest.mark.parametrize("algorithm", ["seed", "gemm_pointer", "gemm_tma", "gemm_nchw", "depthwise"])
def test_non_contiguous_bias(algorithm, bias_kind, kernel_launches):
    """Kernels once read the bias as b_ptr + oc, ignoring its stride."""
    groups = 4 if algorithm == "depthwise" else 1
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4 // groups, 3, 3)
    b = torch.randn(16)[::2] if bias_kind == "strided" else torch.randn(1).expand(8)
    y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
    assert kernel_launches.names == [KERNEL_FUNCTIONS[algorithm]]
    assert rel_err(y, reference(x, w, b, (1, 1), (1, 1), (1, 1), groups)) <= 1e-5


@pytest.mark.parametrize("algorithm", ["seed", "gemm_pointer", "gemm_tma", "gemm_nchw", "depthwise"])
def test_channels_last_weight_contiguous_input_format(algorithm):
    """Eager CPU convolution (and FakeTensor's rule) is channels_last when the input OR the weight is."""
    groups = 8 if algorithm == "depthwise" else 1
    x = torch.randn(1, 8, 6, 6)
    w = torch.randn(8, 8 // groups, 3, 3).to(memory_format=torch.channels_last)
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
    eager = F.conv2d(x, w, None, 1, 1, 1, groups)
    assert rel_err(y, reference(x, w, None, (1, 1), (1, 1), (1, 1), groups)) <= 1e-5
    assert format_flags(y) == format_flags(eager), (y.stride(), eager.stride())


STREAMED_ROW_CASES = [
    Case(2, 6, 6, 9, 10, (3, 3), padding=(1, 1), groups=6, x_layout="channels_last"),  # 9 rows: a partial tile
    Case(1, 4, 8, 7, 11, (3, 3), groups=4),  # NCHW, no padding, multiplier 2, bias
    Case(2, 5, 5, 6, 9, (3, 5), padding=(2, 3), dilation=(1, 2), groups=5, x_layout="channels_last", bias=False),
    Case(1, 8, 8, 5, 6, (3, 3), padding=(1, 1), groups=8, x_layout="channels_last", dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", STREAMED_ROW_CASES, ids=["cl-partial", "nchw-mult2", "wide-dilated", "bf16"])
def test_depthwise_streamed_rows(case, monkeypatch, kernel_launches):
    """Rows streamed through three rolling accumulators: each output row gets exactly its three input rows."""
    cand = tuning.Candidate.make("depthwise", num_stages=1, BLOCK_H=4, BLOCK_W=8, BLOCK_C=4, STREAM_ROWS=1)
    monkeypatch.setattr(depthwise_mod, "depthwise_candidates", lambda *a, **k: [cand])
    check(case, "depthwise", "ieee", kernel_launches)  # against float64, and one launch of depthwise_kernel
    assert kernel_launches[0][1]["STREAM_ROWS"] == 1


def test_depthwise_streams_rows_only_for_three_row_kernels_at_stride_1(monkeypatch):
    offered = {}

    def spy(channels_innermost, streamable=False):
        offered["streamable"] = streamable
        return [tuning.Candidate.make("depthwise", num_stages=1, BLOCK_H=4, BLOCK_W=8, BLOCK_C=4)]
    monkeypatch.setattr(depthwise_mod, "depthwise_candidates", spy)
    for kernel, stride, dilation, expected in [((3, 3), 1, 1, True), ((3, 5), 1, (1, 2), True), ((3, 3), 2, 1, False),
                                               ((5, 5), 1, 1, False), ((3, 3), 1, (2, 1), False)]:
        x, w = torch.randn(1, 4, 9, 9), torch.randn(4, 1, *kernel)
        y = launch_conv2d(x, w, None, (stride, stride), (1, 1), dilation if isinstance(dilation, tuple)
                          else (dilation, dilation), 4, "ieee", "depthwise")
        assert offered["streamable"] == expected, (kernel, stride, dilation)
        assert rel_err(y, reference(x, w, None, stride, 1, dilation, 4)) <= 1e-5


@pytest.mark.parametrize("case,flat", [
    (Case(2, 40, 24, 6, 11, (1, 1)), True),  # 1x1 on dense planes: input pixel p feeds output pixel p
    (Case(2, 40, 24, 6, 11, (1, 1), padding=(1, 0)), False),
    (Case(2, 40, 24, 6, 11, (1, 1), stride=(2, 1)), False),
    (Case(2, 40, 24, 6, 11, (1, 1), x_layout="strided_w"), False),
], ids=["dense", "padded", "strided", "strided_w"])
def test_nchw_kernel_flat_pixels_only_where_valid(case, flat, kernel_launches):
    x, w, b = case.tensors()
    y = launch_conv2d(x, w, b, *case.args(), "ieee", "gemm_nchw")
    assert kernel_launches.names == ["igemm_nchw_kernel"]
    assert kernel_launches[0][1]["PIXELS_FLAT"] is flat
    assert rel_err(y, reference(x, w, b, *case.args())) <= 1e-5


STREAMED_NCHW_CASES = [
    Case(3, 16, 20, 5, 7, (1, 1)),  # 35 pixels: 3 tiles an image, 9 in all, the last program's third past the batch
    Case(2, 24, 40, 4, 8, (1, 1), groups=2, bias=False),  # 12 channels a group in a 16-channel K step
    Case(2, 16, 24, 6, 6, (1, 1), dtype=torch.bfloat16),
]


@pytest.mark.parametrize("tiles", [2, 3])
@pytest.mark.parametrize("case", STREAMED_NCHW_CASES, ids=["partial", "grouped", "bf16"])
def test_nchw_streamed_tiles(case, tiles, monkeypatch, kernel_launches):
    """1x1 over NCHW planes, a program running over `tiles` pixel tiles across images with its weight tile
    loaded once: every pixel of every image stored once, none past the batch."""
    cand = tuning.Candidate.make("igemm_nchw", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TILES=tiles)
    monkeypatch.setattr(igemm_mod, "nchw_candidates", lambda *a, **k: [cand])
    assert check_twice(case, "gemm_nchw", "igemm_nchw_streamed_kernel", kernel_launches)["TILES"] == tiles


@pytest.mark.parametrize("case", [Case(2, 40, 24, 6, 11, (1, 1)),  # 40 channels: more than one K step
                                  Case(2, 16, 24, 6, 11, (1, 1), padding=(1, 0)),
                                  Case(2, 16, 24, 6, 11, (3, 3), padding=(1, 1))], ids=["deep", "padded", "3x3"])
def test_nchw_streamed_tiles_refused_where_they_do_not_apply(case, monkeypatch):
    """A streamed candidate on a problem it cannot take fails to build (the tuner skips such a candidate),
    rather than computing something else."""
    cand = tuning.Candidate.make("igemm_nchw", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TILES=2)
    x, w, b = case.tensors()
    with pytest.raises(ValueError, match="streamed tiles"):
        igemm_mod._launcher(cand, x, w, b, F.conv2d(x, w, b, *case.args()), *case.args(), "ieee")


@pytest.mark.parametrize("cg,flat,streamed", [(64, True, True), (64, False, False), (128, True, False)])
def test_nchw_streamed_tiles_offered_for_one_k_step_1x1(cg, flat, streamed, monkeypatch):
    monkeypatch.setattr(igemm_mod, "interpreter_enabled", lambda: False)
    cands = igemm_mod.nchw_candidates(cg, 256, torch.bfloat16, flat=flat)
    tiled = [c.params for c in cands if "TILES" in c.params]
    assert bool(tiled) == streamed
    assert all(p["BLOCK_K"] >= cg for p in tiled)


SPLIT_K_CASES = [
    Case(2, 37, 9, 5, 6, (3, 3), padding=(1, 1)),  # 3 channel chunks x 9 taps: slices of unequal length
    Case(1, 40, 12, 5, 4, (3, 2), stride=(2, 1), padding=(1, 1), groups=2, x_layout="channels_last"),
    Case(1, 8, 8, 3, 3, (1, 1), bias=False),  # one K step: some slices are empty
    Case(2, 24, 20, 6, 5, (3, 3), padding=(1, 1), dtype=torch.bfloat16),
]


def check_twice(case: Case, algorithm: str, kernel: str, launches) -> dict:
    """Two launches of one plan, each against float64 and in eager's memory format (a split-K launch must
    leave its arrival counters at zero for the next); both must be `kernel`. Returns the first's meta."""
    x, w, b = case.tensors()
    ref = reference(x, w, b, *case.args())
    for _ in range(2):
        y = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm)
        assert rel_err(y, ref) <= tolerance(x.dtype)
        assert format_flags(y) == format_flags(F.conv2d(x, w, b, *case.args()))
    assert launches.names == [kernel] * 2
    return launches[0][1]


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("case", SPLIT_K_CASES, ids=[str(i) for i in range(len(SPLIT_K_CASES))])
def test_split_k(case, split, monkeypatch, kernel_launches):
    """Split-K slices summed by the last program to arrive."""
    cand = tuning.Candidate.make("igemm_pointer", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, SPLIT_K=split)
    monkeypatch.setattr(igemm_mod, "pointer_candidates", lambda *a, **k: [cand])
    assert check_twice(case, "gemm_pointer", "igemm_pointer_kernel", kernel_launches)["SPLIT_K"] == split


def test_split_k_scratch_is_new_and_zeroed_per_launch():
    """Nothing a split-K launch allocates outlives it: CUDA-graph trees refuse memory of their pool that a
    plan keeps between calls. Each launch gets its own counters, zeroed."""
    scratch = igemm_mod._split_k_scratch(5, 3, 4)
    partial, arrivals = scratch(torch.empty(1))
    assert partial.dtype == torch.float32 and partial.numel() >= 5 * 3 * 4
    arrivals.fill_(7)
    held = weakref.ref(arrivals)
    del partial, arrivals
    assert held() is None, "the plan keeps its arrival counters between launches"
    partial, arrivals = scratch(torch.empty(1))
    assert arrivals.dtype == torch.int32 and arrivals.tolist() == [0] * 5


# ---------------------------------------------------------------- TMA weight descriptors: cached per weight, held weakly

def _tma_weight_case():
    x = torch.randn(2, 16, 6, 7).to(memory_format=torch.channels_last)
    return x, lambda: torch.randn(24, 16, 3, 3).to(memory_format=torch.channels_last)


def test_tma_plan_does_not_keep_weights_alive(kernel_launches):
    """A channels_last weight is read in place and its descriptor cached; the plan outlives a model,
    so the cache must not keep the model's weights (or their memory) alive."""
    import gc
    import weakref
    x, new_weight = _tma_weight_case()
    w = new_weight()
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "gemm_tma")
    assert kernel_launches.names == ["igemm_tma_kernel"]
    assert rel_err(y, reference(x, w, None, 1, 1, 1, 1)) <= 1e-5
    alive = weakref.ref(w)
    del w
    gc.collect()
    assert alive() is None, "the TMA plan keeps a freed weight alive"


def test_tma_weight_descriptors_per_weight(monkeypatch, kernel_launches):
    """Layers of one shape share a plan: each weight keeps its own descriptor (no rebuild when they
    alternate), and a weight whose memory moved (`.data = ...`) gets a new one."""
    x, new_weight = _tma_weight_case()
    w1, w2 = new_weight(), new_weight()
    built = []
    real = igemm_mod.TensorDescriptor

    def counting(base, shape, strides, block_shape, *args, **kwargs):
        if len(shape) == 2:  # the weight's descriptor ([OC, KH*KW*C]); the input's is 5-D
            built.append(base.data_ptr())
        return real(base, shape, strides, block_shape, *args, **kwargs)

    monkeypatch.setattr(igemm_mod, "TensorDescriptor", counting)
    for w in (w1, w2, w1, w2):
        y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "gemm_tma")
        assert rel_err(y, reference(x, w, None, 1, 1, 1, 1)) <= 1e-5
    assert built == [w1.data_ptr(), w2.data_ptr()]
    w1.data = new_weight()
    y = launch_conv2d(x, w1, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "gemm_tma")
    assert rel_err(y, reference(x, w1, None, 1, 1, 1, 1)) <= 1e-5
    assert built[-1] == w1.data_ptr() and len(built) == 3


def test_strided_tma_box_rows_stay_in_their_pixel(kernel_launches):
    """Strided boxes fold the W phase into the channel axis ([N, H/sh, sh, W/sw, sw*C]): a box row longer than
    the channels left would read the next pixel's channels. Zero weights hide that for finite inputs, so a
    NaN in a pixel that no window reads shows it: the output must stay NaN-free, as ATen's is."""
    x = torch.randn(1, 24, 6, 8).to(memory_format=torch.channels_last)
    x[0, 0, 2, 3] = float("nan")  # an odd column, which a 1-wide kernel at stride 2 never reads
    w = torch.randn(8, 24, 3, 1)
    y = launch_conv2d(x, w, None, (2, 2), (1, 0), (1, 1), 1, "ieee", "gemm_tma")
    assert kernel_launches.names == ["igemm_tma_kernel"]
    ref = F.conv2d(x, w, None, 2, (1, 0))
    assert not ref.isnan().any()
    torch.testing.assert_close(y, ref)


TMA_SPLIT_K_CASES = [
    Case(2, 36, 9, 5, 6, (3, 3), padding=(1, 1)),  # 3 channel chunks (the last partial) x 9 taps: unequal slices
    Case(3, 32, 24, 3, 5, (2, 3), padding=(1, 1), groups=2, x_layout="channels_last"),  # odd batch, 2-image tiles
    Case(1, 8, 8, 3, 3, (1, 1), bias=False),  # one K step: some slices are empty
    Case(2, 24, 20, 6, 5, (3, 3), padding=(1, 1), dtype=torch.bfloat16),
]


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("case", TMA_SPLIT_K_CASES, ids=[str(i) for i in range(len(TMA_SPLIT_K_CASES))])
def test_split_k_on_tma_tiles(case, split, monkeypatch, kernel_launches):
    """The TMA kernel's split-K shares the pointer kernel's reduction."""
    cand = tuning.Candidate.make("igemm_tma", BLOCK_B=2, BLOCK_H=2, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16,
                                 SPLIT_K=split)
    monkeypatch.setattr(igemm_mod, "tma_candidates", lambda *a, **k: [cand])
    assert check_twice(case, "gemm_tma", "igemm_tma_kernel", kernel_launches)["SPLIT_K"] == split


@pytest.mark.parametrize("case,flat", [
    (Case(2, 24, 20, 5, 7, (1, 1), x_layout="channels_last"), True),  # 70 pixels: the last 32-pixel tile is partial
    (Case(3, 32, 16, 4, 4, (1, 1), groups=2, x_layout="channels_last", dtype=torch.bfloat16), True),
    (Case(2, 24, 20, 5, 7, (1, 1)), False),  # NCHW output: its pixels are not a [N*H*W, C] matrix
    (Case(2, 24, 20, 5, 7, (1, 1), padding=(1, 1), x_layout="channels_last"), False),
    (Case(2, 24, 20, 6, 8, (1, 1), stride=(2, 2), x_layout="channels_last"), False),
], ids=["cl", "cl-grouped-bf16", "nchw", "padded", "strided"])
def test_tma_1x1_as_one_row_of_pixels(case, flat, kernel_launches):
    """A 1x1 convolution into a channels_last output is one GEMM over N*H*W pixels: 1-D tiles across images."""
    x, w, b = case.tensors()
    y = launch_conv2d(x, w, b, *case.args(), "ieee", "gemm_tma")
    assert rel_err(y, reference(x, w, b, *case.args())) <= tolerance(x.dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == (case.x_layout == "channels_last")
    assert kernel_launches.names == ["igemm_tma_kernel"]
    meta = kernel_launches[0][1]
    assert (meta["BLOCK_H"] == 1 and meta["BLOCK_B"] == 1) == flat, meta


# ---------------------------------------------------------------- gathered pixels, TMA weights (Hopper's small maps)

GATHER_CASES = [
    Case(2, 24, 20, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"),  # 7x7: boxes would run past the map
    Case(3, 40, 24, 6, 10, (3, 2), padding=(1, 0), groups=2, dtype=torch.bfloat16),  # 20 channels a group: partial
    Case(2, 3, 20, 9, 9, (3, 3), stride=(2, 2), padding=(1, 1)),  # 12-byte channel rows: no input boxes
    Case(1, 16, 37, 5, 6, (1, 1), bias=False),  # NCHW 1x1; 37 output channels: the last weight rows zero-filled
]


@pytest.fixture
def pick_tma_weights(monkeypatch):
    """The tuner picks the pointer kernel with TMA weights (StopIteration where it is not offered)."""
    monkeypatch.setattr(common_mod, "select", lambda key, signature, device, candidates, prepare: next(
        c for c in candidates if c.params.get("TMA_WEIGHTS")))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("case", GATHER_CASES, ids=["7x7", "grouped-bf16", "misaligned-strided", "nchw-1x1"])
def test_pointer_kernel_with_tma_weights(case, split, pick_tma_weights, monkeypatch, kernel_launches):
    real = igemm_mod.gather_candidates
    if split > 1:
        monkeypatch.setattr(igemm_mod, "gather_candidates", lambda *a, **k: [
            tuning.Candidate.make(c.kernel, c.num_warps, c.num_stages, **{**c.params, "SPLIT_K": split})
            for c in real(*a, **k)])
    # The second launch finds the weight's descriptor cached.
    meta = check_twice(case, "auto", "igemm_pointer_kernel", kernel_launches)
    assert meta["TMA_WEIGHTS"] is True and meta["SPLIT_K"] == split


@pytest.mark.parametrize("case,offered", [
    (GATHER_CASES[0], True),
    (Case(2, 16, 16, 8, 16, (3, 3), padding=(1, 1), x_layout="channels_last"), False),  # boxes tile the map exactly
    (Case(2, 16, 16, 7, 7, (1, 1), x_layout="channels_last"), False),  # flat 1x1: one row of pixels, no edges
], ids=["7x7", "8x16", "flat-1x1"])
def test_tma_weights_offered_only_where_boxes_waste(case, offered, monkeypatch):
    seen = []
    monkeypatch.setattr(common_mod, "select", lambda key, sig, dev, cands, prep: seen.extend(cands) or cands[0])
    x, w, b = case.tensors()
    launch_conv2d(x, w, b, *case.args(), "ieee", "auto")
    assert any(c.params.get("TMA_WEIGHTS") for c in seen) == offered
    seen.clear()
    launch_conv2d(x, w, b, *case.args(), "ieee", "gemm_pointer")  # the Ampere path stays plain pointer loads
    assert seen and not any(c.params.get("TMA_WEIGHTS") for c in seen)


# ---------------------------------------------------------------- register caps (maxnreg)

def test_depthwise_register_cap_reaches_the_launch(monkeypatch, kernel_launches, tmp_path):
    """A capped candidate (maxnreg, a compile option rather than a kernel argument) launches, is right,
    and survives the tuning cache's round trip through its file."""
    cand = tuning.Candidate.make("depthwise", 8, 1, maxnreg=80, BLOCK_H=4, BLOCK_W=8, BLOCK_C=4)
    monkeypatch.setattr(depthwise_mod, "depthwise_candidates", lambda *a, **k: [cand])
    check(STREAMED_ROW_CASES[0], "depthwise", "ieee", kernel_launches)
    assert kernel_launches[0][1]["maxnreg"] == 80
    tuning.TuningCache(tmp_path / "tuning.json").put("problem", cand)
    assert tuning.TuningCache(tmp_path / "tuning.json").get("problem") == cand


def test_depthwise_capped_candidates_only_for_channels_last(monkeypatch):
    monkeypatch.setattr(depthwise_mod, "interpreter_enabled", lambda: False)
    assert any("maxnreg" in c.params for c in depthwise_mod.depthwise_candidates(True))
    assert not any("maxnreg" in c.params for c in depthwise_mod.depthwise_candidates(False))


def test_nchw_capped_candidate_only_for_wide_16bit_problems(monkeypatch):
    monkeypatch.setattr(igemm_mod, "interpreter_enabled", lambda: False)

    def capped(cg, ocg, dtype):
        return [c for c in igemm_mod.nchw_candidates(cg, ocg, dtype) if "maxnreg" in c.params]
    assert [c.params["BLOCK_M"] for c in capped(64, 256, torch.bfloat16)] == [128]
    assert not capped(64, 256, torch.float32)  # TF32 tiles take other registers: not measured capped
    assert not capped(64, 64, torch.float16) and not capped(32, 256, torch.bfloat16)  # clipped tiles


@triton.jit
def _round_to_tf32_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, common_mod.round_to_tf32(tl.load(x_ptr + offs)))


def test_round_to_tf32_rounds_to_nearest():
    """The operands of "tf32_round" keep 10 mantissa bits, rounded to the nearest (ties away from zero), where
    the tensor cores' own conversion truncates."""
    x = torch.randn(64) * 10.0 ** torch.randint(-6, 6, (64,)).float()
    x[:4] = torch.tensor([1.0 + 2 ** -11, 1.0 + 2 ** -11 - 2 ** -20, -(1.0 + 3 * 2 ** -11), 1.0 + 2 ** -10])
    y = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x, y, N=64)
    assert y[:4].tolist() == [1.0 + 2 ** -10, 1.0, -(1.0 + 2 ** -9), 1.0 + 2 ** -10]
    bits = y.view(torch.int32)
    assert torch.all(bits & 0x1FFF == 0)  # exactly representable in TF32
    assert torch.all((y - x).abs() <= x.abs() * 2 ** -11)  # within half a TF32 unit
