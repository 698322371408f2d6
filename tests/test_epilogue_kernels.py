"""The fused epilogue (conv_backend/epilogue.py) in every `tl` kernel family, against epilogue.apply_reference
on a float64 ATen convolution.

The CPU tests run through Triton's interpreter on tiny shapes, each kernel forced through its plan builder
(implicit_gemm_plan, depthwise_plan) by making its candidate function offer one config. The GPU tests
(`cuda`) run every config each family offers on realistic shapes.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import conv_backend.kernels.depthwise as depthwise_mod
import conv_backend.kernels.halo as halo_mod
import conv_backend.kernels.implicit_gemm as igemm_mod
import conv_backend.kernels.seed as seed_mod
import conv_backend.kernels.warp_specialized as ws_mod
from conv_backend import tuning
from conv_backend.epilogue import ACTIVATIONS, IDENTITY, NO_TENSORS, Epilogue, EpilogueTensors, apply_reference
from conv_backend.kernels.epilogue_tl import epilogue_key

from _util import Case, make_input, reference, rel_err, tolerance

Candidate = tuning.Candidate
IGEMM_CANDIDATE_FUNCTIONS = ("tma_candidates", "pointer_candidates", "gather_candidates", "nchw_candidates",
                             "split_k_candidates", "seed_candidates")
GLUON_CANDIDATE_FUNCTIONS = ((halo_mod, "halo_candidates"), (ws_mod, "ws_candidates"),
                             (ws_mod, "ws_halo_candidates"))
# Parameters of the activations that take some (hardtanh other than ReLU6, so both bounds show).
ACTIVATION_PARAMS = {"hardtanh": (-1.0, 2.0), "leaky_relu": (0.2,)}


class Family(NamedTuple):
    """One kernel (variant), how a plan builder is made to offer only `cand`, and a problem it takes."""

    cand: Candidate
    offered_by: str       # igemm_mod's candidate function, or "depthwise_candidates"
    load_path: str        # implicit_gemm_plan's load_path (unused for depthwise)
    kernel: str           # the Triton function it launches
    case: Case
    residual_layout: str  # unlike the output's layout (eager's: channels_last for channels_last inputs)
    activation: str


POINTER = Candidate.make("igemm_pointer", BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)
FAMILIES = {
    "pointer": Family(POINTER, "pointer_candidates", "pointer", "igemm_pointer_kernel",
                      Case(2, 6, 10, 5, 6, (3, 3), padding=(1, 1), x_layout="channels_last"), "contiguous", "relu"),
    "pointer_tma_weights": Family(
        Candidate.make("igemm_pointer", BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, TMA_WEIGHTS=True),
        "pointer_candidates", "pointer", "igemm_pointer_kernel",
        Case(2, 6, 10, 5, 6, (3, 3), padding=(1, 1), x_layout="channels_last"), "contiguous", "silu"),
    "pointer_split_k": Family(
        Candidate.make("igemm_pointer", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, SPLIT_K=3),
        "pointer_candidates", "pointer", "igemm_pointer_kernel",
        Case(1, 40, 12, 5, 4, (3, 2), stride=(2, 1), padding=(1, 1), x_layout="channels_last"), "contiguous",
        "gelu"),
    "tma": Family(Candidate.make("igemm_tma", BLOCK_B=1, BLOCK_H=4, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16),
                  "tma_candidates", "tma", "igemm_tma_kernel",
                  Case(2, 8, 10, 5, 6, (3, 3), padding=(1, 1), x_layout="channels_last"), "contiguous", "hardswish"),
    "tma_split_k": Family(Candidate.make("igemm_tma", BLOCK_B=1, BLOCK_H=4, BLOCK_W=8, BLOCK_N=16, BLOCK_K=16,
                                         SPLIT_K=2),
                          "tma_candidates", "tma", "igemm_tma_kernel",
                          Case(1, 32, 12, 5, 6, (3, 3), padding=(1, 1), x_layout="channels_last"), "contiguous",
                          "leaky_relu"),
    "nchw": Family(Candidate.make("igemm_nchw", BLOCK_M=16, BLOCK_N=32, BLOCK_K=16), "nchw_candidates", "nchw",
                   "igemm_nchw_kernel", Case(2, 6, 10, 5, 6, (3, 3), padding=(1, 1)), "channels_last", "tanh"),
    "nchw_flat": Family(Candidate.make("igemm_nchw", BLOCK_M=16, BLOCK_N=32, BLOCK_K=16), "nchw_candidates", "nchw",
                        "igemm_nchw_kernel", Case(2, 6, 10, 5, 6, (1, 1)), "channels_last", "hardsigmoid"),
    "nchw_streamed": Family(Candidate.make("igemm_nchw", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TILES=2),
                            "nchw_candidates", "nchw", "igemm_nchw_streamed_kernel", Case(3, 8, 10, 5, 6, (1, 1)),
                            "channels_last", "sigmoid"),
    "seed_direct": Family(Candidate.make("seed_direct", num_warps=4, num_stages=2, BLOCK_OC=16, BLOCK_HW=32,
                                         BLOCK_K=16),
                          "seed_candidates", "auto", "seed_conv2d_kernel",
                          Case(2, 3, 10, 7, 6, (3, 3), stride=(2, 1), padding=(1, 1)), "sliced", "gelu_tanh"),
    "depthwise": Family(Candidate.make("depthwise", BLOCK_H=4, BLOCK_W=8, BLOCK_C=4), "depthwise_candidates", "",
                        "depthwise_kernel", Case(2, 4, 8, 7, 6, (3, 3), stride=(2, 1), padding=(1, 1), groups=4,
                                                 x_layout="channels_last"), "contiguous", "hardtanh"),
    "depthwise_streamed": Family(Candidate.make("depthwise", BLOCK_H=4, BLOCK_W=8, BLOCK_C=4, STREAM_ROWS=1),
                                 "depthwise_candidates", "", "depthwise_kernel",
                                 Case(2, 4, 4, 7, 6, (3, 3), padding=(1, 1), groups=4), "transposed_hw", "relu"),
}


def epilogue_of(activation: str = "none", batch_norm: bool = False, residual: bool = False) -> Epilogue:
    return Epilogue(batch_norm=batch_norm, bn_eps=1e-3 if batch_norm else 0.0, residual=residual,
                    activation=activation, activation_params=ACTIVATION_PARAMS.get(activation, ()))


def tensors(case: Case, device="cpu"):
    """The case's x, w, b with weights scaled so outputs are O(1): activations see both sides of their bends."""
    x, w, b = case.tensors(device)
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    return x, (w.float() * (2.0 / fan_in ** 0.5)).to(w.dtype), b


