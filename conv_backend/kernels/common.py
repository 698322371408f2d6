"""Pieces shared by the GEMM-style kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import interpreter_enabled
from ..tuning import problem_signature, select

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


def tuned_plan(kind: str, x, weight, bias, y, stride, padding, dilation, groups, candidates, make, extra_key=""):
    """Choose among `candidates` for this problem (timing them into `y`); return run(x, weight, bias) -> y.

    `make(candidate)` returns launch(x, weight, bias, out). The tuning key holds
    everything a launch depends on: shapes and strides of the operands and of the
    output, the convolution's arguments, dtype, bias, and what the caller adds.
    """
    key = (f"{kind}|x{tuple(x.shape)}{tuple(x.stride())}|w{tuple(weight.shape)}{tuple(weight.stride())}"
           f"|y{tuple(y.stride())}|s{tuple(stride)}p{tuple(padding)}d{tuple(dilation)}g{groups}|{x.dtype}"
           f"|b{bias is not None}|{extra_key}")
    signature = problem_signature(x.shape, weight.shape, stride, padding, dilation, groups, x.dtype)
    launch = make(select(key, signature, x.device, candidates, lambda cand: make(cand)(x, weight, bias, y)))
    y_size, y_stride = tuple(y.shape), y.stride()

    def run(x, weight, bias):
        out = torch.empty_strided(y_size, y_stride, dtype=x.dtype, device=x.device)
        launch(x, weight, bias, out)
        return out
    return run
