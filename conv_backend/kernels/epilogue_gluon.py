"""The fused epilogue (epilogue.py) in Gluon, for the Hopper kernels (halo.py, warp_specialized.py).

A kernel adds its bias to the fp32 accumulator, then hands the tile to `fused_epilogue` in the layout it
stores from, with the tile's channel offsets (a slice of that layout along the pixel axis) and the
residual's element offsets (the store's offsets, built from the residual's own strides). Every step is
switched by a constexpr, so the identity epilogue compiles to the kernel without it. Gluon kernels cannot
call the `tl` helpers the other kernels use, hence this copy of the formulas, which follow ATen's.

Host side: the constexprs and scalars a launcher passes, the tensors a call passes (the output stands in
for steps that are off, as it does for a missing bias), and the residual's strides where the output is
seen as one flat row of pixels.
"""
from __future__ import annotations

from ..epilogue import ACTIVATIONS, Epilogue, EpilogueTensors
from .common import INT32_MAX, gl, gluon

try:  # libdevice's tanh (CUDA's tanhf, as ATen uses), reachable from Gluon kernels
    from triton.experimental.gluon.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed Triton
    libdevice = None

# Activations whose formula needs more than Gluon's core math: the piece each needs.
_NEEDS = {"gelu": lambda: hasattr(gl, "erf"), "gelu_tanh": lambda: libdevice is not None,
          "tanh": lambda: libdevice is not None}


def gluon_takes_epilogue(epilogue: Epilogue) -> bool:
    """Whether the Gluon kernels can fuse `epilogue` on this Triton (else the `tl` kernels take the problem)."""
    if gluon is None or epilogue.activation not in ACTIVATIONS:
        return False
    need = _NEEDS.get(epilogue.activation)
    return need is None or need()


def epilogue_constexprs(epilogue: Epilogue) -> dict:
    return dict(HAS_BN=epilogue.batch_norm, HAS_RESIDUAL=epilogue.residual, ACTIVATION=epilogue.activation,
                ROUND_TF32=epilogue.round_tf32)


def epilogue_scalars(epilogue: Epilogue) -> tuple:
    """(bn_eps, act_param0, act_param1): the kernels' scalar arguments, in that order."""
    return epilogue.bn_eps, epilogue.param0, epilogue.param1


def epilogue_pointers(epilogue: Epilogue, tensors: EpilogueTensors, y, residual_strides=None) -> tuple:
    """(bn_mean, bn_var, bn_weight, bn_bias, residual) for a launch writing `y`: `y` where a step is off. The
    batch-norm vectors are read by channel index, so a strided one is made contiguous (a copy of OC values).
    The residual must have y's shape and the strides the launcher was built for (`residual_strides`; a size-1
    axis may carry any)."""
    if epilogue.batch_norm:
        vectors = (tensors.bn_mean, tensors.bn_var, tensors.bn_weight, tensors.bn_bias)
        if any(v is None for v in vectors):
            raise ValueError("tritonconv: a batch-norm epilogue needs bn_mean, bn_var, bn_weight and bn_bias")
        vectors = tuple(v.contiguous() for v in vectors)
    else:
        vectors = (y, y, y, y)
    if epilogue.residual:
        if tensors.residual is None:
            raise ValueError("tritonconv: a residual epilogue needs the residual tensor")
        residual = tensors.residual
        moved = residual_strides is not None and any(
            size > 1 and got != planned for size, got, planned in zip(y.shape, residual.stride(), residual_strides))
        if moved or residual.shape != y.shape:
            raise ValueError(f"tritonconv: residual of shape {tuple(residual.shape)} and strides {residual.stride()}"
                             f" where the launch was built for shape {tuple(y.shape)} and strides {residual_strides}")
    else:
        residual = y
    return (*vectors, residual)


def by_alignment(make_kernel):
    """kernel_for(pointers) -> the KernelLauncher (from `make_kernel()`) for pointers of this 16-byte alignment.
    A KernelLauncher launches what the JIT specialized on its first call, alignment included; the plan's key
    fixes that of the input, weight, bias and output, not that of the epilogue's tensors (a residual may be an
    offset view), so each alignment pattern gets its own."""
    kernels = {}

    def kernel_for(pointers):
        key = tuple(t.data_ptr() % 16 == 0 for t in pointers)
        kernel = kernels.get(key)
        if kernel is None:
            kernel = kernels[key] = make_kernel()
        return kernel
    return kernel_for


def residual_needs_int64(shape, residual_strides) -> bool:
    """True when an element offset of a residual of this shape and these strides can pass int32."""
    return sum((size - 1) * abs(stride) for size, stride in zip(shape, residual_strides)) > INT32_MAX


