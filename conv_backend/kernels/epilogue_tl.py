"""The fused epilogue of the `tl` kernels (implicit GEMM, NCHW GEMM, seed, depthwise), device and host side.

A kernel calls `fused_epilogue` on its fp32 accumulator, bias already added,
just before its one store: batch norm from the live statistics, the residual,
then the activation (the order and formulas of epilogue.apply_reference), so the
output is cast once. Each step is a constexpr (HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32):
a step that is off emits no code, and the identity epilogue compiles to the
kernel without one. A split-K kernel calls it once, after summing the slices.

Host side, `EpilogueArgs` turns an `Epilogue` and the example tensors of a plan
into what every launcher passes: the constexprs, the trailing scalars (the
residual's four strides, eps, the activation's two parameters) and, per call,
the five pointers (the output stands in for a step that is off, as it does for
a missing bias).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..epilogue import IDENTITY, NO_TENSORS, Epilogue, EpilogueTensors

NO_RESIDUAL_STRIDES = (0, 0, 0, 0)


@triton.jit
def _tanh(x):
    """tanh in fp32 without a libdevice call (the same code on every Triton and in the interpreter): Cephes'
    tanhf, an odd polynomial below 0.625, where (1 - exp(-2|x|)) / (1 + exp(-2|x|)) would lose the low bits of a
    small result, and that form above."""
    z = tl.where(x < 0, -x, x)
    s = x * x
    small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s + 1.33314422036e-1) * s
             - 3.33332819422e-1) * s * x + x
    e = tl.exp(-2.0 * z)  # at most exp(-1.25) here: (1 - e) keeps its low bits, and nothing overflows
    large = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.625, small, tl.where(x < 0, -large, large))


@triton.jit
def _relu6(x):
    """min(max(x, 0), 6), NaN in NaN out (tl.maximum and tl.minimum may drop a NaN operand on GPUs)."""
    return tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))


@triton.jit
def activation(x, ACTIVATION: tl.constexpr, param0, param1):
    """x (fp32) through the activation named as in epilogue.ACTIVATIONS, with ATen's formulas. The compares
    keep NaN where ATen keeps it (relu(NaN) is NaN)."""
    if ACTIVATION == "relu":
        x = tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == "hardtanh":  # (min_val, max_val)
        x = tl.where(x < param0, param0, tl.where(x > param1, param1, x))
    elif ACTIVATION == "leaky_relu":  # (negative_slope,)
        x = tl.where(x > 0.0, x, x * param0)
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == "gelu":
        x = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
    elif ACTIVATION == "gelu_tanh":
        # ATen's kBeta = sqrt(2) * (2 / sqrt(pi)) * 0.5 = sqrt(2 / pi) and kKappa
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == "hardswish":
        x = x * _relu6(x + 3.0) / 6.0
    elif ACTIVATION == "hardsigmoid":
        x = _relu6(x + 3.0) / 6.0
    elif ACTIVATION == "sigmoid":
        x = 1.0 / (1.0 + tl.exp(-x))
    elif ACTIVATION == "tanh":
        x = _tanh(x)
    else:
        tl.static_assert(ACTIVATION == "none", "unknown activation")
    return x


@triton.jit
def round_to_tf32(x):
    """fp32 x rounded to the nearest TF32 value (10 mantissa bits, ties away from zero), which the tensor
    cores' truncation then keeps exact: TF32 products with cuDNN's rounding instead of Triton's truncation.
    NaN stays NaN (the canonical 0x7FFFFFFF plus half an ulp would carry into the sign and give -0.0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def fused_epilogue(acc, oc, oc_ok, out_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr, res_ptrs, bn_eps, act_param0,
                   act_param1, HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                   ROUND_TF32: tl.constexpr):
    """act((acc - mean) * rsqrt(var + eps) * gamma + beta + residual) in fp32, rounded to TF32 if ROUND_TF32.

    `oc` / `oc_ok`: the output channels of acc's elements and their mask, shaped to broadcast against acc
    (e.g. oc[None, :] for a [pixels, channels] tile). `res_ptrs`: the residual's element pointers, acc's
    shape, read where `out_ok` (only when HAS_RESIDUAL; otherwise anything)."""
    if HAS_BN:
        mean = tl.load(mean_ptr + oc, mask=oc_ok, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + oc, mask=oc_ok, other=1.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + oc, mask=oc_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + oc, mask=oc_ok, other=0.0).to(tl.float32)
        acc = (acc - mean) * (tl.math.rsqrt(var + bn_eps) * gamma) + beta
    if HAS_RESIDUAL:
        acc += tl.load(res_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    if ACTIVATION != "none":
        acc = activation(acc, ACTIVATION, act_param0, act_param1)
    if ROUND_TF32:
        acc = round_to_tf32(acc)
    return acc


class EpilogueArgs:
    """What a launcher passes a kernel for `epilogue`: `constexprs` (HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32),
    `scalars` (residual strides N, C, H, W, then bn_eps, act_param0, act_param1; they follow the kernel's
    other scalars) and `pointers(epi, y)` per call (mean, var, gamma, beta, residual).

    `example` fixes what a launcher compiled for: the residual's strides, and the dtype and 16-byte
    alignment of every tensor read (KernelLauncher's direct launches reuse the compiled kernel, so a call
    that differs is refused, never run on the wrong code; plans key on epilogue_key). BN vectors may be
    any float dtype and stride: a non-contiguous one is copied per call (a few hundred bytes)."""

    def __init__(self, epilogue: Epilogue = IDENTITY, example: EpilogueTensors = NO_TENSORS, y=None):
        self.epilogue = epilogue
        check_tensors(epilogue, example, y)
        self.residual_strides = tuple(example.residual.stride()) if epilogue.residual else NO_RESIDUAL_STRIDES
        self.constexprs = dict(HAS_BN=epilogue.batch_norm, HAS_RESIDUAL=epilogue.residual,
                               ACTIVATION=epilogue.activation, ROUND_TF32=epilogue.round_tf32)
        self.scalars = (*self.residual_strides, epilogue.bn_eps, epilogue.param0, epilogue.param1)
        self._specialized = _specialization(self._read(example)) if not epilogue.is_identity else ()

    def _read(self, epi: EpilogueTensors) -> tuple:
        """The tensors the kernel reads, as it reads them."""
        e = self.epilogue
        bn = tuple(t if t.is_contiguous() else t.contiguous()
                   for t in (epi.bn_mean, epi.bn_var, epi.bn_weight, epi.bn_bias)) if e.batch_norm else ()
        return bn + ((epi.residual,) if e.residual else ())

    def pointers(self, epi: EpilogueTensors, y) -> tuple:
        if self.epilogue.is_identity:
            return (y,) * 5
        read = self._read(epi)
        if self.epilogue.residual and epi.residual.stride() != self.residual_strides:
            raise ValueError(f"tritonconv: the residual's strides {epi.residual.stride()} differ from the "
                             f"plan's {self.residual_strides}")
        if _specialization(read) != self._specialized:
            raise ValueError(f"tritonconv: the epilogue's tensors (dtype, 16-byte alignment) "
                             f"{_specialization(read)} differ from the plan's {self._specialized}")
        bn = read[:4] if self.epilogue.batch_norm else (y,) * 4
        return (*bn, epi.residual if self.epilogue.residual else y)


def _specialization(tensors) -> tuple:
    """What Triton specializes a pointer argument on: its element type and 16-byte alignment."""
    return tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


def residual_of(epilogue: Epilogue, epi: EpilogueTensors) -> tuple:
    """(the residual,) where the epilogue reads one, else (): for needs_int64, which must see its span."""
    return (epi.residual,) if epilogue.residual else ()


def check_tensors(epilogue: Epilogue, epi: EpilogueTensors, y=None) -> None:
    """Raise ValueError where `epi` does not hold what `epilogue` reads, in the form the kernels read it:
    BN vectors of y's channel count, a residual of y's shape, dtype and device."""
    bn = (epi.bn_mean, epi.bn_var, epi.bn_weight, epi.bn_bias)
    if epilogue.batch_norm:
        if any(t is None for t in bn):
            raise ValueError("tritonconv: a batch-norm epilogue needs mean, var, weight and bias")
        for t in bn:
            if t.dim() != 1 or not t.is_floating_point() or (y is not None and (
                    t.shape[0] != y.shape[1] or t.device != y.device)):
                raise ValueError(f"tritonconv: batch-norm vectors must be 1-D floating point of the output's "
                                 f"channel count on its device, got {tuple(t.shape)} {t.dtype} {t.device}")
    if epilogue.residual:
        r = epi.residual
        if r is None:
            raise ValueError("tritonconv: a residual epilogue needs the residual tensor")
        if y is not None and (r.shape != y.shape or r.dtype != y.dtype or r.device != y.device):
            raise ValueError(f"tritonconv: the residual must have the output's shape, dtype and device "
                             f"({tuple(y.shape)} {y.dtype} {y.device}), got {tuple(r.shape)} {r.dtype} {r.device}")


def epilogue_key(epilogue: Epilogue, epi: EpilogueTensors) -> str:
    """What a tuning or plan key needs of an epilogue: its steps and constants, the residual's strides and
    the dtypes and 16-byte alignment of the tensors it reads (the kernels specialize on both). Empty for
    the identity epilogue, so unfused keys are unchanged."""
    if epilogue.is_identity:
        return ""
    tensors = [t for t in epi if t is not None]
    return (f"epi:{epilogue.describe()}|eps{epilogue.bn_eps}|p{epilogue.activation_params}"
            f"|r{tuple(epi.residual.stride()) if epilogue.residual else ()}"
            f"|{[(str(t.dtype), t.data_ptr() % 16 == 0) for t in tensors]}")


IDENTITY_ARGS = EpilogueArgs()  # the identity epilogue's arguments (the seed's standalone launches)
