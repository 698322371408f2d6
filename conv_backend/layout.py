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

    channels_last when the input or the weight suggests channels_last (cuDNN and
    the CPU kernels agree on this; so does FakeTensor's rule for convolution).
    """
    if suggest_memory_format(x) == torch.channels_last or suggest_memory_format(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


# "eager" derives the format from the inputs as ATen does; the graph pass pins one of the
# other two (the format eager produced when the graph was traced, or channels_last
# between consecutive convolutions), so that a channels_last input it arranged for
# does not leak channels_last into the rest of the graph.
OUTPUT_FORMATS = ("eager", "contiguous", "channels_last")


def memory_format_for(output_format: str, x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format an output_format (one of OUTPUT_FORMATS) names for these operands."""
    if output_format == "contiguous":
        return torch.contiguous_format
    if output_format == "channels_last":
        return torch.channels_last
    if output_format == "eager":
        return output_memory_format(x, weight)
    raise ValueError(f"tritonconv: output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")


def empty_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], output_format: str = "eager") -> torch.Tensor:
    """The output tensor, in the memory format `output_format` names (see OUTPUT_FORMATS)."""
    n, _, in_h, in_w = x.shape
    out_c, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = conv_output_hw(in_h, in_w, kernel_h, kernel_w, stride, padding, dilation)
    return torch.empty((n, out_c, out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_for(output_format, x, weight))
