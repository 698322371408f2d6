"""Output shape and memory format of a 2D convolution, shared by the fake and real kernels."""
from __future__ import annotations

from typing import Sequence

import torch
from torch._prims_common import suggest_memory_format


def conv_output_hw(in_h, in_w, kernel_h, kernel_w, stride, padding, dilation):
    """Output height and width (works on ints and SymInts)."""
    out_h = (in_h + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (in_w + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    return out_h, out_w


def output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format eager's convolution gives its output.

    Mirrors ATen's meta function for convolution: on CUDA the output is
    channels_last when the input or the weight is; elsewhere only the input counts.
    """
    if suggest_memory_format(x) == torch.channels_last:
        return torch.channels_last
    if x.device.type == "cuda" and suggest_memory_format(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]) -> torch.Tensor:
    n, _, in_h, in_w = x.shape
    out_c, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = conv_output_hw(in_h, in_w, kernel_h, kernel_w, stride, padding, dilation)
    return torch.empty((n, out_c, out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x, weight))
