"""Facts about the running process that decide what our kernels can do."""
from __future__ import annotations

import functools
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
    """Map the user's fp32 policy to a tl.dot input_precision for `dtype` on `device` (default: CUDA)."""
    if dtype != torch.float32:
        return "ieee"  # fp16/bf16 operands are exact in the tensor cores; ignored by tl.dot
    if policy == "auto":
        # What eager would do: cuDNN's TF32 setting on CUDA, exact fp32 on the CPU.
        on_cuda = device is None or device.type == "cuda"
        return "tf32" if on_cuda and cudnn_conv_allows_tf32() else "ieee"
    return policy


def has_tma(device: torch.device) -> bool:
    """Tensor-descriptor (TMA) loads need Hopper or newer; the interpreter emulates them."""
    if device.type == "cpu":
        return interpreter_enabled()
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