def epilogue_tensors(epilogue: Epilogue, y_shape, dtype, bn_dtype=torch.float32, residual_layout="contiguous",
                     device="cpu") -> EpilogueTensors:
    oc = y_shape[1]
    if not epilogue.batch_norm:
        bn = (None,) * 4
    else:
        bn = (torch.randn(oc, device=device).to(bn_dtype), (torch.rand(oc, device=device) + 0.5).to(bn_dtype),
              torch.randn(oc, device=device).to(bn_dtype), torch.randn(oc, device=device).to(bn_dtype))
    res = make_input(tuple(y_shape), residual_layout, dtype, device) if epilogue.residual else None
    return EpilogueTensors(*bn, residual=res)


def expected(x, w, b, case: Case, epilogue: Epilogue, epi: EpilogueTensors):
    conv = reference(x, w, b, *case.args())
    return apply_reference(conv, epilogue, EpilogueTensors(*(None if t is None else t.double() for t in epi)))


def offer(monkeypatch, family: Family, offered) -> None:
    """Make the family's plan builder offer what `offered(*args)` returns (its candidate function's args)."""
    if family.offered_by == "depthwise_candidates":
        monkeypatch.setattr(depthwise_mod, "depthwise_candidates", offered)
        return
    for name in IGEMM_CANDIDATE_FUNCTIONS:
        monkeypatch.setattr(igemm_mod, name, lambda *a, **k: [])
    for module, name in GLUON_CANDIDATE_FUNCTIONS:  # offered beside the TMA path where a GPU has Gluon
        monkeypatch.setattr(module, name, lambda *a, **k: [])
    monkeypatch.setattr(igemm_mod, family.offered_by, offered)


