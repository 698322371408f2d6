"""Facts about the running process that decide what our kernels can do."""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_requested() -> bool:
    """What TRITON_INTERPRET in the environment asks for now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def interpreter_enabled() -> bool:
    """True when our kernels run through Triton's CPU interpreter.

    Triton decides this per kernel, once, when `@triton.jit` defines it: from
    TRITON_INTERPRET at that moment the kernel becomes an InterpretedFunction
    (CPU tensors only) or a JITFunction (compiled for the GPU). The variable
    may have changed since, so the kernels themselves are asked; importing
    them all here defines them under one setting.
    """
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import depthwise, implicit_gemm  # noqa: F401  (every kernel defined from here on)
    return isinstance(implicit_gemm.seed_conv2d_kernel, InterpretedFunction)


def device_supported(device: torch.device) -> tuple[bool, str]:
    """Whether our kernels can run on tensors of `device`, and why not.

    The kernels must have been defined for the device (see interpreter_enabled)
    and the environment must still ask for it; where the two disagree ATen,
    which is always right, computes the convolution.
    """
    interpreted, requested = interpreter_enabled(), interpreter_requested()
    if device.type == "cuda":
        if interpreted or requested:  # set late, it would still switch Triton's compiler to interpreter rules
            return False, "CUDA tensors while TRITON_INTERPRET=1 (the interpreter runs on CPU tensors)"
        return True, ""
    if device.type == "cpu":
        if interpreted and requested:
            return True, ""
        if requested:
            return False, ("TRITON_INTERPRET=1 was set after the kernels were defined for the GPU (Triton reads it "
                           "when a kernel is defined): set it before importing conv_backend")
        return False, "CPU tensor without TRITON_INTERPRET=1"
    return False, f"device type {device.type!r} has no Triton backend here"


def cudnn_conv_allows_tf32() -> bool:
    """What cuDNN would do for an fp32 convolution right now.

    PyTorch resolves cuDNN's conv precision as ATen does here: the per-operator
    setting (`torch.backends.cudnn.conv.fp32_precision`), else cuDNN's
    (`torch.backends.cudnn.fp32_precision`), else the global one
    (`torch.backends.fp32_precision`); TF32 only where one says "tf32", "none"
    all the way down means exact fp32. The legacy `allow_tf32` flag writes the
    per-operator setting; reading it back raises once the two APIs are mixed,
    so it is only consulted on a torch without per-operator settings.
    """
    cudnn = torch.backends.cudnn
    conv = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    if conv is None:
        return bool(cudnn.allow_tf32)
    for precision in (conv, getattr(cudnn, "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none")):
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    return False


def resolve_input_precision(policy: str, dtype: torch.dtype, device: Optional[torch.device] = None) -> str:
    """Map the user's fp32 policy to a tl.dot input_precision for `dtype` on `device` (default: CUDA), the same
    for every layer: "auto" gives "tf32" or "ieee" (what eager allows); choose_fp32_precision decides per layer."""
    if dtype != torch.float32:
        return "ieee"  # fp16/bf16 operands are exact in the tensor cores; ignored by tl.dot
    if policy == "auto":
        # What eager would do: cuDNN's TF32 setting on CUDA, exact fp32 on the CPU.
        on_cuda = device is None or device.type == "cuda"
        return "tf32" if on_cuda and cudnn_conv_allows_tf32() else "ieee"
    return policy


# "auto" with TF32 allowed uses TF32 only in layers where it pays, and "tf32x3" elsewhere. tf32x3 (Triton splits
# each fp32 operand into a TF32 value and a TF32 remainder and sums three TF32 products) is about as accurate as
# exact fp32 but takes three tensor-core passes. On an H100 (SXM: TF32 dense ~495 TFLOP/s, HBM3 ~3.35 TB/s) it
# peaks near 495 / 3 = 165 TFLOP/s, so a layer needs 165e12 / 3.35e12 = ~49 FLOP per byte of DRAM traffic
# before the extra passes can cost time (the ridge point of tf32x3). Below it the layer waits on memory either
# way: 1x1 convolutions with few channels, small maps, batch-1 layers whose weights dominate. Those layers keep
# fp32's accuracy at no cost. Above it, "auto" uses "tf32_round": Triton's TF32 drops each operand's low 13
# mantissa bits where cuDNN rounds them, a bias that adds up from layer to layer, so the tl kernels round their
# operands to the nearest TF32 value first (kernels.common.mma) and the error stays cuDNN's. The Gluon kernels
# feed the tensor cores straight from shared memory and cannot round: they serve "tf32" only.
H100_TF32_FLOPS = 495e12
H100_DRAM_BYTES_PER_S = 3.35e12
TF32X3_PASSES = 3
TF32_MIN_FLOP_PER_BYTE = H100_TF32_FLOPS / TF32X3_PASSES / H100_DRAM_BYTES_PER_S


@functools.lru_cache(maxsize=4096)  # called per convolution call: the arithmetic is done once per problem
def conv_flop_per_byte(x_shape, w_shape, stride, padding, dilation, itemsize: int = 4) -> float:
    """Arithmetic intensity of a convolution: its FLOPs over the bytes it must move from DRAM at least (the
    input and weight read once, the output written once)."""
    n, _, in_h, in_w = x_shape
    out_c, channels_per_group, kernel_h, kernel_w = w_shape
    # layout.conv_output_hw's formula: this module imports nothing of the package (tests load it on its own)
    out_h = (in_h + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (in_w + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    out_elems = n * out_c * max(out_h, 0) * max(out_w, 0)
    flops = 2 * out_elems * channels_per_group * kernel_h * kernel_w
    elems = math.prod(x_shape) + math.prod(w_shape) + out_elems
    return flops / max(elems * itemsize, 1)


def choose_fp32_precision(policy: str, x_shape, w_shape, stride, padding, dilation, groups, dtype: torch.dtype,
                          device: Optional[torch.device] = None) -> str:
    """The fp32 math of one convolution: "tf32", "tf32_round", "tf32x3" or "ieee" (see the constants above).

    Forced policies ("tf32", "tf32_round", "tf32x3", "ieee") apply to every layer; "auto" is exact fp32 where
    eager is (CPU, or cuDNN's TF32 setting off), else rounded TF32 where the layer is compute-bound enough
    (conv_flop_per_byte above TF32_MIN_FLOP_PER_BYTE) and "tf32x3" elsewhere. fp16/bf16 give "ieee".
    `groups` is implied by the weight's shape (its channels per group); the argument keeps the convolution's.
    """
    precision = resolve_input_precision(policy, dtype, device)
    if policy != "auto" or precision != "tf32":
        return precision
    intensity = conv_flop_per_byte(tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation),
                                   dtype.itemsize)
    return "tf32_round" if intensity > TF32_MIN_FLOP_PER_BYTE else "tf32x3"


def has_tma(device: torch.device) -> bool:
    """Tensor-descriptor (TMA) loads need Hopper or newer; the interpreter emulates them."""
    if device.type == "cpu":
        return interpreter_enabled()
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
