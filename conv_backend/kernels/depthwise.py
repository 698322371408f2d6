"""Direct depthwise conv2d (groups == input channels, any channel multiplier).

Depthwise convolution does 2*KH*KW flops per output element and no reduction
over channels, so it is memory-bound and a GEMM formulation wastes the tensor
cores. A program computes a BLOCK_H x BLOCK_W x BLOCK_C tile of one image with
fp32 accumulators; each tap is one shifted load of the tile (served from
L1/L2 after the first), so DRAM sees each input element about once. Address
arithmetic is hoisted out of the tap loop (per tap only a scalar offset
changes), and tiles whose input window lies inside the image, the vast
majority, take an unmasked path. For three-row kernels at stride 1 the tuner
also times a variant that streams input rows through three rolling output
rows (_streamed_rows), loading each input element a third as often. The tuner
picks a tile contiguous along the input's innermost dimension (W for NCHW, C
for channels_last).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..epilogue import IDENTITY, NO_TENSORS, Epilogue, EpilogueTensors
from ..layout import empty_output
from ..runtime import interpreter_enabled
from ..tuning import Candidate
from .common import KernelLauncher, needs_int64, tile_origin, tuned_plan
from .epilogue_tl import EpilogueArgs, fused_epilogue, residual_of


@triton.jit
def _streamed_rows(x_img, w_col, b_ptr, y_img, oh0, ow, oc, OC, IH, IW, OH, OW, sxc, sxh, sxw, swh, sww,
                   syc, syh, syw, sb, pad_h, pad_w, dil_w, ic,
                   mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_img, src, srh, srw, bn_eps, act_param0, act_param1,
                   KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_C: tl.constexpr, HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """Three-row kernels at stride 1: the program walks its BLOCK_H + 2 input rows once, top to bottom,
    and each row, loaded once per kernel column, feeds the three output rows that read it; those three
    accumulators roll down with it. Every input element is loaded KW times instead of 3 * KW."""
    c_ok = (oc < OC)[None, :]
    iw0 = ow - pad_w
    x_cols = (iw0 * sxw)[:, None] + (ic * sxc)[None, :]
    y_cols = (ow * syw)[:, None] + (oc * syc)[None, :]
    ow_ok = (ow < OW)[:, None] & c_ok
    acc_top = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row j - 2 (its last input row)
    acc_mid = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row j - 1
    for j in tl.static_range(BLOCK_H + 2):
        ih = oh0 - pad_h + j
        acc_new = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row j (its first input row)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * dil_w
            ok = ((iw >= 0) & (iw < IW))[:, None] & c_ok & (ih >= 0) & (ih < IH)
            x = tl.load(x_img + ih * sxh + kw * dil_w * sxw + x_cols, mask=ok, other=0.0).to(tl.float32)
            w_kw = w_col + kw * sww
            acc_top += x * tl.load(w_kw + 2 * swh, mask=oc < OC, other=0.0).to(tl.float32)[None, :]
            acc_mid += x * tl.load(w_kw + swh, mask=oc < OC, other=0.0).to(tl.float32)[None, :]
            acc_new += x * tl.load(w_kw, mask=oc < OC, other=0.0).to(tl.float32)[None, :]
        if j >= 2:  # output row j - 2 has all three of its input rows
            oh = oh0 + j - 2
            if HAS_BIAS:
                acc_top += tl.load(b_ptr + oc * sb, mask=oc < OC, other=0.0).to(tl.float32)[None, :]
            out_ok = ow_ok & (oh < OH)
            res_ptrs = r_img
            if HAS_RESIDUAL:
                res_ptrs = r_img + oh * srh + (ow * srw)[:, None] + (oc * src)[None, :]
            acc_top = fused_epilogue(acc_top, oc[None, :], c_ok, out_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                                     res_ptrs, bn_eps, act_param0, act_param1, HAS_BN, HAS_RESIDUAL, ACTIVATION,
                                     ROUND_TF32)
            tl.store(y_img + oh * syh + y_cols, acc_top.to(y_img.dtype.element_ty), mask=out_ok)
        acc_top = acc_mid
        acc_mid = acc_new


@triton.jit
def depthwise_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr,  # the fused epilogue's (epilogue_tl)
    OC, MULT, IH, IW, OH, OW,
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw, sb,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    srn, src, srh, srw, bn_eps, act_param0, act_param1,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, STREAM_ROWS: tl.constexpr,
    HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """STREAM_ROWS (KH == 3, stride 1, dil_h 1): _streamed_rows; otherwise a BLOCK_H x BLOCK_W x BLOCK_C
    tile with one shifted load per tap."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    img, oh0, ow0 = tile_origin(pid, OH, OW, BLOCK_H, BLOCK_W)
    c0 = pid_c * BLOCK_C
    if USE_INT64:  # every index that meets a stride, and the row and column strides the taps step by
        img = img.to(tl.int64)
        oh0 = oh0.to(tl.int64)
        ow0 = ow0.to(tl.int64)
        c0 = c0.to(tl.int64)
        sxh = tl.cast(sxh, tl.int64)
        sxw = tl.cast(sxw, tl.int64)

    ow = ow0 + tl.arange(0, BLOCK_W)
    oc = c0 + tl.arange(0, BLOCK_C)
    if STREAM_ROWS:
        _streamed_rows(x_ptr + img * sxn, w_ptr + oc * swo, b_ptr, y_ptr + img * syn, oh0, ow, oc, OC, IH, IW,
                       OH, OW, sxc, sxh, sxw, swh, sww, syc, syh, syw, sb, pad_h, pad_w, dil_w, oc // MULT,
                       mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr + img * srn, src, srh, srw, bn_eps,
                       act_param0, act_param1, KW, HAS_BIAS, BLOCK_H, BLOCK_W, BLOCK_C, HAS_BN, HAS_RESIDUAL,
                       ACTIVATION, ROUND_TF32)
    else:
        oh = oh0 + tl.arange(0, BLOCK_H)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        ic = oc // MULT
        x_tile = (x_ptr + img * sxn + (ih0 * sxh)[:, None, None] + (iw0 * sxw)[None, :, None]
                  + (ic * sxc)[None, None, :])
        w_col = w_ptr + oc * swo
        out_ok = (oh < OH)[:, None, None] & (ow < OW)[None, :, None] & (oc < OC)[None, None, :]

        # Whole input window in bounds and a full tile: no masks needed.
        ih_first = oh0 * stride_h - pad_h
        iw_first = ow0 * stride_w - pad_w
        interior = ((ih_first >= 0) & (ih_first + (BLOCK_H - 1) * stride_h + (KH - 1) * dil_h < IH)
                    & (iw_first >= 0) & (iw_first + (BLOCK_W - 1) * stride_w + (KW - 1) * dil_w < IW)
                    & (oh0 + BLOCK_H <= OH) & (ow0 + BLOCK_W <= OW) & (c0 + BLOCK_C <= OC))

        acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
        if interior:
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    x = tl.load(x_tile + (kh * dil_h * sxh + kw * dil_w * sxw))
                    w = tl.load(w_col + (kh * swh + kw * sww))
                    acc += x.to(tl.float32) * w.to(tl.float32)[None, None, :]
        else:
            c_ok = (oc < OC)[None, None, :]
            for kh in tl.static_range(KH):
                ih = ih0 + kh * dil_h
                row_ok = ((ih >= 0) & (ih < IH))[:, None, None]
                for kw in tl.static_range(KW):
                    iw = iw0 + kw * dil_w
                    ok = row_ok & ((iw >= 0) & (iw < IW))[None, :, None] & c_ok
                    x = tl.load(x_tile + (kh * dil_h * sxh + kw * dil_w * sxw), mask=ok, other=0.0)
                    w = tl.load(w_col + (kh * swh + kw * sww), mask=oc < OC, other=0.0)
                    acc += x.to(tl.float32) * w.to(tl.float32)[None, None, :]

        if HAS_BIAS:
            acc += tl.load(b_ptr + oc * sb, mask=oc < OC, other=0.0).to(tl.float32)[None, None, :]
        res_ptrs = r_ptr
        if HAS_RESIDUAL:
            res_ptrs = (r_ptr + img * srn + (oh * srh)[:, None, None] + (ow * srw)[None, :, None]
                        + (oc * src)[None, None, :])
        acc = fused_epilogue(acc, oc[None, None, :], (oc < OC)[None, None, :], out_ok, mean_ptr, var_ptr, gamma_ptr,
                             beta_ptr, res_ptrs, bn_eps, act_param0, act_param1, HAS_BN, HAS_RESIDUAL, ACTIVATION,
                             ROUND_TF32)
        y_tile = (y_ptr + img * syn + (oh * syh)[:, None, None] + (ow * syw)[None, :, None]
                  + (oc * syc)[None, None, :])
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def depthwise_candidates(channels_innermost: bool, streamable: bool = False) -> list:
    """Tile configs; `streamable` (a three-row kernel at stride 1, dil_h 1) adds _streamed_rows tiles."""
    if interpreter_enabled():
        return [Candidate.make("depthwise", BLOCK_H=4, BLOCK_W=8, BLOCK_C=4)]
    if channels_innermost:  # NHWC: vectorise along channels
        shapes = [(4, 8, 32, 4), (2, 8, 64, 4), (8, 8, 16, 4), (4, 16, 32, 8), (1, 16, 64, 4), (2, 16, 32, 4),
                  (8, 16, 32, 8), (16, 8, 32, 8), (8, 8, 64, 8)]  # taller tiles: less halo re-read per output
        streamed = [(8, 8, 32, 2), (8, 16, 32, 4)]  # on #82/#84 5% behind the best plain tile (probe 21)
        # At 118 registers a thread, two 8-warp programs fit on an SM and DRAM sat at half its bandwidth
        # (ncu); capped at 80, three fit: #82 0.770 -> 0.699 ms (probe 26; 64 spills, 96 fits only two).
        capped = [(16, 8, 32, 8), (8, 16, 32, 8), (8, 8, 64, 8)]
    else:  # NCHW: vectorise along W
        shapes = [(8, 64, 1, 4), (16, 64, 1, 8), (4, 128, 1, 4), (8, 128, 1, 8), (32, 32, 1, 4), (16, 32, 1, 4)]
        streamed = [(8, 64, 1, 2), (16, 128, 1, 4), (32, 64, 1, 2), (16, 256, 1, 8)]  # #82: 0.92 -> 0.80 ms
        capped = []
    picked = [Candidate.make("depthwise", num_warps=w, num_stages=1, BLOCK_H=h, BLOCK_W=bw, BLOCK_C=c)
              for h, bw, c, w in shapes]
    picked += [Candidate.make("depthwise", num_warps=w, num_stages=1, maxnreg=80, BLOCK_H=h, BLOCK_W=bw, BLOCK_C=c)
               for h, bw, c, w in capped]
    if streamable:
        picked += [Candidate.make("depthwise", num_warps=w, num_stages=1, BLOCK_H=h, BLOCK_W=bw, BLOCK_C=c,
                                  STREAM_ROWS=1) for h, bw, c, w in streamed]
    return picked