def build_plan(family: Family, x, w, b, case: Case, epilogue: Epilogue, epi: EpilogueTensors):
    if family.offered_by == "depthwise_candidates":
        return depthwise_mod.depthwise_plan(x, w, b, case.stride, case.padding, case.dilation, epilogue=epilogue,
                                            epi=epi)
    return igemm_mod.implicit_gemm_plan(x, w, b, *case.args(), "ieee", family.load_path, epilogue=epilogue, epi=epi)


def plan_for(family: Family, monkeypatch, x, w, b, case: Case, epilogue: Epilogue, epi: EpilogueTensors,
             cand: Candidate | None = None):
    """The family's plan builder, made to offer `cand` (the family's config by default) alone."""
    offer(monkeypatch, family, lambda *a, _cand=cand or family.cand, **k: [_cand])
    return build_plan(family, x, w, b, case, epilogue, epi)


def check_fused(family: Family, monkeypatch, launches, epilogue: Epilogue, case: Case | None = None,
                bn_dtype=torch.float32, calls: int = 2, cand: Candidate | None = None, device="cpu",
                residual_layout: str | None = None) -> dict:
    """Plan once, run `calls` times with new epilogue tensors each time (they are read live), each against
    float64. Returns the first launch's meta."""
    case = case or family.case
    residual_layout = residual_layout or family.residual_layout
    x, w, b = tensors(case, device)
    y_shape = (case.n, case.oc, *case.out_hw())
    epi = epilogue_tensors(epilogue, y_shape, x.dtype, bn_dtype, residual_layout, device)
    plan = plan_for(family, monkeypatch, x, w, b, case, epilogue, epi, cand)
    kernel = "igemm_nchw_streamed_kernel" if cand is not None and "TILES" in cand.params else family.kernel
    for call in range(calls):
        if call:
            epi = epilogue_tensors(epilogue, y_shape, x.dtype, bn_dtype, residual_layout, device)
        y = plan(x, w, b, epi)
        err = rel_err(y, expected(x, w, b, case, epilogue, epi))
        assert err <= tolerance(x.dtype), f"{kernel} {epilogue.describe()} call {call}: relative error {err:.3g}"
    assert launches.names == [kernel] * calls
    return launches[0][1]


# ---------------------------------------------------------------- CPU, through the interpreter

