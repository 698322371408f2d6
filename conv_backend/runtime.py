"""Facts about the running process that decide what our kernels can do."""
from __future__ import annotations

import os
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter.

    Triton reads TRITON_INTERPRET when a kernel is decorated, so the value at
    import time of our kernels is what counts; we read it the same way.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device_supported(device: torch.device) -> tuple[bool, str]:
    """Whether our kernels can run on tensors of `device`, and why not."""
    if device.type == "cuda":
        if interpreter_enabled():
            return False, "CUDA tensors while TRITON_INTERPRET=1 (the interpreter runs on CPU tensors)"
        return True, ""
    if device.type == "cpu":
        if interpreter_enabled():
            return True, ""
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
