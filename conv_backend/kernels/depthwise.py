"""Direct depthwise conv2d (groups == input channels, any channel multiplier).

Depthwise convolution does 2*KH*KW flops per output element and no reduction
over channels, so it is memory-bound and a GEMM formulation wastes the tensor
cores; this kernel reads each input element from cache once per tap and keeps
fp32 accumulators in registers. A tile is BLOCK_H x BLOCK_W pixels of one image
by BLOCK_C channels; the tuner picks a tile shape that is contiguous along the
input's innermost dimension (W for NCHW, C for channels_last).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import empty_output
from ..runtime import interpreter_enabled
from ..tuning import Candidate, problem_signature, select
from .common import needs_int64


@triton.jit
def depthwise_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    OC, MULT, IH, IW, OH, OW,
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    tiles_w = tl.cdiv(OW, BLOCK_W)
    tiles_hw = tl.cdiv(OH, BLOCK_H) * tiles_w
    img = pid // tiles_hw
    oh0 = (pid % tiles_hw) // tiles_w * BLOCK_H
    ow0 = (pid % tiles_w) * BLOCK_W
    if USE_INT64:
        img = img.to(tl.int64)

    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = oh0 + offs_p // BLOCK_W
    ow = ow0 + offs_p % BLOCK_W
    oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = oc < OC
    ic = oc // MULT
    p_ok = (oh < OH) & (ow < OW)
    x_img = x_ptr + img * sxn

    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        row_ok = p_ok & (ih >= 0) & (ih < IH)
        for kw in tl.static_range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = row_ok & (iw >= 0) & (iw < IW)
            x = tl.load(x_img + (ih * sxh + iw * sxw)[:, None] + (ic * sxc)[None, :],
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptr + oc * swo + kh * swh + kw * sww, mask=c_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]

    if HAS_BIAS:
        acc += tl.load(b_ptr + oc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_offsets = img * syn + (oh * syh + ow * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def depthwise_candidates(channels_innermost: bool) -> list:
    if interpreter_enabled():
        return [Candidate.make("depthwise", BLOCK_H=4, BLOCK_W=8, BLOCK_C=4)]
    if channels_innermost:  # NHWC: vectorise along channels
        shapes = [(4, 8, 32, 4), (2, 8, 64, 4), (1, 16, 64, 4), (8, 8, 16, 4), (4, 16, 32, 8), (2, 4, 128, 4)]
    else:  # NCHW: vectorise along W
        shapes = [(8, 64, 1, 4), (16, 32, 1, 4), (4, 128, 1, 4), (8, 128, 1, 8), (16, 64, 1, 8), (4, 64, 2, 4),
                  (32, 32, 1, 8)]
    return [Candidate.make("depthwise", num_warps=w, num_stages=1, BLOCK_H=h, BLOCK_W=bw, BLOCK_C=c)
            for h, bw, c, w in shapes]


def depthwise_conv2d(x, weight, bias, stride, padding, dilation):
    y = empty_output(x, weight, stride, padding, dilation)
    n, c, in_h, in_w = x.shape
    oc, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = y.shape[2], y.shape[3]
    has_bias = bias is not None
    channels_innermost = x.stride(1) == 1 and c > 1

    def run(cand: Candidate):
        p = cand.params
        grid = (n * triton.cdiv(out_h, p["BLOCK_H"]) * triton.cdiv(out_w, p["BLOCK_W"]), triton.cdiv(oc, p["BLOCK_C"]))
        depthwise_kernel[grid](
            x, weight, bias if has_bias else y, y, oc, oc // c, in_h, in_w, out_h, out_w,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *y.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kernel_h, KW=kernel_w, HAS_BIAS=has_bias, USE_INT64=needs_int64(x, weight, y),
            num_warps=cand.num_warps, num_stages=cand.num_stages, **p)

    key = (f"depthwise|x{tuple(x.shape)}{tuple(x.stride())}|w{tuple(weight.shape)}|y{tuple(y.stride())}"
           f"|s{tuple(stride)}p{tuple(padding)}d{tuple(dilation)}|{x.dtype}|b{has_bias}")
    signature = problem_signature(x.shape, weight.shape, stride, padding, dilation, c, x.dtype)
    choice = select(key, signature, x.device, depthwise_candidates(channels_innermost), run)
    run(choice)
    return y