@pytest.mark.interpreter
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_every_activation(activation, monkeypatch, kernel_launches):
    meta = check_fused(FAMILIES["pointer"], monkeypatch, kernel_launches, epilogue_of(activation), calls=1)
    assert meta["ACTIVATION"] == activation and not meta["HAS_BN"] and not meta["HAS_RESIDUAL"]


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_activation_keeps_nan(activation, device, monkeypatch):
    """A NaN input pixel gives NaN where ATen's activation gives NaN (e.g. relu, hardsigmoid: GPU min/max
    drop NaN operands, so the clamps are compares), and the right values elsewhere."""
    family, epilogue = FAMILIES["pointer"], epilogue_of(activation)
    case = family.case
    x, w, b = tensors(case, device)
    x[0, 1, 2, 3] = float("nan")
    y = plan_for(family, monkeypatch, x, w, b, case, epilogue, NO_TENSORS)(x, w, b)
    ref = expected(x, w, b, case, epilogue, NO_TENSORS)
    assert ref.isnan().any()
    assert torch.equal(y.isnan().cpu(), ref.isnan().cpu())
    finite = ~ref.isnan()
    assert rel_err(y[finite], ref[finite]) <= tolerance(x.dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bn_residual_activation(name, monkeypatch, kernel_launches):
    """Batch norm, a residual in another memory format than the output, and an activation, all in one
    kernel; split-K variants apply them once, to the sum of the slices."""
    family = FAMILIES[name]
    epilogue = epilogue_of(family.activation, batch_norm=True, residual=True)
    meta = check_fused(family, monkeypatch, kernel_launches, epilogue)
    assert meta["HAS_BN"] and meta["HAS_RESIDUAL"] and meta["ACTIVATION"] == family.activation


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_output_rounded_to_tf32(name, monkeypatch, kernel_launches):
    """Epilogue.round_tf32 (an fp32 output a TF32 convolution reads next): every value stored is a TF32 value
    (its low 13 mantissa bits zero), the nearest one to the unrounded result, after the other steps."""
    family = FAMILIES[name]
    rounded = dataclasses.replace(epilogue_of(family.activation, batch_norm=True), round_tf32=True)
    case = family.case
    x, w, b = tensors(case)
    epi = epilogue_tensors(rounded, (case.n, case.oc, *case.out_hw()), x.dtype)
    y = plan_for(family, monkeypatch, x, w, b, case, rounded, epi)(x, w, b, epi)
    assert kernel_launches[0][1]["ROUND_TF32"]
    assert not (y.view(torch.int32) & 0x1FFF).any(), "an output value is not a TF32 value"
    exact = expected(x, w, b, case, dataclasses.replace(rounded, round_tf32=False), epi)
    assert rel_err(y, exact) <= 2.0 ** -11  # at most half a TF32 ulp from each value
    assert rel_err(y, exact) > tolerance(x.dtype)  # the rounding did happen
    assert rel_err(y, expected(x, w, b, case, rounded, epi)) <= 1e-4  # ties aside, epilogue.round_to_tf32's


class NewStorages(TorchDispatchMode):
    """Every storage the ops run under it allocate (held weakly), for checking what outlives a call."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in known:  # new memory, not a view or an in-place result of an argument
                    self.refs.append(ref)
        return out


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_launch_keeps_no_memory_it_allocated(name, monkeypatch):
    """Once a call returns, nothing it allocated is alive but its output. CUDA-graph trees run a captured
    graph's calls in a memory pool of their own and refuse pool memory that outlives a call without being
    returned ("tensors in the cudagraph pool not tracked as outputs"): split-K's arrival counters kept for
    the next launch made every model with such a plan fail under the cudagraphs default."""
    family = FAMILIES[name]
    case = family.case
    epilogue = epilogue_of(family.activation, batch_norm=True, residual=True)
    x, w, b = tensors(case)
    epi = epilogue_tensors(epilogue, (case.n, case.oc, *case.out_hw()), case.dtype,
                           residual_layout=family.residual_layout)
    plan = None
    for call in range(3):  # the plan made (as a call that meets a new shape makes it) and run, then run twice
        with NewStorages() as allocated:
            if plan is None:
                plan = plan_for(family, monkeypatch, x, w, b, case, epilogue, epi)
            y = plan(x, w, b, epi)
        assert allocated.refs, "the call allocates at least its output"
        output = StorageWeakRef(y.untyped_storage())
        del y
        gc.collect()
        alive = [ref for ref in allocated.refs if not ref.expired() and ref != output]
        assert not alive, f"call {call}: {len(alive)} storage(s) allocated by the call outlive it"


@pytest.mark.interpreter
@pytest.mark.parametrize("name,dtype,bn_dtype", [("pointer", torch.bfloat16, torch.float32),
                                                 ("tma", torch.float16, torch.float32),
                                                 ("depthwise", torch.float16, torch.float16),
                                                 ("nchw", torch.bfloat16, torch.bfloat16)])
def test_batch_norm_statistics_dtype(name, dtype, bn_dtype, monkeypatch, kernel_launches):
    """16-bit convolutions with fp32 statistics (a model under autocast) or statistics in the conv's dtype."""
    family = FAMILIES[name]
    case = dataclasses.replace(family.case, dtype=dtype)
    if name == "tma":
        case = dataclasses.replace(case, c=16)  # 16-byte channel rows
    check_fused(family, monkeypatch, kernel_launches, epilogue_of(batch_norm=True), case, bn_dtype, calls=1)


TMA_1X1 = Family(FAMILIES["tma"].cand, "tma_candidates", "tma", "igemm_tma_kernel",
                 Case(2, 8, 10, 3, 5, (1, 1), x_layout="channels_last"), "", "relu")


@pytest.mark.interpreter
@pytest.mark.parametrize("residual_layout,flat", [("channels_last", True), ("contiguous", False)])
def test_tma_1x1_residual(residual_layout, flat, monkeypatch, kernel_launches):
    """A 1x1 into channels_last runs as one row of all the pixels (_flat_pixels), which addresses the
    residual by that flat index too: only a residual in the output's strides keeps it flat."""
    offered = []
    real = igemm_mod.tma_candidates
    cand_of = {True: Candidate.make("igemm_tma", BLOCK_B=1, BLOCK_H=1, BLOCK_W=32, BLOCK_N=16, BLOCK_K=8),
               False: FAMILIES["tma"].cand}
    family = TMA_1X1._replace(residual_layout=residual_layout, cand=cand_of[flat])
    check_fused(family, monkeypatch, kernel_launches, epilogue_of("relu", batch_norm=True, residual=True))
    monkeypatch.setattr(igemm_mod, "tma_candidates", lambda *a, **k: offered.append(k["flat"]) or real(*a, **k))
    case = family.case
    x, w, b = tensors(case)
    epi = epilogue_tensors(epilogue_of(residual=True), (case.n, case.oc, *case.out_hw()), x.dtype,
                           residual_layout=residual_layout)
    igemm_mod.implicit_gemm_plan(x, w, b, *case.args(), "ieee", "tma", epilogue=epilogue_of(residual=True), epi=epi)
    assert offered == [flat]


GROUPED = [("pointer", Case(2, 6, 9, 5, 6, (3, 3), padding=(1, 1), groups=3, x_layout="channels_last")),
           ("tma", Case(1, 32, 24, 5, 6, (3, 3), padding=(1, 1), groups=2, x_layout="channels_last")),
           ("nchw", Case(2, 6, 8, 5, 6, (3, 3), padding=(1, 1), groups=2))]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,case", GROUPED, ids=[name for name, _ in GROUPED])
def test_grouped(name, case, monkeypatch, kernel_launches):
    """Each group's output channels read their own statistics and residual channels."""
    check_fused(FAMILIES[name], monkeypatch, kernel_launches,
                epilogue_of("relu", batch_norm=True, residual=True), case, calls=1)


@pytest.mark.interpreter
def test_identity_epilogue_unchanged(monkeypatch, kernel_launches):
    """Without an epilogue (the default or IDENTITY spelled out) plans give the bits they gave before,
    launch with every step off, and their tuning keys do not change."""
    family = FAMILIES["pointer"]
    case = family.case
    x, w, b = tensors(case)
    outputs = []
    for kwargs in ({}, {"epilogue": IDENTITY, "epi": NO_TENSORS}):
        for name in IGEMM_CANDIDATE_FUNCTIONS:
            monkeypatch.setattr(igemm_mod, name, lambda *a, **k: [])
        monkeypatch.setattr(igemm_mod, "pointer_candidates", lambda *a, **k: [family.cand])
        outputs.append(igemm_mod.implicit_gemm_plan(x, w, b, *case.args(), "ieee", "pointer", **kwargs)(x, w, b))
    assert torch.equal(outputs[0], outputs[1])
    assert rel_err(outputs[0], reference(x, w, b, *case.args())) <= 1e-5
    for _, meta in kernel_launches:
        assert (meta["HAS_BN"], meta["HAS_RESIDUAL"], meta["ACTIVATION"]) == (False, False, "none")
    assert epilogue_key(IDENTITY, NO_TENSORS) == ""


@pytest.mark.interpreter
def test_one_off_helpers_take_an_epilogue(kernel_launches):
    """implicit_gemm_conv2d, depthwise_conv2d and seed_conv2d: plan and run with an epilogue in one call."""
    epilogue = epilogue_of("relu", batch_norm=True, residual=True)
    gemm, dw = Case(1, 4, 6, 5, 6, (3, 3), padding=(1, 1)), Case(1, 4, 4, 5, 6, (3, 3), padding=(1, 1), groups=4)
    for case, run in ((gemm, lambda *t: igemm_mod.implicit_gemm_conv2d(*t[:3], *case.args(), "ieee", "pointer",
                                                                        epilogue=epilogue, epi=t[3])),
                      (gemm, lambda *t: seed_mod.seed_conv2d(*t[:3], case.stride, case.padding, case.dilation, "ieee",
                                                             epilogue=epilogue, epi=t[3])),
                      (dw, lambda *t: depthwise_mod.depthwise_conv2d(*t[:3], case.stride, case.padding,
                                                                     case.dilation, epilogue=epilogue, epi=t[3]))):
        x, w, b = tensors(case)
        epi = epilogue_tensors(epilogue, (case.n, case.oc, *case.out_hw()), x.dtype)
        assert rel_err(run(x, w, b, epi), expected(x, w, b, case, epilogue, epi)) <= 1e-5
    assert kernel_launches.names == ["igemm_pointer_kernel", "seed_conv2d_kernel", "depthwise_kernel"]


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["pointer", "tma_split_k", "nchw", "nchw_streamed", "seed_direct", "depthwise",
                                  "depthwise_streamed"])
