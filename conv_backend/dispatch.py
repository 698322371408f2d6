"""The launch wrapper behind `tritonconv::conv2d`: checks, picks a kernel, runs it.

Everything decided per problem (support, kernel choice, launch arguments) is
cached in a plan keyed on shapes, strides, dtypes, devices and arguments, so a
call on a known problem costs a dict lookup plus the kernel launch.
"""
from __future__ import annotations

import functools
import logging

import torch

from .epilogue import Epilogue, EpilogueTensors, apply_reference
from .layout import OUTPUT_FORMATS, memory_format_for
from .lru import LRUCache, max_plans
from .options import ALGORITHMS, PRECISIONS
from .ops import epilogue_of, filled_epilogue
from .runtime import choose_fp32_precision
from .support import depthwise_like, epilogue_reason, unsupported_reason
from .tuning import NoKernelError, RetryPolicy

log = logging.getLogger("conv_backend")
# The most recently used plans (TRITONCONV_MAX_PLANS): dynamic shapes make a problem per input size.
_plans = LRUCache(max_plans())
# Plans that fell back to ATen because tuning failed; a transient cause (out of memory) is retried later.
_fallbacks: set = set()
_retry = RetryPolicy()


def aten_conv2d(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution.default(x, weight, bias, list(stride), list(padding), list(dilation),
                                              False, [0, 0], groups)


def _tensor_key(t):
    # Alignment is part of the key: tensor-descriptor (TMA) loads need a 16-byte aligned base.
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.layout, t.data_ptr() % 16 == 0)


def check_arguments(input_precision: str, algorithm: str, output_format: str) -> None:
    """The string arguments a direct call of the op can get wrong, with the valid values in the error."""
    if input_precision not in PRECISIONS:
        raise ValueError(f"tritonconv: input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"tritonconv: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"tritonconv: output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")


def launch_conv2d(x, weight, bias, stride, padding, dilation, groups, input_precision="auto", algorithm="auto",
                  output_format="eager", *epilogue_args):
    """The op's implementation; `epilogue_args` as in the op's schema (conv_backend.ops), defaults dropped."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one (as eager ops do).
        with torch.cuda.device(x.device):
            return _launch(x, weight, bias, stride, padding, dilation, groups, input_precision, algorithm,
                           output_format, epilogue_args)
    return _launch(x, weight, bias, stride, padding, dilation, groups, input_precision, algorithm, output_format,
                   epilogue_args)


def _launch(x, weight, bias, stride, padding, dilation, groups, input_precision, algorithm, output_format,
            epilogue_args):
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    precision = choose_fp32_precision(input_precision, x.shape, weight.shape, stride, padding, dilation, groups,
                                      x.dtype, x.device)
    tensors, epilogue_key = None, None
    if epilogue_args:
        epilogue_args = filled_epilogue(epilogue_args)
        mean, var, gamma, beta, eps, residual, activation, params, round_tf32 = epilogue_args
        tensors = EpilogueTensors(mean, var, gamma, beta, residual)
        # Everything a plan assumes of the epilogue's tensors; the Epilogue itself is built on a miss only.
        epilogue_key = (tuple(_tensor_key(t) for t in tensors), eps, activation, tuple(params), round_tf32)
    key = (_tensor_key(x), _tensor_key(weight), _tensor_key(bias), stride, padding, dilation, groups, precision,
           algorithm, output_format, epilogue_key)
    plan = _plans.get(key)
    if plan is None or (_fallbacks and key in _fallbacks and _retry.should_rebuild(key)):
        check_arguments(input_precision, algorithm, output_format)
        epilogue = epilogue_of(*epilogue_args)[0] if epilogue_args else Epilogue()
        plan = _plans[key] = _make_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm,
                                        output_format, epilogue, tensors or EpilogueTensors(), key)
    return plan(x, weight, bias, tensors)


def _make_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format, epilogue,
               tensors, key=None):
    aten = functools.partial(_aten_plan, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             output_format=output_format, epilogue=epilogue)
    reason = unsupported_reason(x, weight, bias, stride, padding, dilation, groups=groups, algorithm=algorithm) \
        or epilogue_reason(x, weight, stride, padding, dilation, epilogue, tensors)
    if reason is not None:
        # Direct calls of the op, or an epilogue whose tensors the kernels cannot read (the graph pass fuses
        # without looking at the batch norm's strides): ATen and the epilogue's reference compute it.
        log.info("tritonconv::conv2d falls back to ATen: %s", reason)
        return aten
    if x.numel() == 0 or weight.numel() == 0:
        return aten  # nothing to compute, and ATen defines the exact result (zeros or bias)
    try:
        run = _triton_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format,
                           epilogue, tensors)
    except NoKernelError as exc:
        _retry.failed(key, exc)
        _fallbacks.add(key)
        retry = " (a transient cause: tuning is tried again later)" if exc.transient else ""
        log.warning("tritonconv::conv2d falls back to ATen: %s%s", exc, retry)
        return aten
    if key in _fallbacks:
        _fallbacks.discard(key)
        _retry.succeeded(key)
    if epilogue.is_identity:
        return lambda x, weight, bias, tensors: run(x, weight, bias)
    return run


def _aten_plan(x, weight, bias, tensors, *, stride, padding, dilation, groups, output_format, epilogue):
    y = aten_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if not epilogue.is_identity:
        y = apply_reference(y.float() if y.dtype != torch.float64 else y, epilogue, tensors).to(x.dtype)
    return y.contiguous(memory_format=memory_format_for(output_format, x, weight))


def _triton_plan(x, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format, epilogue,
                 tensors):
    fused = {} if epilogue.is_identity else dict(epilogue=epilogue, epi=tensors)
    if algorithm == "seed":
        from .kernels.seed import seed_conv2d
        if not epilogue.is_identity:
            raise NoKernelError("algorithm='seed' runs no fused epilogue")
        return lambda x, weight, bias: seed_conv2d(x, weight, bias, stride, padding, dilation, precision,
                                                   output_format=output_format)
    if algorithm == "depthwise" or (algorithm == "auto" and depthwise_like(x.shape[1], weight.shape[0], groups)):
        from .kernels.depthwise import depthwise_plan
        return depthwise_plan(x, weight, bias, stride, padding, dilation, output_format, **fused)
    from .kernels.implicit_gemm import implicit_gemm_plan
    load_path = {"gemm_tma": "tma", "gemm_pointer": "pointer", "gemm_nchw": "nchw"}.get(algorithm, "auto")
    return implicit_gemm_plan(x, weight, bias, stride, padding, dilation, groups, precision, load_path, output_format,
                              **fused)
