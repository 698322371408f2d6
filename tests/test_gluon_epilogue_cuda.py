"""GPU tests (pytest -m cuda, a Hopper GPU): the fused epilogue (batch norm, residual, activation) of the Gluon
kernels, every config the tuner may pick, against epilogue.apply_reference on a float64 convolution.

The launchers are called directly, with the flags implicit_gemm._launcher builds, so these tests do not depend
on how the plan offers fused problems. Bounds on ||out - ref|| / ||ref|| as in test_cuda.py: TF32 2e-3,
fp16/bf16 1e-2.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import conv_backend.kernels.halo as halo_mod
import conv_backend.kernels.implicit_gemm as igemm_mod
import conv_backend.kernels.warp_specialized as ws_mod
from conv_backend.epilogue import ACTIVATIONS, Epilogue, EpilogueTensors, apply_reference
from conv_backend.kernels.common import needs_int64

from _util import Case, reference, rel_err, tolerance

pytestmark = pytest.mark.cuda
DEV = "cuda"
# (dtype, precision, output layout): every candidate runs each dtype once, which covers each store path: fp32
# and 16-bit from the MMA layout (into channels_last and NCHW), 16-bit through shared memory (channels_last).
RUNS = [(torch.float32, "tf32", "channels_last"), (torch.bfloat16, "ieee", "channels_last"),
        (torch.float16, "ieee", "nchw")]
RUN_IDS = ["tf32-nhwc", "bf16-nhwc", "fp16-nchw"]
BN_ADD_RELU = Epilogue(batch_norm=True, bn_eps=1e-5, residual=True, activation="relu")
ACTIVATION_PARAMS = {"hardtanh": (-0.5, 6.0), "leaky_relu": (0.1,)}


def gluon_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and halo_mod.gluon is not None


needs_gluon_hopper = pytest.mark.skipif(not gluon_hopper(), reason="the Gluon kernels are code for sm_90")


def make_output(shape, layout: str, dtype) -> torch.Tensor:
    """An output-shaped tensor: "nchw", "channels_last", or "channels_last_sliced" (channels 4.. of a wider
    channels_last tensor: pixels evenly spaced, but not dense)."""
    if layout == "nchw":
        return torch.randn(shape, device=DEV).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, device=DEV).to(dtype).to(memory_format=torch.channels_last)
    if layout == "channels_last_sliced":
        n, c, h, w = shape
        wide = torch.randn(n, c + 8, h, w, device=DEV).to(dtype).to(memory_format=torch.channels_last)
        return wide[:, 4:c + 4]
    raise ValueError(layout)


def epilogue_tensors(epilogue: Epilogue, shape, residual_layout: str, dtype) -> EpilogueTensors:
    """Random batch-norm vectors (fp32, or the convolution's dtype for fp16, as a half-precision model keeps
    them) and a residual in `residual_layout`, for the steps `epilogue` has."""
    oc = shape[1]
    vectors = (None,) * 4
    if epilogue.batch_norm:
        bn_dtype = dtype if dtype == torch.float16 else torch.float32
        vectors = tuple(t.to(bn_dtype) for t in (torch.randn(oc, device=DEV), torch.rand(oc, device=DEV) + 0.5,
                                                 torch.randn(oc, device=DEV), torch.randn(oc, device=DEV)))
    residual = make_output(shape, residual_layout, dtype) if epilogue.residual else None
    return EpilogueTensors(*vectors, residual)


def fused_launch(cand, case: Case, precision: str, epilogue: Epilogue, x, w, b, y, residual_strides):
    """The launcher's launch(x, w, b, y, epi) for `cand` with `epilogue` fused, flags as implicit_gemm._launcher
    builds them."""
    stride, padding, dilation, _ = case.args()
    flags = dict(KH=case.kernel[0], KW=case.kernel[1], HAS_BIAS=b is not None, INPUT_PRECISION=precision,
                 USE_INT64=needs_int64(x, w, y), UPCAST_DOT=False, num_warps=cand.num_warps,
                 num_stages=cand.num_stages, **cand.params, bias_stride=b.stride(0) if b is not None else 0,
                 epilogue=epilogue, residual_strides=residual_strides)
    if cand.kernel == "igemm_halo":
        return halo_mod.halo_launcher(cand, x, w, y, padding, dilation, flags)
    maps = igemm_mod._tma_maps(x, y, igemm_mod._flat_pixels(w, y, stride, padding))
    return ws_mod.ws_launcher(cand, maps, w, y, stride, padding, dilation, flags)


def check_fused(y, x, w, b, case: Case, precision: str, epilogue: Epilogue, tensors: EpilogueTensors, label: str):
    wide = EpilogueTensors(*(None if t is None else t.double() for t in tensors))
    ref = apply_reference(reference(x, w, b, *case.args()), epilogue, wide)
    err = rel_err(y, ref)
    assert err <= tolerance(case.dtype, precision), f"{label} {epilogue.describe()}: relative error {err:.3g}"


def new_output(case: Case, y_layout: str) -> torch.Tensor:
    out_h, out_w = case.out_hw()
    y = torch.empty((case.n, case.oc, out_h, out_w), device=DEV, dtype=case.dtype)
    return y.to(memory_format=torch.channels_last) if y_layout == "channels_last" else y


def run_fused(cand, case: Case, precision: str, epilogue: Epilogue, y_layout: str, residual_layout: str):
    """Run `cand` with `epilogue` fused once, into a `y_layout` output with a `residual_layout` residual; check
    it against float64 ATen."""
    x, w, b = case.tensors(DEV)
    y = new_output(case, y_layout)
    tensors = epilogue_tensors(epilogue, y.shape, residual_layout, case.dtype)
    residual_strides = tuple(tensors.residual.stride()) if tensors.residual is not None else (0, 0, 0, 0)
    fused_launch(cand, case, precision, epilogue, x, w, b, y, residual_strides)(x, w, b, y, tensors)
    torch.cuda.synchronize()
    check_fused(y, x, w, b, case, precision, epilogue, tensors,
                f"{cand.describe()} y {y_layout} residual {residual_layout}")


def tma_maps(case: Case, y_layout: str) -> tuple:
    """(images, output height, output width) as the warp-specialized kernel sees them (a 1x1 into channels_last
    is one row of all the pixels)."""
    out_h, out_w = case.out_hw()
    if case.kernel == (1, 1) and case.stride == (1, 1) and case.padding == (0, 0) and y_layout == "channels_last":
        return 1, 1, case.n * out_h * out_w
    return case.n, out_h, out_w


def residual_layout_for(case: Case, y_layout: str) -> str:
    """A residual in another layout than the output: NCHW for channels_last outputs, except where the output is
    one flat row of pixels (then a channel slice of a wider channels_last tensor); channels_last for NCHW."""
    if y_layout == "nchw":
        return "channels_last"
    return "channels_last_sliced" if tma_maps(case, y_layout)[0] == 1 and case.kernel == (1, 1) else "nchw"


@pytest.fixture
def three_programs(monkeypatch):
    """Three persistent programs, each looping over many tiles: both consumers of a two-consumer config store
    tiles (with one program per SM a small problem gives each program one tile)."""
    monkeypatch.setattr(ws_mod, "persistent_programs", lambda tiles, device: min(tiles, 3))


HALO_CASE = Case(2, 48, 72, 23, 37, (3, 3), padding=(1, 1))  # a partial channel chunk and a partial N tile
WS_CASES = [
    Case(2, 48, 72, 23, 37, (3, 3), padding=(1, 1)),
    # A 1x1: into channels_last one row of all 2*17*15 pixels (the residual follows that row), else 2 maps.
    Case(2, 64, 96, 17, 15, (1, 1), bias=False),
]


@needs_gluon_hopper
@pytest.mark.parametrize("dtype,precision,y_layout", RUNS, ids=RUN_IDS)
def test_every_halo_candidate_fuses_bn_add_relu(dtype, precision, y_layout):
    if not halo_mod.unaligned_views_supported():
        pytest.skip("this Triton does not compile the halo kernel's views")
    case = dataclasses.replace(HALO_CASE, dtype=dtype)
    out_h, out_w = case.out_hw()
    cands = halo_mod.halo_candidates(case.c, case.oc, out_h, out_w, case.kernel[0], case.dilation[0], dtype)
    assert cands
    for cand in cands:
        run_fused(cand, case, precision, BN_ADD_RELU, y_layout, residual_layout_for(case, y_layout))


@needs_gluon_hopper
@pytest.mark.parametrize("dtype,precision,y_layout", RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("case", WS_CASES, ids=[f"ws-{i}" for i in range(len(WS_CASES))])
def test_every_ws_candidate_fuses_bn_add_relu(case, dtype, precision, y_layout, three_programs):
    """Every store path: the MMA layout's, the blocked store (16-bit into channels_last), pixels as N with
    split consumers, two consumers taking turns; NCHW and channels_last outputs, flat 1x1 problems."""
    case = dataclasses.replace(case, dtype=dtype)
    n, out_h, out_w = tma_maps(case, y_layout)
    cands = ws_mod.ws_candidates(case.c, case.oc, n, out_h, out_w, dtype, sms=1, strided=case.stride != (1, 1))
    assert cands
    for cand in cands:
        run_fused(cand, case, precision, BN_ADD_RELU, y_layout, residual_layout_for(case, y_layout))


@needs_gluon_hopper
@pytest.mark.parametrize("dtype,precision,y_layout", RUNS, ids=RUN_IDS)
def test_every_ws_patch_candidate_fuses_bn_add_relu(dtype, precision, y_layout, three_programs):
    if not ws_mod.unaligned_views_supported():
        pytest.skip("this Triton does not compile the patch variant's views")
    case = dataclasses.replace(WS_CASES[0], dtype=dtype)
    out_h, out_w = case.out_hw()
    cands = ws_mod.ws_halo_candidates(case.c, case.oc, case.n, out_h, out_w, case.kernel[0], case.dilation[0], dtype,
                                      sms=1)
    assert cands
    for cand in cands:
        run_fused(cand, case, precision, BN_ADD_RELU, y_layout, residual_layout_for(case, y_layout))


def first_ws_candidate(case: Case, y_layout: str, pixels_as_n: bool):
    n, out_h, out_w = tma_maps(case, y_layout)
    return next(c for c in ws_mod.ws_candidates(case.c, case.oc, n, out_h, out_w, case.dtype, sms=1)
                if c.params["PIXELS_AS_N"] == pixels_as_n)


@needs_gluon_hopper
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_ws_activations(activation):
    """Each activation after batch norm and a residual, on one config (bf16 through the blocked store)."""
    case = Case(1, 64, 128, 21, 26, (3, 3), padding=(1, 1), dtype=torch.bfloat16)
    cand = first_ws_candidate(case, "channels_last", False)
    epilogue = Epilogue(batch_norm=True, bn_eps=1e-3, residual=True, activation=activation,
                        activation_params=ACTIVATION_PARAMS.get(activation, ()))
    run_fused(cand, case, "ieee", epilogue, "channels_last", "channels_last_sliced")


@needs_gluon_hopper
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_halo_activations(activation):
    if not halo_mod.unaligned_views_supported():
        pytest.skip("this Triton does not compile the halo kernel's views")
    case = dataclasses.replace(HALO_CASE, dtype=torch.bfloat16)
    out_h, out_w = case.out_hw()
    cand = halo_mod.halo_candidates(case.c, case.oc, out_h, out_w, 3, 1, case.dtype)[0]
    epilogue = Epilogue(batch_norm=True, bn_eps=1e-5, residual=True, activation=activation,
                        activation_params=ACTIVATION_PARAMS.get(activation, ()))
    run_fused(cand, case, "ieee", epilogue, "channels_last", "nchw")


@needs_gluon_hopper
@pytest.mark.parametrize("dtype,precision,y_layout,pixels_as_n", [
    (torch.float32, "tf32", "nchw", False),            # the MMA layout's stores
    (torch.bfloat16, "ieee", "channels_last", False),  # the blocked store
    (torch.float16, "ieee", "channels_last", True),    # channels as rows, split consumers
], ids=["tf32-mma", "bf16-blocked", "fp16-pixels-as-n"])
def test_residual_in_the_output_layout(dtype, precision, y_layout, pixels_as_n):
    """A residual with the output's strides is read through the store's offsets (RESIDUAL_AS_Y)."""
    case = Case(1, 64, 128, 21, 26, (3, 3), padding=(1, 1), dtype=dtype)
    run_fused(first_ws_candidate(case, y_layout, pixels_as_n), case, precision, BN_ADD_RELU, y_layout, y_layout)
    if halo_mod.unaligned_views_supported() and not pixels_as_n:
        out_h, out_w = case.out_hw()
        cand = halo_mod.halo_candidates(case.c, case.oc, out_h, out_w, 3, 1, dtype)[0]
        run_fused(cand, case, precision, BN_ADD_RELU, y_layout, y_layout)


@needs_gluon_hopper
def test_batch_norm_reads_live_statistics():
    """One launch, two calls: statistics and affine parameters changed in place between them reach the second
    call's output (a plan is built once and called many times)."""
    case = Case(1, 64, 128, 21, 26, (3, 3), padding=(1, 1), dtype=torch.bfloat16)
    cand = first_ws_candidate(case, "channels_last", False)
    epilogue = Epilogue(batch_norm=True, bn_eps=1e-5, activation="relu")
    x, w, b = case.tensors(DEV)
    y = new_output(case, "channels_last")
    tensors = epilogue_tensors(epilogue, y.shape, "nchw", case.dtype)
    launch = fused_launch(cand, case, "ieee", epilogue, x, w, b, y, (0, 0, 0, 0))
    launch(x, w, b, y, tensors)
    first = y.clone()
    check_fused(first, x, w, b, case, "ieee", epilogue, tensors, cand.describe())
    tensors.bn_mean.add_(1.0)
    tensors.bn_weight.mul_(-2.0)
    launch(x, w, b, y, tensors)
    torch.cuda.synchronize()
    check_fused(y, x, w, b, case, "ieee", epilogue, tensors, cand.describe())
    assert not torch.equal(first, y)


