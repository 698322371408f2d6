"""Which convolutions our kernels take, and in words why not.

The same rules serve the graph pass (on fake tensors from `node.meta["val"]`)
and the launch wrapper (on real tensors), so the two can never disagree.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layout import conv_output_hw
from .runtime import SUPPORTED_DTYPES, device_supported, has_tma


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes y and z


def _is_static_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def has_static_layout(t: torch.Tensor) -> bool:
    """Every size and stride of `t` a plain int (none symbolic, as under dynamic shapes)."""
    return all(_is_static_int(d) for d in (*t.shape, *t.stride()))


def depthwise_like(in_channels, out_channels, groups) -> bool:
    """Each group sees one input channel (depthwise, with any channel multiplier)."""
    return groups > 1 and groups == in_channels and out_channels % groups == 0


def unsupported_reason(
    x, weight, bias, stride: Sequence, padding: Sequence, dilation: Sequence,
    transposed: bool = False, output_padding: Sequence = (0, 0), groups=1,
    algorithm: str = "auto",
) -> Optional[str]:
    """None when our kernels compute this convolution exactly as ATen would, else the reason."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return "input or weight has no tensor metadata"
    if bias is not None and not isinstance(bias, torch.Tensor):
        return "bias has no tensor metadata"
    if weight.dim() != 4:
        return f"{weight.dim() - 2}D convolution (only 2D is supported)"
    if x.dim() != 4:
        return f"input of rank {x.dim()} (expected N, C, H, W)"
    if transposed:
        return "transposed convolution"
    if any(t.layout != torch.strided for t in (x, weight) + ((bias,) if bias is not None else ())):
        return "non-strided (sparse or mkldnn) tensor"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (supported: float32, float16, bfloat16)"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        dtypes = [x.dtype, weight.dtype] + ([bias.dtype] if bias is not None else [])
        return f"mixed dtypes {dtypes}"
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        return "input, weight and bias on different devices"
    ok, why = device_supported(x.device)
    if not ok:
        return why
    for name, values, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(values) != 2:
            return f"{name} {list(values)} is not 2D"
        if any(_is_static_int(v) and v < least for v in values):
            return f"{name} {list(values)} below {least}"
    if any(_is_static_int(v) and v != 0 for v in output_padding):
        return f"output_padding {list(output_padding)}"
    if not _is_static_int(groups) or groups < 1:
        return f"groups={groups!r}"
    in_c, out_c = x.shape[1], weight.shape[0]
    if _is_static_int(in_c) and weight.shape[1] * groups != in_c:
        return "input channels do not match weight and groups (ATen raises the error)"
    if _is_static_int(out_c) and out_c % groups != 0:
        return "output channels not divisible by groups (ATen raises the error)"
    if bias is not None and (bias.dim() != 1 or (_is_static_int(out_c) and bias.shape[0] != out_c)):
        return "bias shape does not match output channels (ATen raises the error)"
    for size, kernel, pad, dil in zip(x.shape[2:], weight.shape[2:], padding, dilation):
        values = (size, kernel, pad, dil)
        if all(_is_static_int(v) for v in values) and size + 2 * pad - dil * (kernel - 1) - 1 < 0:
            return "kernel larger than padded input (ATen raises the error)"
    if algorithm == "seed" and groups != 1:
        return "algorithm='seed' handles groups == 1 only"
    if algorithm == "seed" and _is_static_int(x.shape[0]) and x.shape[0] > MAX_GRID_YZ:
        return f"algorithm='seed' launches one grid row per image (at most {MAX_GRID_YZ})"
    if groups > MAX_GRID_YZ:
        return f"more than {MAX_GRID_YZ} groups (one grid row per group)"
    if _is_static_int(out_c) and out_c > MAX_GRID_YZ and depthwise_like(in_c, out_c, groups):
        return f"depthwise with more than {MAX_GRID_YZ} output channels (grid rows of channels)"
    if algorithm == "depthwise" and not depthwise_like(in_c, out_c, groups):
        return "algorithm='depthwise' needs groups == input channels"
    if algorithm == "gemm_tma":
        why = tma_reason(x, weight, stride, groups)
        return f"algorithm='gemm_tma': {why}" if why else None
    return None


def tma_reason(x, weight, stride, groups) -> Optional[str]:
    """None when the input can be read as zero-filled NHWC boxes by the copy engine (TMA)."""
    if not has_tma(x.device):
        return "tensor-descriptor loads need a Hopper (sm_90) or newer GPU"
    if tuple(stride) != (1, 1):
        sizes = (*x.shape[2:], *stride)
        if not all(_is_static_int(v) for v in sizes) or x.shape[2] % stride[0] or x.shape[3] % stride[1]:
            return "a strided box load needs input height and width divisible by the stride"
    elem = x.element_size()
    channels = x.shape[1] if groups == 1 else weight.shape[1]
    if (channels * elem) % 16 or (groups > 1 and channels % 16):
        return "channels (per group) must fill 16-byte rows" + (" and multiples of 16" if groups > 1 else "")
    return None


def epilogue_reason(x, weight, stride, padding, dilation, epilogue, tensors) -> Optional[str]:
    """None when our kernels can apply `epilogue` (conv_backend.epilogue) with these tensors, else the reason."""
    if epilogue.is_identity:
        return None
    if epilogue.round_tf32 and x.dtype != torch.float32:
        return f"rounding the output to TF32 applies to fp32 outputs, not {x.dtype}"
    out_c = weight.shape[0]
    if epilogue.batch_norm:
        for name in ("bn_mean", "bn_var", "bn_weight", "bn_bias"):
            t = getattr(tensors, name)
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device != x.device:
                return f"fused batch norm: {name} is not a strided tensor on the input's device"
            if t.dim() != 1 or (_is_static_int(out_c) and t.shape[0] != out_c):
                return f"fused batch norm: {name} is not a vector of the output channels"
            if t.shape[0] > 1 and t.stride(0) != 1:
                return f"fused batch norm: {name} is not contiguous"
            if t.dtype not in SUPPORTED_DTYPES:
                return f"fused batch norm: {name} has dtype {t.dtype}"
    if epilogue.residual:
        r = tensors.residual
        if not isinstance(r, torch.Tensor) or r.layout != torch.strided or r.device != x.device or r.dtype != x.dtype:
            return "fused residual: not a strided tensor of the input's dtype and device"
        out_h, out_w = conv_output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding,
                                      dilation)
        if tuple(r.shape) != (x.shape[0], out_c, out_h, out_w):
            return "fused residual: its shape is not the convolution's output shape"
    return None