def depthwise_plan(x, weight, bias, stride, padding, dilation, output_format="eager",
                   epilogue: Epilogue = IDENTITY, epi: EpilogueTensors = NO_TENSORS):
    """Tune (or recall) the tile for this problem, with `epilogue` fused (`epi`: example tensors of it, for the
    residual's strides); return `run(x, weight, bias, epi=NO_TENSORS) -> y`."""
    y = empty_output(x, weight, stride, padding, dilation, output_format)
    n, c, in_h, in_w = x.shape
    oc, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = y.shape[2], y.shape[3]
    fused = EpilogueArgs(epilogue, epi, y)
    scalars = (oc, oc // c, in_h, in_w, out_h, out_w, *x.stride(), weight.stride(0), weight.stride(2),
               weight.stride(3), *y.stride(), bias.stride(0) if bias is not None else 0, *stride, *padding, *dilation,
               *fused.scalars)
    flags = dict(KH=kernel_h, KW=kernel_w, HAS_BIAS=bias is not None,
                 USE_INT64=needs_int64(x, weight, y, *residual_of(epilogue, epi)), **fused.constexprs)

    def make(cand: Candidate):
        p = cand.params
        grid = (n * triton.cdiv(out_h, p["BLOCK_H"]) * triton.cdiv(out_w, p["BLOCK_W"]), triton.cdiv(oc, p["BLOCK_C"]))

        kernel = KernelLauncher(depthwise_kernel, grid, scalars, **flags, num_warps=cand.num_warps,
                                num_stages=cand.num_stages, **{"STREAM_ROWS": 0, **p})

        def launch(x, weight, bias, y, epi=NO_TENSORS):
            kernel(x, weight, y if bias is None else bias, y, *fused.pointers(epi, y))
        return launch

    streamable = kernel_h == 3 and tuple(stride) == (1, 1) and dilation[0] == 1
    candidates = depthwise_candidates(x.stride(1) == 1 and c > 1, streamable)
    return tuned_plan("depthwise", x, weight, bias, y, stride, padding, dilation, c, candidates, make,
                      epilogue=epilogue, epi=epi)


def depthwise_conv2d(x, weight, bias, stride, padding, dilation, epilogue: Epilogue = IDENTITY,
                     epi: EpilogueTensors = NO_TENSORS):
    """One-off call: plan and run."""
    return depthwise_plan(x, weight, bias, stride, padding, dilation, epilogue=epilogue, epi=epi)(x, weight, bias, epi)