def test_int64_offsets_with_an_epilogue(name, monkeypatch, kernel_launches):
    """USE_INT64 reaches every kernel, which asks needs_int64 about the residual too (a residual's span can
    pass int32 where the output's does not); the 64-bit variant computes the same."""
    asked = []

    def force(*tensors):
        asked.append(tensors)
        return True

    for module in (igemm_mod, depthwise_mod, seed_mod):
        monkeypatch.setattr(module, "needs_int64", force)
    family = FAMILIES[name]
    meta = check_fused(family, monkeypatch, kernel_launches, epilogue_of("relu", batch_norm=True, residual=True),
                       calls=1)
    assert meta["USE_INT64"] is True
    assert asked and all(len(ts) == 4 for ts in asked), "needs_int64 was not asked about x, weight, y and residual"
    assert all(ts[3].shape == ts[2].shape and ts[3].stride() != ts[2].stride() for ts in asked)


@pytest.mark.interpreter
def test_bad_epilogue_tensors_are_refused(monkeypatch):
    """Tensors that don't fit the epilogue are a clear error at plan time, and a residual in other strides
    than the plan's is one at run time (never a wrong answer)."""
    family = FAMILIES["pointer"]
    case = family.case
    x, w, b = tensors(case)
    y_shape = (case.n, case.oc, *case.out_hw())
    epilogue = epilogue_of("relu", batch_norm=True, residual=True)
    good = epilogue_tensors(epilogue, y_shape, x.dtype)
    bad = {"no residual": good._replace(residual=None),
           "residual shape": good._replace(residual=torch.randn(case.n, case.oc, 1, 1)),
           "residual dtype": good._replace(residual=good.residual.double()),
           "no mean": good._replace(bn_mean=None),
           "mean length": good._replace(bn_mean=torch.randn(case.oc + 1))}
    for epi in bad.values():
        with pytest.raises(ValueError, match="tritonconv"):
            plan_for(family, monkeypatch, x, w, b, case, epilogue, epi)
    plan = plan_for(family, monkeypatch, x, w, b, case, epilogue, good)
    with pytest.raises(ValueError, match="strides"):
        plan(x, w, b, good._replace(residual=good.residual.to(memory_format=torch.channels_last)))
    # The launcher was compiled for fp32, 16-byte aligned statistics.
    with pytest.raises(ValueError, match="dtype, 16-byte alignment"):
        plan(x, w, b, good._replace(bn_mean=good.bn_mean.half()))
    with pytest.raises(ValueError, match="dtype, 16-byte alignment"):
        plan(x, w, b, good._replace(bn_var=(torch.rand(case.oc + 1) + 0.5)[1:]))  # 4 bytes past alignment