def same_strides(shape, strides, other) -> bool:
    """Whether two tensors of `shape` with these strides put every element at the same offset (a size-1 axis
    may carry any stride)."""
    return all(size == 1 or a == b for size, a, b in zip(shape, strides, other))


def flat_residual_strides(shape, residual_strides) -> tuple | None:
    """The residual's (n, c, h, w) strides for a kernel that sees the output as one image of one row of all
    N*H*W pixels (implicit_gemm._flat_pixels): (0, c stride, 0, s), where pixel p = (n*H + h)*W + w of the
    residual sits at p*s. None where no such s exists (the residual is not dense across its pixels)."""
    n, _, h, w = shape
    stride_n, stride_c, stride_h, stride_w = residual_strides
    step, span = 0, 1
    found = False
    for size, stride in ((w, stride_w), (h, stride_h), (n, stride_n)):
        if size > 1:
            if not found:
                step, found = stride, True
            elif stride != step * span:
                return None
        span *= size
    return 0, stride_c, 0, step


if gluon is not None:
    @gluon.jit
    def _clamp(x, low, high):
        """min(max(x, low), high) that keeps NaN, as ATen's clamp does (maximum/minimum may drop it)."""
        return gl.where(x < low, low, gl.where(x > high, high, x))

    @gluon.jit
    def apply_activation(x, ACTIVATION: gl.constexpr, param0, param1):
        """ATen's formula for each activation (epilogue.ACTIVATIONS) on an fp32 tile; NaN stays NaN."""
        if ACTIVATION == "relu":
            x = gl.where(x < 0.0, 0.0, x)
        elif ACTIVATION == "hardtanh":  # (min_val, max_val)
            x = _clamp(x, param0, param1)
        elif ACTIVATION == "leaky_relu":  # (negative_slope,)
            x = gl.where(x > 0.0, x, x * param0)
        elif ACTIVATION == "silu":
            x = x / (1.0 + gl.exp(-x))
        elif ACTIVATION == "gelu":
            x = 0.5 * x * (1.0 + gl.erf(x * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (1.0 + libdevice.tanh(inner))
        elif ACTIVATION == "hardswish":
            x = x * _clamp(x + 3.0, 0.0, 6.0) / 6.0
        elif ACTIVATION == "hardsigmoid":
            x = _clamp(x + 3.0, 0.0, 6.0) / 6.0
        elif ACTIVATION == "sigmoid":
            x = 1.0 / (1.0 + gl.exp(-x))
        elif ACTIVATION == "tanh":
            x = libdevice.tanh(x)
        else:
            gl.static_assert(ACTIVATION == "none", "unknown activation")
        return x

    @gluon.jit
    def round_to_tf32(x):
        """epilogue_tl.round_to_tf32 in Gluon: fp32 x rounded to the nearest TF32 value, NaN kept."""
        bits = x.to(gl.uint32, bitcast=True)
        rounded = ((bits + 0x1000) & 0xFFFFE000).to(gl.float32, bitcast=True)
        return gl.where(x == x, rounded, x)

    @gluon.jit
    def fused_epilogue(acc, offs_n, n_ok, r_offsets, mask, mean_ptr, var_ptr, bn_w_ptr, bn_b_ptr, r_ptr,
                       bn_eps, act_param0, act_param1, PIX_AXIS: gl.constexpr, HAS_BN: gl.constexpr,
                       HAS_RESIDUAL: gl.constexpr, ACTIVATION: gl.constexpr, ROUND_TF32: gl.constexpr):
        """act((acc - mean) * rsqrt(var + eps) * bn_weight + bn_bias + residual) on the fp32 tile `acc` (bias
        already added), rounded to TF32 if ROUND_TF32. offs_n / n_ok: the tile's output channels, in the slice
        of acc's layout along PIX_AXIS (its pixel axis); r_offsets / mask: the residual's element offsets and
        the store's mask."""
        if HAS_BN:
            mean = gl.load(mean_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32)
            var = gl.load(var_ptr + offs_n, mask=n_ok, other=1.0).to(gl.float32)
            weight = gl.load(bn_w_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32)
            shift = gl.load(bn_b_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32)
            # Two per-channel vectors instead of four: acc * scale + (bias - mean * scale), whose rounding differs
            # from the reference's order by an ulp or so, leaves the registers to the tile.
            scale = gl.rsqrt(var + bn_eps) * weight
            shift = shift - mean * scale
            acc = acc * gl.expand_dims(scale, PIX_AXIS) + gl.expand_dims(shift, PIX_AXIS)
        if HAS_RESIDUAL:
            acc += gl.load(r_ptr + r_offsets, mask=mask, other=0.0).to(gl.float32)
        acc = apply_activation(acc, ACTIVATION, act_param0, act_param1)
        if ROUND_TF32:
            acc = round_to_tf32(acc)
        return acc
