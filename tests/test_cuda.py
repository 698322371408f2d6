"""GPU tests (pytest -m cuda, TRITON_INTERPRET unset): every kernel path on CUDA against float64 ATen.

Bounds on ||out - ref|| / ||ref||: TF32 2e-3, exact fp32 1e-5, fp16/bf16 1e-2.

Compile time dominates on a cold Triton cache, so most tests here run one
candidate config per problem (`one_candidate`); test_every_candidate_is_correct
runs every config the tuner may pick, and the seed problem runs fully tuned.
Written against public torch / triton APIs that exist from torch 2.6 / triton 3.3 on.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

import conv_backend
import conv_backend.kernels.depthwise as depthwise_mod
import conv_backend.kernels.halo as halo_mod
import conv_backend.kernels.implicit_gemm as igemm_mod
import conv_backend.kernels.warp_specialized as ws_mod
from conv_backend import dispatch, last_report, tuning
from conv_backend.dispatch import launch_conv2d

from _util import Case, format_flags, reference, rel_err, tolerance

pytestmark = pytest.mark.cuda
DEV = "cuda"
# The Triton functions a forced path may launch (the tuner runs each candidate it times).
KERNEL_FUNCTIONS = {"seed": {"seed_conv2d_kernel"}, "gemm_pointer": {"igemm_pointer_kernel"},
                    "gemm_tma": {"igemm_tma_kernel", "igemm_halo_kernel", "igemm_ws_kernel"},
                    "gemm_nchw": {"igemm_nchw_kernel", "igemm_nchw_streamed_kernel"},
                    "depthwise": {"depthwise_kernel"}}
CANDIDATE_FUNCTIONS = [(igemm_mod, "tma_candidates"), (igemm_mod, "pointer_candidates"),
                       (igemm_mod, "gather_candidates"), (igemm_mod, "nchw_candidates"),
                       (igemm_mod, "split_k_candidates"), (depthwise_mod, "depthwise_candidates"),
                       (halo_mod, "halo_candidates"), (ws_mod, "ws_candidates"), (ws_mod, "ws_halo_candidates")]
if hasattr(igemm_mod, "seed_candidates"):  # the seed's direct kernel, offered for few-channel convolutions
    CANDIDATE_FUNCTIONS.append((igemm_mod, "seed_candidates"))


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


needs_hopper = pytest.mark.skipif(not hopper(), reason="tensor-descriptor (TMA) loads need sm_90+")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_candidate(monkeypatch):
    """Tune nothing: each kernel family offers only its first config (one compile per problem)."""
    for module, name in CANDIDATE_FUNCTIONS:
        full = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _full=full, **k: _full(*a, **k)[:1])


def forget():
    tuning.reset_memory()
    plans = getattr(dispatch, "_plans", None)
    if isinstance(plans, dict):
        plans.clear()


def run_case(case: Case, algorithm: str, precision: str, launches=None):
    x, w, b = case.tensors(DEV)
    stride, padding, dilation, groups = case.args()
    y = launch_conv2d(x, w, b, stride, padding, dilation, groups, precision, algorithm)
    torch.cuda.synchronize()
    eager = F.conv2d(x, w, b, stride, padding, dilation, groups)
    ref = reference(x, w, b, stride, padding, dilation, groups)
    assert y.shape == eager.shape and y.dtype == x.dtype and y.device == x.device
    err = rel_err(y, ref)
    assert err <= tolerance(x.dtype, precision), f"{algorithm} {precision} {case}: relative error {err:.3g}"
    assert format_flags(y) == format_flags(eager), (y.stride(), eager.stride())
    if launches is not None and algorithm in KERNEL_FUNCTIONS:
        assert launches.names and set(launches.names) <= KERNEL_FUNCTIONS[algorithm], set(launches.names)
    return y


# ---------------------------------------------------------------- every path, every dtype

PATH_CASES = [
    # (algorithm, case)
    ("gemm_pointer", Case(2, 24, 40, 33, 31, (3, 3), stride=(2, 2), padding=(1, 1))),
    ("gemm_pointer", Case(2, 24, 40, 33, 31, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                          x_layout="channels_last", w_layout="channels_last")),
    ("gemm_pointer", Case(1, 3, 64, 57, 61, (7, 7), stride=(2, 2), padding=(3, 3), bias=False)),  # ResNet stem
    ("gemm_pointer", Case(2, 48, 48, 20, 19, (3, 3), padding=(1, 1), groups=3, x_layout="sliced")),
    ("gemm_tma", Case(2, 32, 48, 35, 29, (3, 3), padding=(1, 1))),
    ("gemm_tma", Case(2, 32, 48, 35, 29, (5, 9), padding=(2, 4), dilation=(2, 3), bias=False,
                      x_layout="channels_last")),
    ("gemm_tma", Case(1, 64, 96, 17, 15, (1, 1), x_layout="channels_last", w_layout="channels_last")),
    ("gemm_tma", Case(2, 64, 64, 21, 22, (3, 3), padding=(1, 1), groups=2, x_layout="channels_last")),
    ("gemm_tma", Case(1, 16, 40, 9, 70, (3, 3), padding=(1, 1), x_layout="transposed_hw")),
    ("gemm_nchw", Case(2, 64, 96, 28, 28, (1, 1))),  # flat pixels
    ("gemm_nchw", Case(2, 24, 40, 33, 31, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
    ("gemm_nchw", Case(2, 48, 48, 20, 19, (3, 3), padding=(1, 1), groups=3, x_layout="sliced")),
    ("depthwise", Case(2, 32, 32, 37, 41, (3, 3), padding=(1, 1), groups=32)),
    ("depthwise", Case(2, 32, 64, 37, 41, (3, 3), stride=(2, 2), padding=(1, 1), groups=32,
                       x_layout="channels_last")),
    ("depthwise", Case(1, 24, 24, 30, 33, (5, 5), padding=(4, 4), dilation=(2, 2), groups=24, x_layout="sliced")),
    ("auto", Case(2, 32, 64, 35, 29, (3, 3), padding=(1, 1), x_layout="channels_last")),
    ("auto", Case(2, 32, 32, 35, 29, (3, 3), padding=(1, 1), groups=32)),
    ("seed", Case(2, 12, 40, 33, 31, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1))),
]
DTYPES = [(torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "ieee")]


def _needs_tma(algorithm):
    return algorithm == "gemm_tma" and not hopper()


@pytest.mark.parametrize("dtype,precision", DTYPES, ids=["tf32", "ieee", "bf16"])
@pytest.mark.parametrize("algorithm,case", PATH_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PATH_CASES)])
def test_path_against_float64(algorithm, case, dtype, precision, one_candidate, kernel_launches):
    if _needs_tma(algorithm):
        pytest.skip("TMA needs sm_90+")
    if algorithm == "seed" and dtype != torch.float32:
        pytest.skip("the seed kernel autotunes 11 configs per problem: fp32 only (16-bit runs on CPU)")
    run_case(dataclasses.replace(case, dtype=dtype), algorithm, precision, kernel_launches)


FP16_CASES = [(a, c) for a, c in PATH_CASES if a in ("gemm_pointer", "gemm_tma", "gemm_nchw", "depthwise")][::2]


@pytest.mark.parametrize("algorithm,case", FP16_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(FP16_CASES)])
def test_path_fp16(algorithm, case, one_candidate, kernel_launches):
    if _needs_tma(algorithm):
        pytest.skip("TMA needs sm_90+")
    y = run_case(dataclasses.replace(case, dtype=torch.float16), algorithm, "ieee", kernel_launches)
    assert y.dtype == torch.float16


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_auto_precision_follows_cudnn(allow_tf32, one_candidate, kernel_launches):
    case = Case(2, 32, 48, 35, 29, (3, 3), padding=(1, 1), x_layout="channels_last")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        run_case(case, "gemm_pointer", "tf32" if allow_tf32 else "ieee")
        del kernel_launches[:]
        forget()
        run_case(case, "gemm_pointer", "auto", kernel_launches)
    assert {kw["INPUT_PRECISION"] for _, kw in kernel_launches} == {"tf32" if allow_tf32 else "ieee"}


def test_output_format_follows_eager_with_channels_last_weight(one_candidate):
    for algorithm in ("gemm_pointer", "depthwise", "auto") + (("gemm_tma",) if hopper() else ()):
        groups = 32 if algorithm == "depthwise" else 1
        case = Case(1, 32, 32, 19, 21, (3, 3), padding=(1, 1), groups=groups, w_layout="channels_last")
        y = run_case(case, algorithm, "ieee")
        assert y.is_contiguous(memory_format=torch.channels_last), "cuDNN returns channels_last here"


def test_misaligned_channels_last_input(one_candidate, kernel_launches):
    n, c, h, w = 2, 32, 19, 21
    x = torch.randn(n * h * w * c + 1, device=DEV)[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16
    wt = torch.randn(48, 32, 3, 3, device=DEV)
    for algorithm in ("auto", "gemm_tma", "gemm_pointer"):
        forget()
        y = launch_conv2d(x, wt, None, (1, 1), (1, 1), (1, 1), 1, "ieee", algorithm)
        assert rel_err(y, reference(x, wt, None, (1, 1), (1, 1), (1, 1), 1)) <= 1e-5


def test_forced_seed_with_batch_beyond_grid_limit(one_candidate):
    """The seed kernel puts the batch on grid axis 2, which CUDA caps at 65535: it must not fail to launch."""
    x = torch.randn(70000, 2, 5, 5, device=DEV)
    w = torch.randn(4, 2, 3, 3, device=DEV)
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "seed")
    torch.cuda.synchronize()
    assert rel_err(y, reference(x, w, None, 1, 1, 1, 1)) <= 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("algorithm", ["auto", "gemm_pointer", "depthwise", "seed"] + (["gemm_tma"] if hopper() else []))
def test_tensors_on_a_second_gpu(algorithm, one_candidate):
    """Triton launches on the *current* device: tensors on cuda:1 while cuda:0 is current must still work."""
    assert torch.cuda.current_device() == 0
    groups = 16 if algorithm == "depthwise" else 1
    x = torch.randn(2, 16, 19, 21, device="cuda:1").to(memory_format=torch.channels_last)
    w = torch.randn(32, 16 // groups, 3, 3, device="cuda:1")
    b = torch.randn(32, device="cuda:1")
    y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
    torch.cuda.synchronize(1)
    assert y.device == x.device
    assert rel_err(y, reference(x, w, b, 1, 1, 1, groups)) <= 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_compiled_model_on_a_second_gpu(one_candidate):
    model = Block().to("cuda:1").eval()
    x = torch.randn(2, 32, 20, 18, device="cuda:1")
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = torch.compile(model, backend="tritonconv")(x)
        ref = model(x)
    assert out.device == x.device
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(last_report().replaced) == 5


# ---------------------------------------------------------------- every tuner config is correct

def _candidate_problems():
    """(algorithm, problem, candidate family, kernel it launches)."""
    problems = [("auto", Case(2, 40, 72, 23, 37, (3, 3), stride=(2, 1), padding=(1, 1), x_layout="channels_last"),
                 "pointer_candidates", "igemm_pointer_kernel")]
    if hopper():
        problems.append(("auto", Case(2, 48, 72, 23, 37, (3, 3), padding=(1, 1), x_layout="channels_last"),
                         "tma_candidates", "igemm_tma_kernel"))
        problems.append(("auto", Case(2, 64, 64, 13, 37, (3, 3), padding=(1, 1), groups=2, x_layout="channels_last"),
                         "tma_candidates", "igemm_tma_kernel"))
        # Strided boxes ([N, H/2, 2, W/2, 2*C]) with padding on both sides.
        problems.append(("auto", Case(2, 48, 72, 24, 38, (3, 3), stride=(2, 2), padding=(1, 1),
                                      x_layout="channels_last"), "tma_candidates", "igemm_tma_kernel"))
        # Maps smaller than a box: tiles of several images (2-D boxes, and one-row stacks), the last running
        # past the batch.
        problems.append(("auto", Case(5, 64, 72, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"),
                         "tma_candidates", "igemm_tma_kernel"))
        # Gathered pixels, TMA weights: a 7x7 map (runs of pixels across images), and 20 channels a group
        # at stride 2 (no input boxes; a partial channel chunk, zeros in the packed weight).
        problems.append(("auto", Case(5, 64, 72, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"),
                         "gather_candidates", "igemm_pointer_kernel"))
        problems.append(("auto", Case(2, 40, 72, 14, 13, (3, 3), stride=(2, 2), padding=(1, 1), groups=2),
                         "gather_candidates", "igemm_pointer_kernel"))
        # 1x1 into channels_last: one row of N*H*W pixels in 1-D boxes, the last tile partial.
        problems.append(("auto", Case(2, 64, 72, 13, 37, (1, 1), x_layout="channels_last"),
                         "tma_candidates", "igemm_tma_kernel"))
    if hasattr(igemm_mod, "seed_candidates"):
        problems.append(("auto", Case(2, 3, 40, 45, 39, (7, 7), stride=(2, 2), padding=(3, 3)),
                         "seed_candidates", "seed_conv2d_kernel"))
    problems += [
        ("gemm_nchw", Case(2, 40, 72, 23, 37, (3, 3), padding=(1, 1)), "nchw_candidates", "igemm_nchw_kernel"),
        # 136 output channels: the 16-bit register-capped 128x64 tile is offered, its second tile partial; and
        # streamed tiles (TILES), whose last program runs past the last image.
        ("gemm_nchw", Case(3, 64, 136, 16, 30, (1, 1)), "nchw_candidates", "igemm_nchw_kernel"),
        ("depthwise", Case(2, 48, 48, 23, 37, (3, 3), padding=(1, 1), groups=48), "depthwise_candidates",
         "depthwise_kernel"),
        ("depthwise", Case(2, 48, 96, 23, 37, (3, 3), padding=(1, 1), groups=48, x_layout="channels_last"),
         "depthwise_candidates", "depthwise_kernel"),
    ]
    return problems


CANDIDATE_PROBLEMS = _candidate_problems()


# One test per problem and dtype: compiling every config is the suite's long pole, and xdist spreads tests.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("problem", CANDIDATE_PROBLEMS,
                         ids=[f"{family.split('_')[0]}-{i}" for i, (_, _, family, _) in enumerate(CANDIDATE_PROBLEMS)])
def test_every_candidate_is_correct(problem, dtype, monkeypatch, kernel_launches):
    """Whatever config the tuner picks on some GPU must compute the right answer: run each one alone."""
    algorithm, case, family, kernel = problem
    case = dataclasses.replace(case, dtype=dtype)
    modules = dict((name, module) for module, name in CANDIDATE_FUNCTIONS)
    full = getattr(modules[family], family)
    seen = []
    for name, module in modules.items():  # only `family` offers anything
        monkeypatch.setattr(module, name, lambda *a, **k: [])
    monkeypatch.setattr(modules[family], family, lambda *a, **k: seen.append(full(*a, **k)) or [])
    forget()
    # Nothing on offer: this call falls back to ATen; it records the list `family` would offer.
    launch_conv2d(*case.tensors(DEV), *case.args(), "ieee", algorithm)
    assert seen and seen[0], f"{family} offered no candidate for {case}"
    for cand in seen[0]:
        monkeypatch.setattr(modules[family], family, lambda *a, _c=cand, **k: [_c])
        forget()
        del kernel_launches[:]
        try:
            run_case(case, algorithm, "ieee")
        except AssertionError as exc:
            raise AssertionError(f"{family} {dtype} candidate {cand.describe()}: {exc}") from exc
        expected = "igemm_nchw_streamed_kernel" if "TILES" in cand.params else kernel
        assert set(kernel_launches.names) == {expected}, (cand.describe(), kernel_launches.names)


# ---------------------------------------------------------------- the Gluon halo kernel (Hopper)

def gluon_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and halo_mod.gluon is not None


HALO_CASES = [
    # The seed problem's kernel and dilation: a 16-row tile reads a 24-row patch (boxes of 16 + 8 rows).
    Case(2, 32, 64, 37, 45, (5, 9), padding=(2, 4), dilation=(2, 3), x_layout="channels_last"),
    # A partial channel chunk (48 = 32 + 16 in fp32), 72 output channels (a partial N tile), NCHW in and out.
    Case(2, 48, 72, 23, 37, (3, 3), padding=(1, 1)),
    # No padding along H, columns padded, no bias, more rows than one tile.
    Case(1, 64, 128, 40, 70, (5, 7), padding=(0, 3), bias=False, x_layout="channels_last"),
    # Fewer channels than a box row: 16 per row, the copy engine zero-fills channels 8..15.
    Case(2, 8, 24, 20, 33, (3, 3), padding=(1, 1)),
]
HALO_DTYPES = [(torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")]


@pytest.mark.skipif(not gluon_hopper(), reason="the halo kernel is Gluon code for sm_90")
@pytest.mark.parametrize("dtype,precision", HALO_DTYPES, ids=["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("case", HALO_CASES, ids=[f"halo-{i}" for i in range(len(HALO_CASES))])
def test_every_halo_candidate_is_correct(case, dtype, precision, monkeypatch, kernel_launches):
    """Each config the tuner may pick for the halo kernel, run alone against float64."""
    case = dataclasses.replace(case, dtype=dtype)
    out_h, out_w = case.out_hw()
    cands = halo_mod.halo_candidates(case.c, case.oc, out_h, out_w, case.kernel[0], case.dilation[0], dtype)
    assert cands, f"no halo candidate for {case}"
    run_each_gluon_candidate(case, precision, cands, halo_mod, "halo_candidates", "igemm_halo_kernel",
                             monkeypatch, kernel_launches)


def run_each_gluon_candidate(case, precision, cands, module, name, kernel, monkeypatch, kernel_launches):
    """Run `case` on the TMA path with `module.name` offering each of `cands` alone (every other candidate
    function offering none), and check that only `kernel` ran, with that candidate's tile and warps."""
    for other_module, other_name in CANDIDATE_FUNCTIONS:
        monkeypatch.setattr(other_module, other_name, lambda *a, **k: [])
    for cand in cands:
        monkeypatch.setattr(module, name, lambda *a, _c=cand, **k: [_c])
        forget()
        del kernel_launches[:]
        try:
            run_case(case, "gemm_tma", precision)
        except AssertionError as exc:
            raise AssertionError(f"{case.dtype} candidate {cand.describe()}: {exc}") from exc
        assert set(kernel_launches.names) == {kernel}, (cand.describe(), kernel_launches.names)
        for _, meta in kernel_launches:
            launched = {key: meta.get(key) for key in cand.params}
            warps = ws_mod.launch_warps(cand.num_warps, cand.params.get("SPLIT_TILE", False))
            assert launched == cand.params and meta["num_warps"] == warps, (cand.describe(), meta)


