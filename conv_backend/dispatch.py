"""The launch wrapper behind `tritonconv::conv2d`: checks, picks a kernel, runs it."""
from __future__ import annotations

import logging

import torch

from .runtime import resolve_input_precision
from .support import depthwise_like, unsupported_reason
from .tuning import NoKernelError

log = logging.getLogger("conv_backend")


def aten_conv2d(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution.default(x, weight, bias, list(stride), list(padding), list(dilation),
                                              False, [0, 0], groups)


def launch_conv2d(x, weight, bias, stride, padding, dilation, groups, input_precision="auto", algorithm="auto"):
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    reason = unsupported_reason(x, weight, bias, stride, padding, dilation, groups=groups, algorithm=algorithm)
    if reason is not None:
        # Reached only by direct calls of the op: the graph pass never emits these.
        log.info("tritonconv::conv2d falls back to ATen: %s", reason)
        return aten_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.numel() == 0 or weight.numel() == 0:
        # Empty tensors: nothing to compute, and ATen defines the exact result (zeros or bias).
        return aten_conv2d(x, weight, bias, stride, padding, dilation, groups)
    precision = resolve_input_precision(input_precision, x.dtype)
    try:
        return _run_triton(x, weight, bias, stride, padding, dilation, groups, precision, algorithm)
    except NoKernelError as exc:
        log.warning("tritonconv::conv2d falls back to ATen: %s", exc)
        return aten_conv2d(x, weight, bias, stride, padding, dilation, groups)


def _run_triton(x, weight, bias, stride, padding, dilation, groups, precision, algorithm):
    if algorithm == "seed":
        from .kernels.seed import seed_conv2d
        return seed_conv2d(x, weight, bias, stride, padding, dilation, precision)
    if algorithm == "depthwise" or (algorithm == "auto" and depthwise_like(x.shape[1], weight.shape[0], groups)):
        from .kernels.depthwise import depthwise_conv2d
        return depthwise_conv2d(x, weight, bias, stride, padding, dilation)
    from .kernels.implicit_gemm import implicit_gemm_conv2d
    load_path = {"gemm_tma": "tma", "gemm_pointer": "pointer"}.get(algorithm, "auto")
    return implicit_gemm_conv2d(x, weight, bias, stride, padding, dilation, groups, precision, load_path)
