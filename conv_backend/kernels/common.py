"""Pieces shared by the GEMM-style kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import interpreter_enabled

INT32_MAX = 2**31 - 1


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST computes in fp32: Triton's CPU interpreter multiplies
    bfloat16 dot operands as raw integer bits, so tests on CPU need it; GPUs never do."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def needs_dot_upcast(dtype: torch.dtype) -> bool:
    return interpreter_enabled() and dtype == torch.bfloat16


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset of any tensor can pass int32."""
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if span > INT32_MAX:
            return True
    return False
