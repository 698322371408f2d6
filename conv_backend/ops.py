"""The `tritonconv::conv2d` operator: what the graph pass puts in place of aten.convolution.

Defined through torch.library with a fake implementation, so graphs that hold
it stay traceable (FakeTensor, dynamic shapes, Inductor), and with an autograd
formula (ATen's convolution_backward), so the op is also usable directly in
training. Beyond aten.convolution's arguments it takes a fused epilogue
(conv_backend.epilogue): eval batch norm, a residual add and an activation.

Compiled graphs call the op on every step, so its dispatch is kept short: the
Autograd kernel launches directly when nothing needs it (no gradient wanted,
plain tensors, no dispatch mode active, as in a compiled graph's forward),
where `torch.library.custom_op`'s wrappers cost several microseconds a call.
Otherwise it records autograd (_Conv2dFunction) or hands the call below
autograd, to the fake implementation or the backend kernels. Compiled graphs
call it as `tritonconv::conv2d_static` (below), the same operation with its
static arguments in one string.
"""
from __future__ import annotations

import ast
import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .epilogue import Epilogue, EpilogueTensors
from .layout import empty_output

_lib = torch.library.Library("tritonconv", "DEF")
_lib.define(
    "conv2d(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
    "SymInt groups, str input_precision='auto', str algorithm='auto', str output_format='eager', "
    "Tensor? bn_mean=None, Tensor? bn_var=None, Tensor? bn_weight=None, Tensor? bn_bias=None, float bn_eps=0.0, "
    "Tensor? residual=None, str activation='none', float[] activation_params=[], bool round_tf32=False) -> Tensor"
)
TRITON_CONV = torch.ops.tritonconv.conv2d.default
# Positions in conv2d's arguments that the passes read or rewrite. The epilogue's arguments follow
# output_format (EPILOGUE_START on); the dispatcher drops trailing defaults.
ALGORITHM_ARG, OUTPUT_FORMAT_ARG, EPILOGUE_START, RESIDUAL_ARG = 8, 9, 10, 15
EPILOGUE_DEFAULTS = (None, None, None, None, 0.0, None, "none", (), False)
ARG_NAMES = tuple(argument.name for argument in TRITON_CONV._schema.arguments)


def filled_epilogue(tail) -> tuple:
    """The nine epilogue arguments from those a call passed (`tail`), defaults filled in."""
    return tuple(tail) + EPILOGUE_DEFAULTS[len(tail):]


def epilogue_args(args) -> tuple:
    """The nine epilogue arguments of a positional call, defaults filled in."""
    return filled_epilogue(args[EPILOGUE_START:])


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int, input_precision: str = "auto", algorithm: str = "auto",
           output_format: str = "eager", bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None,
           bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None, bn_eps: float = 0.0,
           residual: Optional[Tensor] = None, activation: str = "none",
           activation_params: Sequence[float] = (), round_tf32: bool = False) -> Tensor:
    """2D convolution on our Triton kernels; same contract as aten.convolution (not transposed), then the
    fused epilogue `activation((conv - bn_mean) * rsqrt(bn_var + bn_eps) * bn_weight + bn_bias + residual)`,
    stored rounded to the nearest TF32 value where `round_tf32` (fp32 outputs; see conv_backend.tf32).

    x: (N, C, H, W) in any strides; weight: (OC, C / groups, KH, KW). output_format: "eager" picks the
    memory format from the inputs as ATen does; "contiguous" or "channels_last" pin it.
    """
    return TRITON_CONV(input, weight, bias, list(stride), list(padding), list(dilation), groups, input_precision,
                       algorithm, output_format, bn_mean, bn_var, bn_weight, bn_bias, float(bn_eps), residual,
                       activation, [float(p) for p in activation_params], bool(round_tf32))


def epilogue_of(bn_mean, bn_var, bn_weight, bn_bias, bn_eps, residual, activation, activation_params,
                round_tf32=False):
    """The static Epilogue and the EpilogueTensors of a call's epilogue arguments."""
    batch_norm = bn_mean is not None
    if batch_norm and (bn_var is None or bn_weight is None or bn_bias is None):
        raise ValueError("tritonconv: a fused batch norm needs bn_mean, bn_var, bn_weight and bn_bias")
    epilogue = Epilogue(batch_norm=batch_norm, bn_eps=bn_eps if batch_norm else 0.0, residual=residual is not None,
                        activation=activation, activation_params=tuple(activation_params),
                        round_tf32=bool(round_tf32))
    return epilogue, EpilogueTensors(bn_mean, bn_var, bn_weight, bn_bias, residual)


def _launch(*args):
    global _launch_conv2d
    if _launch_conv2d is None:  # dispatch imports this module: bound at the first call
        from .dispatch import launch_conv2d as _launch_conv2d
    return _launch_conv2d(*args)


_launch_conv2d = None


def _fake(input, weight, bias, stride, padding, dilation, groups, input_precision="auto", algorithm="auto",
          output_format="eager", *tail):
    epilogue_of(*filled_epilogue(tail))  # the same argument errors as a real call
    return empty_output(input, weight, stride, padding, dilation, output_format)


