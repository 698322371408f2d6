"""The launch wrapper behind `tritonconv::conv2d`: checks, picks a kernel, runs it.

Everything decided per problem (support, kernel choice, launch arguments) is
cached in a plan keyed on shapes, strides, dtypes, devices and arguments, so a
call on a known problem costs a dict lookup plus the kernel launch.
"""
from __future__ import annotations

import functools
import logging

import torch

from .layout import memory_format_for
from .lru import LRUCache, max_plans
from .runtime import resolve_input_precision
from .support import depthwise_like, unsupported_reason
from .tuning import NoKernelError

log = logging.getLogger("conv_backend")
# The most recently used plans (TRITONCONV_MAX_PLANS): dynamic shapes make a problem per input size.
_plans = LRUCache(max_plans())


def aten_conv2d(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution.default(x, weight, bias, list(stride), list(padding), list(dilation),
                                              False, [0, 0], groups)


def _tensor_key(t):
    # Alignment is part of the key: tensor-descriptor (TMA) loads need a 16-byte aligned base.
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device, t.layout, t.data_ptr() % 16 == 0)


def launch_conv2d(x, weight, bias, stride, padding, dilation, groups, input_precision="auto", algorithm="auto",
                  output_format="eager"):
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one (as eager ops do).
        with torch.cuda.device(x.device):
            return _launch(x, weight, bias, stride, padding, dilation, groups, input_precision, algorithm,
                           output_format)
    return _launch(x, weight, bias, stride, padding, dilation, groups, input_precision, algorithm, output_format)


def _launch(x, weight, bias, stride, padding, dilation, groups, input_precision, algorithm, output_format):
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    precision = resolve_input_precision(input_precision, x.dtype, x.device)
    key = (_tensor_key(x), _tensor_key(weight), _tensor_key(bias), stride, padding, dilation, groups, precision,
           algorithm, output_format)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _make_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm,
                                        output_format)
    return plan(x, weight, bias)


def _make_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format):
    aten = functools.partial(_aten_plan, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             output_format=output_format)
    reason = unsupported_reason(x, weight, bias, stride, padding, dilation, groups=groups, algorithm=algorithm)
    if reason is not None:
        # Reached only by direct calls of the op: the graph pass never emits these.
        log.info("tritonconv::conv2d falls back to ATen: %s", reason)
        return aten
    if x.numel() == 0 or weight.numel() == 0:
        return aten  # nothing to compute, and ATen defines the exact result (zeros or bias)
    try:
        return _triton_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format)
    except NoKernelError as exc:
        log.warning("tritonconv::conv2d falls back to ATen: %s", exc)
        return aten


def _aten_plan(x, weight, bias, *, stride, padding, dilation, groups, output_format):
    y = aten_conv2d(x, weight, bias, stride, padding, dilation, groups)
    return y.contiguous(memory_format=memory_format_for(output_format, x, weight))


def _triton_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format):
    if algorithm == "seed":
        from .kernels.seed import seed_conv2d
        return lambda x, weight, bias: seed_conv2d(x, weight, bias, stride, padding, dilation, precision,
                                                   output_format=output_format)
    if algorithm == "depthwise" or (algorithm == "auto" and depthwise_like(x.shape[1], weight.shape[0], groups)):
        from .kernels.depthwise import depthwise_plan
        return depthwise_plan(x, weight, bias, stride, padding, dilation, output_format)
    from .kernels.implicit_gemm import implicit_gemm_plan
    load_path = {"gemm_tma": "tma", "gemm_pointer": "pointer", "gemm_nchw": "nchw"}.get(algorithm, "auto")
    return implicit_gemm_plan(x, weight, bias, stride, padding, dilation, groups, precision, load_path, output_format)