@needs_gluon_hopper
@pytest.mark.parametrize("kernel,y_layout", [("ws", "channels_last"), ("ws", "nchw"), ("halo", "channels_last")])
def test_fp32_output_rounded_to_tf32(kernel, y_layout):
    """Epilogue.round_tf32 (conv_backend/tf32.py): after batch norm, the residual and ReLU, every value stored
    is a TF32 value (low 13 mantissa bits zero), within TF32's tolerance of the float64 reference."""
    if kernel == "halo" and not halo_mod.unaligned_views_supported():
        pytest.skip("this Triton does not compile the halo kernel's views")
    case = dataclasses.replace(HALO_CASE if kernel == "halo" else WS_CASES[0], dtype=torch.float32)
    out_h, out_w = case.out_hw()
    cand = (halo_mod.halo_candidates(case.c, case.oc, out_h, out_w, 3, 1, case.dtype)[0] if kernel == "halo"
            else first_ws_candidate(case, y_layout, False))
    epilogue = dataclasses.replace(BN_ADD_RELU, round_tf32=True)
    x, w, b = case.tensors(DEV)
    y = new_output(case, y_layout)
    tensors = epilogue_tensors(epilogue, y.shape, residual_layout_for(case, y_layout), case.dtype)
    fused_launch(cand, case, "tf32", epilogue, x, w, b, y, tuple(tensors.residual.stride()))(x, w, b, y, tensors)
    torch.cuda.synchronize()
    assert not (y.view(torch.int32) & 0x1FFF).any(), f"{cand.describe()}: a stored value is not a TF32 value"
    check_fused(y, x, w, b, case, "tf32", epilogue, tensors, cand.describe())