class _Conv2dFunction(torch.autograd.Function):
    """Autograd of the op: ATen's convolution_backward. A fused epilogue has no backward here: the graph
    pass fuses only in graphs that run without autograd (AOTAutograd's partitioned graphs)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, *rest):
        ctx.save_for_backward(input, weight)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        return TRITON_CONV(input, weight, bias, stride, padding, dilation, groups, *rest)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        grads = torch.ops.aten.convolution_backward(grad_output, input, weight, ctx.bias_shape, stride, padding,
                                                    dilation, False, [0, 0], groups, mask)
        return (*grads, *([None] * (len(ctx.needs_input_grad) - 3)))


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


# conv2d's tensor arguments, in order: input, weight, bias, the batch norm's four, residual. They are
# conv2d_static's first arguments, before its string.
TENSOR_ARGS = (0, 1, 2, *range(EPILOGUE_START, EPILOGUE_START + 4), RESIDUAL_ARG)


def _scan(tensors) -> tuple:
    """(whether a gradient is wanted, whether the short path may launch): only plain tensors (parameters
    included) and no dispatch mode (FakeTensor, tracing, functionalization) for the latter."""
    wants_grad = False
    plain = torch._C._len_torch_dispatch_stack() == 0
    for a in tensors:
        if a is not None:
            wants_grad = wants_grad or a.requires_grad
            plain = plain and type(a) in _PLAIN_TYPES
    return wants_grad and torch.is_grad_enabled(), plain


def _autograd_kernel(*args):
    wants_grad, plain = _scan(args[i] for i in TENSOR_ARGS if i < len(args))
    if wants_grad:
        if not epilogue_of(*epilogue_args(args))[0].is_identity:
            raise NotImplementedError("tritonconv::conv2d: a fused epilogue has no autograd formula; "
                                      "call the op without one when gradients are needed")
        return _Conv2dFunction.apply(*args)
    if plain:
        return _launch(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return TRITON_CONV(*args)


_lib.impl("conv2d", _launch, "CPU")
_lib.impl("conv2d", _launch, "CUDA")
_lib.impl("conv2d", _autograd_kernel, "Autograd")
torch.library.register_fake("tritonconv::conv2d", _fake, lib=_lib)


# The form compiled graphs call: the same operation with its twelve static arguments in one string. The
# dispatcher converts every argument of a call both ways, and this form has half as many, which saves
# several microseconds a call in Inductor's generated code; the string is parsed once (static_args).
_lib.define(
    "conv2d_static(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_mean, Tensor? bn_var, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor? residual, str static) -> Tensor"
)
TRITON_CONV_STATIC = torch.ops.tritonconv.conv2d_static.default


_CALL_DEFAULTS = ("auto", "auto", "eager") + EPILOGUE_DEFAULTS  # conv2d's defaults from input_precision on


def full_call_args(args) -> tuple:
    """A conv2d call's arguments with the dispatcher's dropped defaults filled in (all nineteen)."""
    return tuple(args) + _CALL_DEFAULTS[len(args) - 7:]


def named_args(args) -> dict:
    """A conv2d call's arguments by their schema names, the dispatcher's dropped defaults filled in."""
    return dict(zip(ARG_NAMES, full_call_args(args)))


def replaced_args(args, **changes) -> tuple:
    """A conv2d call's arguments (all nineteen, positional) with `changes` made by name."""
    named = named_args(args)
    unknown = sorted(set(changes) - set(named))
    if unknown:
        raise TypeError(f"tritonconv::conv2d has no argument(s) {unknown}")
    return tuple({**named, **changes}.values())


def static_string(args) -> Optional[str]:
    """conv2d_static's string for a conv2d call's arguments; None where one of them is not a constant (a
    symbolic size), which only the full form can carry."""
    full = full_call_args(args)
    stride, padding, dilation, groups = full[3:7]
    if not all(type(v) is int for v in (*stride, *padding, *dilation, groups)):
        return None
    precision, algorithm, output_format = full[7:10]
    eps, activation, params, round_tf32 = full[14], full[16], full[17], full[18]
    return repr((tuple(stride), tuple(padding), tuple(dilation), groups, precision, algorithm, output_format,
                 float(eps), activation, tuple(float(p) for p in params), bool(round_tf32)))


@functools.lru_cache(maxsize=None)
def static_args(static: str) -> tuple:
    """(stride, padding, dilation, groups, input_precision, algorithm, output_format, bn_eps, activation,
    activation_params, round_tf32) of a conv2d_static string."""
    return ast.literal_eval(static)


def full_args(input, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual, static) -> tuple:
    """conv2d's arguments for a conv2d_static call."""
    stride, padding, dilation, groups, precision, algorithm, output_format, eps, activation, params, round_tf32 = \
        static_args(static)
    return (input, weight, bias, stride, padding, dilation, groups, precision, algorithm, output_format, bn_mean,
            bn_var, bn_weight, bn_bias, eps, residual, activation, params, round_tf32)


def _launch_static(*args):
    return _launch(*full_args(*args))


def _static_autograd_kernel(*args):
    wants_grad, plain = _scan(args[:len(TENSOR_ARGS)])
    if wants_grad:
        return TRITON_CONV(*full_args(*args))  # the full form's autograd
    if plain:
        return _launch(*full_args(*args))
    with torch._C._AutoDispatchBelowAutograd():
        return TRITON_CONV_STATIC(*args)


_lib.impl("conv2d_static", _launch_static, "CPU")
_lib.impl("conv2d_static", _launch_static, "CUDA")
_lib.impl("conv2d_static", _static_autograd_kernel, "Autograd")
torch.library.register_fake("tritonconv::conv2d_static", lambda *args: _fake(*full_args(*args)), lib=_lib)