def test_tuning_key_holds_the_epilogue():
    """Epilogues that compile differently, or a residual in other strides, never share a tuning choice."""
    y = torch.empty(1, 4, 3, 3)
    res = EpilogueTensors(residual=torch.empty(1, 4, 3, 3))
    keys = {epilogue_key(epilogue_of("relu"), NO_TENSORS), epilogue_key(epilogue_of("silu"), NO_TENSORS),
            epilogue_key(epilogue_of("leaky_relu"), NO_TENSORS),
            epilogue_key(Epilogue(activation="leaky_relu", activation_params=(0.3,)), NO_TENSORS),
            epilogue_key(epilogue_of(residual=True), res),
            epilogue_key(epilogue_of(residual=True), res._replace(residual=y.to(memory_format=torch.channels_last)))}
    assert len(keys) == 6 and "" not in keys


# ---------------------------------------------------------------- GPU: every config each family offers

def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# (family, problem, needs sm_90): the problems test_cuda.py's test_every_candidate_is_correct runs, where the
# family offers its full list; split-K on a small map with deep K, where its variants are offered.
GPU_PROBLEMS = [
    ("pointer", Case(2, 40, 72, 23, 37, (3, 3), padding=(1, 1), x_layout="channels_last"), False),
    ("pointer_tma_weights", Case(5, 64, 72, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"), True),
    ("pointer_split_k", Case(2, 256, 64, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"), False),
    ("tma", Case(2, 64, 72, 23, 37, (3, 3), padding=(1, 1), x_layout="channels_last"), True),
    ("tma", Case(2, 64, 72, 13, 37, (1, 1), x_layout="channels_last"), True),  # flat: one row of pixels
    ("tma_split_k", Case(2, 256, 64, 7, 7, (3, 3), padding=(1, 1), x_layout="channels_last"), True),
    ("nchw", Case(2, 40, 72, 23, 37, (3, 3), padding=(1, 1)), False),
    ("nchw", Case(3, 64, 136, 16, 30, (1, 1)), False),  # with streamed tiles (TILES)
    ("seed_direct", Case(2, 3, 40, 45, 39, (7, 7), stride=(2, 2), padding=(3, 3)), False),
    ("depthwise", Case(2, 48, 48, 23, 37, (3, 3), padding=(1, 1), groups=48), False),
    ("depthwise", Case(2, 48, 96, 23, 37, (3, 3), padding=(1, 1), groups=48, x_layout="channels_last"), False),
]
# Which of the configs a plan builder offers belong to a family.
FAMILY_CONFIGS = {
    "pointer": lambda c: c.kernel == "igemm_pointer" and not c.params.get("SPLIT_K")
    and not c.params.get("TMA_WEIGHTS"),
    "pointer_tma_weights": lambda c: c.kernel == "igemm_pointer" and c.params.get("TMA_WEIGHTS")
    and not c.params.get("SPLIT_K"),
    "pointer_split_k": lambda c: c.kernel == "igemm_pointer" and c.params.get("SPLIT_K"),
    "tma": lambda c: c.kernel == "igemm_tma" and not c.params.get("SPLIT_K"),
    "tma_split_k": lambda c: c.kernel == "igemm_tma" and c.params.get("SPLIT_K"),
    "nchw": lambda c: c.kernel == "igemm_nchw",
    "seed_direct": lambda c: c.kernel == "seed_direct",
    "depthwise": lambda c: c.kernel == "depthwise",
}
GPU_ACTIVATIONS = {torch.float32: "silu", torch.bfloat16: "relu"}


def offered_candidates(name: str, case: Case, monkeypatch) -> list:
    """Every config of the family that its plan builder ("auto" for the GEMM families) offers for `case` on
    this GPU: the candidate list handed to tuned_plan, caught there (nothing is tuned)."""
    offered = []

    def catch(kind, x, weight, bias, y, stride, padding, dilation, groups, candidates, make, *args, **kwargs):
        offered.extend(candidates)

    x, w, b = tensors(case, "cuda")
    with monkeypatch.context() as patch:
        if name == "depthwise":
            patch.setattr(depthwise_mod, "tuned_plan", catch)
            depthwise_mod.depthwise_plan(x, w, b, case.stride, case.padding, case.dilation)
        else:
            patch.setattr(igemm_mod, "tuned_plan", catch)
            igemm_mod.implicit_gemm_plan(x, w, b, *case.args(), "ieee", "nchw" if name == "nchw" else "auto")
    listed = [c for c in offered if FAMILY_CONFIGS[name](c)]
    assert listed, f"{name} offered no candidate for {case}"
    return listed


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,case,sm90", GPU_PROBLEMS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(GPU_PROBLEMS)])
def test_every_candidate_with_an_epilogue(name, case, sm90, dtype, monkeypatch, kernel_launches):
    """Each config the tuner may pick, fused with BN, a residual in the other memory format and an
    activation, run alone (twice, new epilogue tensors each time) against float64."""
    if sm90 and not hopper():
        pytest.skip("tensor-descriptor (TMA) loads need sm_90+")
    case = dataclasses.replace(case, dtype=dtype)
    residual_layout = "contiguous" if case.x_layout == "channels_last" else "channels_last"
    epilogue = epilogue_of(GPU_ACTIVATIONS[dtype], batch_norm=True, residual=True)
    for cand in offered_candidates(name, case, monkeypatch):
        tuning.reset_memory()
        del kernel_launches[:]
        try:
            check_fused(FAMILIES[name], monkeypatch, kernel_launches, epilogue, case, cand=cand, device="cuda",
                        residual_layout=residual_layout)
        except AssertionError as exc:
            raise AssertionError(f"{name} {dtype} candidate {cand.describe()}: {exc}") from exc
