"""The `tritonconv::conv2d` custom op: what the graph pass puts in place of aten.convolution.

Registered through torch.library with a fake implementation, so graphs that hold
it stay traceable (FakeTensor, dynamic shapes), and with an autograd formula
(ATen's convolution_backward), so the op is also usable directly in training.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import empty_output


@torch.library.custom_op("tritonconv::conv2d", mutates_args=())
def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    input_precision: str = "auto",
    algorithm: str = "auto",
    output_format: str = "eager",
) -> Tensor:
    """2D convolution on our Triton kernels; same contract as aten.convolution (not transposed).

    output_format: "eager" picks the memory format from the inputs as ATen does;
    "contiguous" or "channels_last" pin it (see conv_backend.layout.OUTPUT_FORMATS).
    """
    from .dispatch import launch_conv2d
    return launch_conv2d(input, weight, bias, stride, padding, dilation, groups, input_precision, algorithm,
                         output_format)


@conv2d.register_fake
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, input_precision="auto", algorithm="auto",
                 output_format="eager"):
    return empty_output(input, weight, stride, padding, dilation, output_format)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs[:7]
    ctx.save_for_backward(input, weight)
    ctx.bias_shape = None if bias is None else list(bias.shape)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None and ctx.needs_input_grad[2]]
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output, input, weight, ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups, mask)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


conv2d.register_autograd(_backward, setup_context=_setup_context)