WS_CASES = [
    # A partial channel chunk (48 = 32 + 16 in fp32), 72 output channels (a partial N tile), padding, NCHW.
    Case(2, 48, 72, 23, 37, (3, 3), padding=(1, 1)),
    # 7x7 maps, an odd batch: tiles of two images' 8x8 boxes end past the last image.
    Case(5, 64, 64, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"),
    # The seed problem's kernel, padding and dilation, no bias.
    Case(2, 32, 64, 37, 45, (5, 9), padding=(2, 4), dilation=(2, 3), bias=False, x_layout="channels_last"),
    # A 1x1 into channels_last: one row of all 2*17*15 pixels, whose last tile is partial.
    Case(2, 64, 96, 17, 15, (1, 1), x_layout="channels_last", w_layout="channels_last"),
    # Fewer channels than a box row (16 per row; the copy engine zero-fills channels 8..15).
    Case(2, 8, 24, 20, 33, (3, 3), padding=(1, 1)),
    # 264 output channels: 256-channel tiles (two consumer warpgroups), the second one mostly past the end.
    Case(1, 64, 264, 9, 20, (1, 1), x_layout="channels_last", w_layout="channels_last"),
    # Stride 2 (ResNet's 3x3/2), padding: boxes of the strided view, the padding's phase below zero.
    Case(2, 64, 72, 24, 38, (3, 3), stride=(2, 2), padding=(1, 1), x_layout="channels_last"),
    # Stride 2 down, 1 across, 48 channels: box rows drop to 16 channels in every dtype (48 is no multiple of 32).
    Case(2, 48, 64, 22, 30, (3, 3), stride=(2, 1), padding=(1, 1)),
    # A 1x1 with stride 2 (ResNet's downsampling shortcut), no bias.
    Case(3, 32, 64, 16, 20, (1, 1), stride=(2, 2), bias=False, x_layout="channels_last"),
    # Stride 2 with 16 channels: the shortest box rows a strided view allows (32 bytes in 16-bit).
    Case(2, 16, 24, 20, 34, (3, 3), stride=(2, 2), padding=(1, 1)),
]


def ws_candidates_for(case, dtype):
    out_h, out_w = case.out_hw()
    n, h, w = case.n, out_h, out_w
    if case.kernel == (1, 1) and case.stride == (1, 1):  # a flat problem: one row of all the pixels
        n, h, w = 1, 1, case.n * out_h * out_w
    return ws_mod.ws_candidates(case.c, case.oc, n, h, w, dtype, sms=1, strided=case.stride != (1, 1))


@pytest.mark.skipif(not gluon_hopper(), reason="the warp-specialized kernel is Gluon code for sm_90")
@pytest.mark.parametrize("programs", [None, 3], ids=["one-per-sm", "three-programs"])
@pytest.mark.parametrize("dtype,precision", HALO_DTYPES, ids=["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("case", WS_CASES, ids=[f"ws-{i}" for i in range(len(WS_CASES))])
def test_every_ws_candidate_is_correct(case, dtype, precision, programs, monkeypatch, kernel_launches):
    """Each config the tuner may pick for the warp-specialized kernel, run alone against float64. With
    three programs, each loops over many tiles: its consumers take turns, and the ring of stages wraps
    around across tiles."""
    case = dataclasses.replace(case, dtype=dtype)
    cands = ws_candidates_for(case, dtype)
    assert cands, f"no warp-specialized candidate for {case}"
    if programs:
        monkeypatch.setattr(ws_mod, "persistent_programs", lambda tiles, device: min(tiles, programs))
    run_each_gluon_candidate(case, precision, cands, ws_mod, "ws_candidates", "igemm_ws_kernel", monkeypatch,
                             kernel_launches)


WS_HALO_CASES = [
    # A partial channel chunk, 72 output channels (a partial N tile), padding, NCHW; the 3-row kernel's
    # patches arrive as a head box and a 2-row tail box.
    Case(2, 48, 72, 23, 37, (3, 3), padding=(1, 1)),
    # The seed problem's kernel, padding and dilation, no bias: views 2 * BLOCK_W pixels apart.
    Case(2, 32, 64, 37, 45, (5, 9), padding=(2, 4), dilation=(2, 3), bias=False, x_layout="channels_last"),
    # 136 output channels: 128-channel tiles in both orientations, the second mostly past the end.
    Case(1, 64, 136, 21, 70, (3, 3), padding=(1, 1), x_layout="channels_last", w_layout="channels_last"),
    # A kernel two rows high (a 1-row tail), asymmetric padding.
    Case(2, 32, 64, 19, 40, (2, 3), padding=(0, 1)),
    # Fewer channels than a box row (the copy engine zero-fills channels 8..15).
    Case(2, 8, 24, 20, 33, (3, 3), padding=(1, 1)),
]


@pytest.mark.skipif(not gluon_hopper(), reason="the warp-specialized kernel is Gluon code for sm_90")
@pytest.mark.parametrize("programs", [None, 3], ids=["one-per-sm", "three-programs"])
@pytest.mark.parametrize("dtype,precision", HALO_DTYPES, ids=["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("case", WS_HALO_CASES, ids=[f"ws-halo-{i}" for i in range(len(WS_HALO_CASES))])
def test_every_ws_halo_candidate_is_correct(case, dtype, precision, programs, monkeypatch, kernel_launches):
    """Each config the tuner may pick for the warp-specialized kernel's patch variant (KH row taps read from
    one patch), run alone against float64, with one program per SM and with three looping over many tiles."""
    case = dataclasses.replace(case, dtype=dtype)
    out_h, out_w = case.out_hw()
    cands = ws_mod.ws_halo_candidates(case.c, case.oc, case.n, out_h, out_w, case.kernel[0], case.dilation[0], dtype,
                                      sms=1)
    assert cands, f"no patch-variant candidate for {case}"
    if programs:
        monkeypatch.setattr(ws_mod, "persistent_programs", lambda tiles, device: min(tiles, programs))
    run_each_gluon_candidate(case, precision, cands, ws_mod, "ws_halo_candidates", "igemm_ws_kernel", monkeypatch,
                             kernel_launches)


@pytest.mark.skipif(not gluon_hopper(), reason="the halo and warp-specialized kernels are Gluon code for sm_90")
@pytest.mark.parametrize("module,name", [(halo_mod, "halo_candidates"), (ws_mod, "ws_candidates"),
                                         (ws_mod, "ws_halo_candidates")], ids=["halo", "ws", "ws-halo"])
def test_auto_offers_the_gluon_kernels_only_where_they_can_run(module, name, monkeypatch, one_candidate):
    offered = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: offered.append(1) or real(*a, **k))
    for case, precision, expected in [
            (Case(2, 32, 64, 37, 45, (3, 3), padding=(1, 1), x_layout="channels_last"), "tf32", True),
            (Case(2, 32, 64, 37, 45, (3, 3), padding=(1, 1), x_layout="channels_last"), "ieee", False),  # exact fp32
            (Case(2, 32, 64, 37, 45, (3, 3), padding=(1, 1), x_layout="channels_last"), "tf32x3", False),
            # Strided boxes: the warp-specialized kernel's tap per K step reads them; patches need stride 1.
            (Case(2, 32, 64, 38, 46, (3, 3), stride=(2, 2), padding=(1, 1)), "tf32", name == "ws_candidates"),
            (Case(2, 32, 64, 37, 45, (3, 3), padding=(1, 1), groups=2), "tf32", False)]:
        forget()
        del offered[:]
        run_case(case, "auto", precision)
        assert bool(offered) == expected, (case, precision)


# ---------------------------------------------------------------- 64-bit offsets on real sizes

@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gemm_pointer", "depthwise", "auto", "gemm_tma"])
def test_tensors_past_2_to_the_31_elements(algorithm, one_candidate):
    if _needs_tma(algorithm):
        pytest.skip("TMA needs sm_90+")
    n, c, h, w = 130, 16, 1024, 1024  # 2.18e9 elements per activation
    groups = c if algorithm == "depthwise" else 1
    x = torch.randn(n, c, h, w, device=DEV, dtype=torch.float16)
    if algorithm == "gemm_tma":
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c, c // groups, 3, 3, device=DEV, dtype=torch.float16)
    y = launch_conv2d(x, wt, None, (1, 1), (1, 1), (1, 1), groups, "ieee", algorithm)
    # The last images sit past element 2**31: check them (and the first) against float64.
    for sl in (slice(0, 1), slice(n - 2, n)):
        ref = reference(x[sl], wt, None, (1, 1), (1, 1), (1, 1), groups)
        assert rel_err(y[sl], ref) <= 1e-2
    del x, y
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- the backend on real models

class SeedProblem(nn.Module):
    """KernelBench level-1 #80: batch 8, 32->64 channels, 512x512, kernel 5x9, padding (2,4), dilation (2,3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 64, (5, 9), stride=1, padding=(2, 4), dilation=(2, 3), bias=False)

    def forward(self, x):
        return self.conv(x)


def test_seed_problem_full_shape_through_compile(kernel_launches):
    model = SeedProblem().to(DEV)
    x = torch.randn(8, 32, 512, 512, device=DEV)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv")(x)
        eager = model(x)
        ref = F.conv2d(x.double(), model.conv.weight.double(), None, 1, (2, 4), (2, 3))
    report = last_report()
    assert len(report.replaced) == 1 and not report.kept, str(report)
    assert kernel_launches, "no Triton kernel ran"
    tf32 = conv_backend.runtime.cudnn_conv_allows_tf32()
    bound = 2e-3 if tf32 else 1e-5
    assert rel_err(out, ref) <= bound
    assert rel_err(eager, ref) <= bound
    assert out.shape == eager.shape == (8, 64, 508, 496)  # padding (2, 4) does not cover dilation (2, 3)
    assert format_flags(out) == format_flags(eager)
    del ref
    torch.cuda.empty_cache()


class Block(nn.Module):
    """A ResNet basic block with a strided 1x1 downsample, then a depthwise-separable pair."""

    def __init__(self, cin=32, cout=64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
        self.dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout)
        self.pw = nn.Conv2d(cout, cout, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + self.down(x))
        return self.pw(F.relu(self.dw(y)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet_block_training_step(channels_last, one_candidate, kernel_launches):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Block().to(DEV).to(memory_format=fmt)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 32, 40, 36, device=DEV).to(memory_format=fmt)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(model, backend="tritonconv")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # exact fp32 on both sides ("auto" follows)
        out = compiled(x1)
        ref = twin(x2)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert format_flags(out) == format_flags(ref)
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
    # Gradients pass through BatchNorm's batch statistics, which amplify last-bit differences of
    # single elements: compare whole tensors (a wrong kernel is off by O(1)).
    assert rel_err(x1.grad, x2.grad) <= 2e-4
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        err = rel_err(p.grad, q.grad)
        assert err <= 2e-4, f"{name}: relative error {err:.3g}"
    report = last_report()
    assert len([d for d in report.replaced if d.graph.startswith("forward")]) == 5
    assert {"igemm_pointer_kernel", "depthwise_kernel"} <= set(kernel_launches.names)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_resnet_block_inference_bf16(mode, one_candidate):
    model = Block().to(DEV).eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 40, 36, device=DEV, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        out = torch.compile(model, backend="tritonconv")(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    assert rel_err(out, ref64) <= 2e-2  # bf16 activations between layers
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert len(last_report().replaced) == 5


def test_float64_conv_on_cuda_falls_back(kernel_launches):
    model = nn.Conv2d(8, 8, 3).to(DEV).double()
    x = torch.randn(2, 8, 9, 9, device=DEV, dtype=torch.float64)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv")(x)
    torch.testing.assert_close(out, model(x))
    assert not last_report().replaced and not kernel_launches


# ---------------------------------------------------------------- tuning cache across processes

def test_warm_process_does_not_retune(monkeypatch, kernel_launches):
    for module, name in CANDIDATE_FUNCTIONS:  # a short tuning run: three configs per family
        full = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _full=full, **k: _full(*a, **k)[:3])
    case = Case(2, 32, 64, 35, 29, (3, 3), padding=(1, 1), x_layout="channels_last")
    run_case(case, "auto", "ieee")
    assert tuning.cache_path().exists(), "the first process must persist its choice"
    chosen = kernel_launches[-1]
    forget()  # a new process: nothing in memory, the file on disk

    def must_not_benchmark(*args, **kwargs):
        raise AssertionError("a warm process re-tuned")

    monkeypatch.setattr(tuning, "_benchmark", must_not_benchmark)
    del kernel_launches[:]
    run_case(case, "auto", "ieee")
    assert len(kernel_launches) == 1
    name, kwargs = kernel_launches[0]
    assert name == chosen[0]
    assert {k: v for k, v in kwargs.items() if k.startswith("BLOCK")} == \
        {k: v for k, v in chosen[1].items() if k.startswith("BLOCK")}


@pytest.mark.skipif(not hasattr(triton, "AsyncCompileMode"), reason="this Triton has no AsyncCompileMode")
def test_cold_tuning_compiles_candidates_in_compile_threads(monkeypatch, tmp_path, kernel_launches):
    """A cold tuning run compiles its candidates ahead in the tuner's compile threads, not while timing them
    on the calling thread, and the plan it picks is right."""
    import collections
    import threading

    import triton.compiler
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", "4")
    monkeypatch.setenv("TRITONCONV_AUTOTUNE", "exhaustive")  # every candidate compiled ahead, not a short list
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # Triton's disk cache: compile from scratch
    compiled_on = []
    real_compile = triton.compiler.compile

    def compile_and_note(*args, **kwargs):
        compiled_on.append(threading.current_thread().name)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(triton.compiler, "compile", compile_and_note)
    for kernel in (igemm_mod.igemm_pointer_kernel, igemm_mod.igemm_tma_kernel, igemm_mod.igemm_nchw_kernel):
        # Forget what earlier tests compiled in this process; each new binder takes triton.compiler.compile.
        monkeypatch.setattr(kernel, "compile", real_compile, raising=False)  # put back after the test
        monkeypatch.setattr(kernel, "device_caches", collections.defaultdict(kernel.create_binder))
    case = Case(3, 24, 40, 9, 9, (3, 3), padding=(1, 1), x_layout="channels_last", dtype=torch.bfloat16)
    run_case(case, "auto", "ieee")
    assert len(compiled_on) >= 5, compiled_on
    assert all(name.startswith("tritonconv-compile") for name in compiled_on), compiled_on
    assert kernel_launches, "the tuned plan launched nothing"


# ---------------------------------------------------------------- TF32 flag states

PRECISION_KNOBS = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn")]


@pytest.fixture
def conv_precision_none():
    if not hasattr(torch._C, "_get_fp32_precision_getter"):
        pytest.skip("torch without per-op fp32_precision")
    saved = [torch._C._get_fp32_precision_getter(*k) for k in PRECISION_KNOBS]
    torch.backends.cudnn.conv.fp32_precision = "none"
    yield
    for knob, value in zip(PRECISION_KNOBS, saved):
        torch._C._set_fp32_precision_setter(*knob, value)


def _big_k_problem():
    x = torch.randn(2, 256, 24, 24, device=DEV)
    w = torch.randn(256, 256, 3, 3, device=DEV)
    return x, w, reference(x, w, None, 1, 1, 1, 1)


def test_cudnn_conv_precision_none_means_exact_fp32(conv_precision_none):
    """Evidence for the expected value below: with conv precision 'none', cuDNN computes exact fp32."""
    x, w, ref = _big_k_problem()
    assert rel_err(F.conv2d(x, w, None, 1, 1), ref) <= 1e-5


def test_auto_precision_with_conv_precision_none(conv_precision_none, one_candidate):
    """Regression: runtime.cudnn_conv_allows_tf32 raised in this state (mixed conv/rnn flags)."""
    x, w, ref = _big_k_problem()
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "auto", "gemm_pointer")
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "ieee"), (torch.float32, "tf32")], ids=["bf16", "tf32"])
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("path", ["pointer", "tma", "gather"])
def test_split_k_slices_sum_right_on_gpu(path, split, dtype, precision, monkeypatch, kernel_launches):
    """Real atomics and memory ordering: every launch must find the partial tiles complete, only the
    last slice of a tile may store it, and each launch must leave the arrival counters at zero
    (three launches in a row, each checked). `gather`: the pointer kernel with TMA weights."""
    if path != "pointer" and not hopper():
        pytest.skip("TMA needs sm_90+")
    case = Case(8, 256, 192, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last", dtype=dtype)
    family = f"{path}_candidates"
    base = (igemm_mod.tma_candidates(256, 192, 7, 7, 8, 1, dtype) if path == "tma"
            else getattr(igemm_mod, family)(256, 192, dtype))[0]
    cand = tuning.Candidate.make(base.kernel, base.num_warps, base.num_stages, **{**base.params, "SPLIT_K": split})
    for other in ("tma_candidates", "pointer_candidates", "gather_candidates", "split_k_candidates"):
        monkeypatch.setattr(igemm_mod, other, lambda *a, **k: [])
    monkeypatch.setattr(igemm_mod, family, lambda *a, **k: [cand])
    monkeypatch.setattr(halo_mod, "halo_candidates", lambda *a, **k: [])
    forget()
    for _ in range(3):
        run_case(case, "auto" if path == "gather" else f"gemm_{path}", precision, kernel_launches)
    assert [meta["SPLIT_K"] for _, meta in kernel_launches] == [split] * 3
    assert all(meta.get("TMA_WEIGHTS", False) == (path == "gather") for _, meta in kernel_launches)


@pytest.mark.parametrize("algorithm", ["gemm_pointer", "gemm_nchw", "depthwise"] + (["gemm_tma"] if hopper() else []))
def test_direct_launch_on_side_stream_and_in_cuda_graph(algorithm, one_candidate, monkeypatch):
    """After its first launch a kernel skips the JIT; those launches must land on the caller's stream
    and be capturable in a CUDA graph that replays with new input values."""
    from conv_backend.kernels.common import KernelLauncher
    launchers = []  # those that launched (the tuner's compile-only calls launch nothing)
    real_call = KernelLauncher.__call__

    def call(self, *args):
        if not tuning.compiling_only.get():
            launchers.append(self)
        return real_call(self, *args)

    monkeypatch.setattr(KernelLauncher, "__call__", call)
    groups = 32 if algorithm == "depthwise" else 1
    layout = "contiguous" if algorithm == "gemm_nchw" else "channels_last"
    case = Case(4, 32, 64, 20, 21, (3, 3), padding=(1, 1), groups=groups, x_layout=layout, dtype=torch.bfloat16)
    x, w, b = case.tensors(DEV)
    forget()
    launch_conv2d(x, w, b, *case.args(), "ieee", algorithm)  # compiles, through the JIT
    assert launchers and all(k._direct is not None for k in launchers)
    from triton.runtime.jit import JITFunction
    jit_runs = []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: jit_runs.append(self) or real_run(self, *a, **k))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = launch_conv2d(x, w, b, *case.args(), "ieee", algorithm)
    side.synchronize()
    assert rel_err(y, reference(x, w, b, *case.args())) <= tolerance(x.dtype)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y_graph, reference(x, w, b, *case.args())) <= tolerance(x.dtype)
    assert not jit_runs, "launches after the first went through the JIT"


# ---------------------------------------------------------------- default fp32 precision keeps eager's accuracy

@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_default_precision_keeps_eager_accuracy(arch, one_candidate):
    """With default options (TF32 allowed, as eager's cuDNN has it by default) a whole model's output stays
    within twice eager's own error against float64, or 1e-3 where that is larger: TF32 only where
    runtime.choose_fp32_precision lets it pay, not in every layer."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    model64 = copy.deepcopy(model).to(DEV, torch.float64)
    model = model.to(DEV)
    x = torch.randn(8, 3, 224, 224, device=DEV)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        out = torch.compile(model, backend="tritonconv")(x)
        eager = model(x)
        ref = model64(x.double())
    assert last_report().replaced
    eager_err, err = rel_err(eager, ref), rel_err(out, ref)
    assert err <= max(2 * eager_err, 1e-3), f"{arch}: tritonconv {err:.2e}, eager {eager_err:.2e} against float64"
