"""Implicit-GEMM conv2d: M = output pixels, N = output channels, K = KH*KW*C with channels innermost.

Two load paths share the same math:
- TMA (Hopper and newer; strides dividing H and W): the input is read as NHWC
  boxes, one per (kh, kw) tap and channel chunk, through a tensor descriptor;
  boxes that start in the padding are zero-filled by the copy engine, so padding
  costs nothing. Strides fold into the descriptor's shape (see the kernel).
- Pointer loads (any GPU, any stride, any channel count): the same loop with
  masked gathers, vectorised along channels when the input is channels_last.
  On Hopper a variant takes its weight tiles through a tensor descriptor: its
  pixel tiles run across the whole batch, so where a box would run past a
  small map's edge (7x7, 14x14, 28x28) no tensor-core work is wasted.
For maps too small to fill the GPU with tiles, either path can also split K
(grid axis 2; the slices are summed in a fixed order, so results are deterministic).
Grouped convolution runs one GEMM per group (grid axis 1). For a few input
channels (a network's stem) the tuner also times the seed's direct kernel,
whose flattened K = C*KH*KW wastes no lanes. A third kernel, the transposed
GEMM over NCHW tensors (M = output channels, N = pixels), competes for 1x1
convolutions of NCHW inputs, which it reads in place.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..epilogue import IDENTITY, NO_TENSORS, Epilogue, EpilogueTensors
from ..layout import empty_output
from ..runtime import has_tma, interpreter_enabled
from ..support import tma_reason
from ..tuning import Candidate
from . import halo, warp_specialized
from .common import (KernelLauncher, WeightDescriptors, box_row_channels, fit_box, mma, needs_dot_upcast,
                     needs_int64, strided_input_view, tile_origin, tuned_plan)
from .epilogue_gluon import gluon_takes_epilogue
from .epilogue_tl import EpilogueArgs, fused_epilogue, residual_of
from .seed import seed_conv2d_kernel, seed_launch_args

log = logging.getLogger("conv_backend")


@triton.jit
def _finish_tile(acc, b_ptr, sb, y_ptr, img, oh, ow, m_ok, oc, n_ok, syn, syc, syh, syw,
                 mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr, srn, src, srh, srw, bn_eps, act_param0, act_param1,
                 HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                 ROUND_TF32: tl.constexpr):
    """Bias, the fused epilogue and the one store of a [pixels, channels] tile (its pixels' image, row and
    column; its channels)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc * sb, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    res_ptrs = r_ptr
    if HAS_RESIDUAL:
        res_ptrs = r_ptr + (img * srn + oh * srh + ow * srw)[:, None] + (oc * src)[None, :]
    acc = fused_epilogue(acc, oc[None, :], n_ok[None, :], out_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr, res_ptrs,
                         bn_eps, act_param0, act_param1, HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32)
    y_offsets = (img * syn + oh * syh + ow * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _k_slice(k_steps, SPLIT_K: tl.constexpr):
    """This program's K steps [first, last): all of them, or its slice of SPLIT_K (grid axis 2)."""
    k_first = k_steps * 0
    k_last = k_steps
    if SPLIT_K > 1:
        per_slice = tl.cdiv(k_steps, SPLIT_K)
        k_first = tl.program_id(2) * per_slice
        k_last = min(k_first + per_slice, k_steps)
    return k_first, k_last


@triton.jit
def _sum_k_slices(acc, partial_ptr, arrivals_ptr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Split-K (grid axis 2 is the K slice): store this slice's fp32 tile; the last of the tile's
    programs to arrive (counted in `arrivals`, which it leaves at zero again) sums the slices in a
    fixed order, so the result does not depend on which slice finished first.
    Returns (the sum, whether this program is the one to store it)."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    partials = partial_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N) + in_tile
    tl.store(partials + tl.program_id(2) * (BLOCK_M * BLOCK_N), acc)
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted
    last = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_slice in range(SPLIT_K):
            acc += tl.load(partials + k_slice * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
        tl.store(arrivals_ptr + tile, 0)
    return acc, last


@triton.jit
def igemm_pointer_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, partial_ptr, arrivals_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr,  # the fused epilogue's (epilogue_tl)
    M, OH, OW, IH, IW, CG, OCG, C_CHUNKS, CPAD,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw, sb,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    srn, src, srh, srw, bn_eps, act_param0, act_param1,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, TMA_WEIGHTS: tl.constexpr,
    HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """SPLIT_K > 1 (grid axis 2) cuts K into slices for maps too small to fill the GPU with tiles
    (summed by _sum_k_slices).

    TMA_WEIGHTS (Hopper): `w_ptr` is the descriptor of the packed weight [OC, KH*KW*CPAD] and its tiles
    come through the copy engine, while input pixels are still gathered. Its tiles are runs of
    BLOCK_M pixels of the whole batch, which no map size leaves part-empty: on 7x7 or 14x14 maps an
    8x8 or 8x16 box spends a quarter of its tensor-core work on pixels past the map's edge."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    # Grouped tile order: GROUP_M pixel tiles share their input rows in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(OCG, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    n0 = group * OCG + pid_n * BLOCK_N  # the weight tile's first row (TMA_WEIGHTS); int32, as TMA wants
    if USE_INT64:  # before the first product: past 2**31 pixels, pid_m * BLOCK_M passes int32 too
        pid_m = pid_m.to(tl.int64)
        group = group.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < OCG
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    oc = group * OCG + offs_n
    x_rows = x_ptr + img * sxn + group * CG * sxc

    k_first, k_last = _k_slice(KH * KW * C_CHUNKS, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, k_last):
        tap = k // C_CHUNKS
        c0 = (k - tap * C_CHUNKS) * BLOCK_K
        c = c0 + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
        c_ok = c < CG
        a = tl.load(x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                    mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        if TMA_WEIGHTS:  # channels past CG are zeros in the packed weight, rows past OC zero-filled
            b = w_ptr.load([n0, tap * CPAD + c0]).T
        else:
            b = tl.load(w_ptr + (oc * swo)[None, :] + c[:, None] * swc + (kh * swh + kw * sww),
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)

    store = True
    if SPLIT_K > 1:
        acc, store = _sum_k_slices(acc, partial_ptr, arrivals_ptr, SPLIT_K, BLOCK_M, BLOCK_N)
    if store:  # after the slices' sum: the epilogue is not linear
        _finish_tile(acc, b_ptr, sb, y_ptr, img, oh, ow, m_ok, oc, n_ok, syn, syc, syh, syw,
                     mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr, srn, src, srh, srw, bn_eps, act_param0, act_param1,
                     HAS_BIAS, HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32)


@triton.jit
def igemm_tma_kernel(
    x_desc, w_desc, b_ptr, y_ptr, partial_ptr, arrivals_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr,  # the fused epilogue's (epilogue_tl)
    N, OH, OW, C, CG, OCG, C_CHUNKS, CPAD,
    syn, syc, syh, syw, sb, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    srn, src, srh, srw, bn_eps, act_param0, act_param1,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """A pixel tile is a BLOCK_B x BLOCK_H x BLOCK_W box of output pixels: BLOCK_B > 1 stacks
    several images' maps where one map is smaller than the tile (7x7, 14x14). SPLIT_K > 1 as in
    the pointer kernel.

    The input is read as 5-D [N, H/sh, sh, W/sw, sw*C]: input row ih = sh*q + r is (q, r), so a
    box of consecutive q holds the rows that consecutive output rows read at one tap, whatever the
    stride; along W the phase r is folded into the channel axis. Stride 1 is the plain NHWC box.
    """
    BLOCK_M: tl.constexpr = BLOCK_B * BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    group = tl.program_id(1)
    # Output-channel tiles of one pixel tile run next to each other: the input box is reused from L2.
    num_pid_n = tl.cdiv(OCG, BLOCK_N)
    pid_n = pid % num_pid_n
    tile = pid // num_pid_n
    box, oh0, ow0 = tile_origin(tile, OH, OW, BLOCK_H, BLOCK_W)  # a box spans BLOCK_B maps
    img0 = box * BLOCK_B
    c_base = group * CG
    n0 = group * OCG + pid_n * BLOCK_N

    k_first, k_last = _k_slice(KH * KW * C_CHUNKS, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, k_last):
        tap = k // C_CHUNKS
        c0 = (k - tap * C_CHUNKS) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        # Input row kh*dil - pad + stride*oh = stride*(oh + q) + r with q = floor((kh*dil - pad) / stride);
        # the pad*stride added here keeps the operands of // and % non-negative.
        t_h = kh * dil_h + (stride_h - 1) * pad_h
        t_w = kw * dil_w + (stride_w - 1) * pad_w
        a = x_desc.load([img0, oh0 + t_h // stride_h - pad_h, t_h % stride_h, ow0 + t_w // stride_w - pad_w,
                         (t_w % stride_w) * C + c_base + c0])
        a = a.reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([n0, tap * CPAD + c0])
        acc = mma(a, b.T, acc, INPUT_PRECISION, UPCAST_DOT)

    offs_m = tl.arange(0, BLOCK_M)
    in_map = offs_m % (BLOCK_H * BLOCK_W)
    oh = oh0 + in_map // BLOCK_W
    ow = ow0 + in_map % BLOCK_W
    img = img0 + offs_m // (BLOCK_H * BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = group * OCG + offs_n
    if USE_INT64:  # ow too: a flat problem (_flat_pixels) is one row of all the batch's pixels; oc for NCHW
        img = img.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
        oc = oc.to(tl.int64)
    store = True
    if SPLIT_K > 1:
        acc, store = _sum_k_slices(acc, partial_ptr, arrivals_ptr, SPLIT_K, BLOCK_M, BLOCK_N)
    if store:  # after the slices' sum: the epilogue is not linear
        _finish_tile(acc, b_ptr, sb, y_ptr, img, oh, ow, (img < N) & (oh < OH) & (ow < OW), oc, offs_n < OCG,
                     syn, syc, syh, syw,
                     mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr, srn, src, srh, srw, bn_eps, act_param0, act_param1,
                     HAS_BIAS, HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32)


@triton.jit
def igemm_nchw_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr,  # the fused epilogue's (epilogue_tl)
    OH, OW, NPIX, IH, IW, CG, OCG, C_CHUNKS,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw, sb,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    srn, src, srh, srw, bn_eps, act_param0, act_param1,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PIXELS_FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """The transposed GEMM for NCHW tensors: M = output channels, N = one image's output pixels.

    Each K step reads BLOCK_K input channel planes along a run of pixels, which
    NCHW stores contiguously, and the output tile is stored along pixels too: no
    layout copy on either side. PIXELS_FLAT (1x1 kernel, stride 1, no padding,
    dense planes) reads input pixel p for output pixel p, so loads vectorise.
    NPIX = OH*OW comes in as an argument rather than computed here: the JIT then
    knows when it is a multiple of 16, and with it that the pixel masks are
    constant over 16-element runs, which vectorised loads and stores need.
    """
    pid = tl.program_id(0)
    group = tl.program_id(1)
    # Output-channel tiles of one pixel tile run next to each other: the input tile is reused from L2.
    num_pid_m = tl.cdiv(OCG, BLOCK_M)
    num_pid_n = tl.cdiv(NPIX, BLOCK_N)
    pid_m = pid % num_pid_m
    pid_n = (pid // num_pid_m) % num_pid_n
    img = pid // (num_pid_m * num_pid_n)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < OCG
    n_ok = offs_n < NPIX
    if USE_INT64:
        img = img.to(tl.int64)
        group = group.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)  # channel * plane size passes int32 in one large image
    oh = offs_n // OW
    ow = offs_n % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    oc = group * OCG + offs_m
    x_img = x_ptr + img * sxn + group * CG * sxc
    w_rows = w_ptr + oc * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, KH * KW * C_CHUNKS):
        tap = k // C_CHUNKS
        c = (k - tap * C_CHUNKS) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        c_ok = c < CG
        if PIXELS_FLAT:
            pix_off = offs_n
            pix_ok = n_ok
        else:
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            pix_off = ih * sxh + iw * sxw
            pix_ok = n_ok & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
        a = tl.load(w_rows[:, None] + c[None, :] * swc + (kh * swh + kw * sww),
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(x_img + c[:, None] * sxc + pix_off[None, :], mask=c_ok[:, None] & pix_ok[None, :], other=0.0)
        acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)

    if HAS_BIAS:
        acc += tl.load(b_ptr + oc * sb, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    out_ok = m_ok[:, None] & n_ok[None, :]
    res_ptrs = r_ptr
    if HAS_RESIDUAL:
        res_ptrs = r_ptr + img * srn + (oc * src)[:, None] + (oh * srh + ow * srw)[None, :]
    acc = fused_epilogue(acc, oc[:, None], m_ok[:, None], out_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr, res_ptrs,
                         bn_eps, act_param0, act_param1, HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32)
    if PIXELS_FLAT:
        pix_out = offs_n
    else:
        pix_out = oh * syh + ow * syw
    y_offsets = img * syn + (oc * syc)[:, None] + pix_out[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def igemm_nchw_streamed_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, r_ptr,  # the fused epilogue's (epilogue_tl)
    N, NPIX, OW, CG, OCG, sxn, sxc, swo, swc, syn, syc, sb,
    srn, src, srh, srw, bn_eps, act_param0, act_param1,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
    HAS_BN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """igemm_nchw_kernel's 1x1 case (_flat_nchw) where the input channels fit one K step: there a tile's
    work is one MMA, and a program of its own spends most of its time waiting on its loads. Here a program
    loads its weight tile once and runs over TILES consecutive pixel tiles (across images), in a loop whose
    input loads the pipeliner issues while earlier tiles multiply and store."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_pid_m = tl.cdiv(OCG, BLOCK_M)
    pid_m = pid % num_pid_m
    first_tile = (pid // num_pid_m) * TILES
    tiles_per_image = tl.cdiv(NPIX, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < OCG
    k_ok = offs_k < CG
    if USE_INT64:
        group = group.to(tl.int64)
        offs_k = offs_k.to(tl.int64)  # channel * plane size passes int32 in one large image
    oc = group * OCG + offs_m
    a = tl.load(w_ptr + (oc * swo)[:, None] + (offs_k * swc)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + oc * sb, mask=m_ok, other=0.0).to(tl.float32)
    x_group = x_ptr + group * CG * sxc
    for t in range(TILES):
        tile = first_tile + t
        img = tile // tiles_per_image
        offs_n = (tile % tiles_per_image) * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_INT64:
            img = img.to(tl.int64)
            offs_n = offs_n.to(tl.int64)  # a residual in other strides: row * its row stride passes int32
        n_ok = (offs_n < NPIX) & (img < N)
        b = tl.load(x_group + img * sxn + (offs_k * sxc)[:, None] + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, UPCAST_DOT)
        if HAS_BIAS:
            acc += bias[:, None]
        out_ok = m_ok[:, None] & n_ok[None, :]
        res_ptrs = r_ptr
        if HAS_RESIDUAL:  # in any strides: its pixels need their row and column
            res_ptrs = r_ptr + img * srn + (oc * src)[:, None] + ((offs_n // OW) * srh + (offs_n % OW) * srw)[None, :]
        acc = fused_epilogue(acc, oc[:, None], m_ok[:, None], out_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
                             res_ptrs, bn_eps, act_param0, act_param1, HAS_BN, HAS_RESIDUAL, ACTIVATION,
                             ROUND_TF32)
        tl.store(y_ptr + img * syn + (oc * syc)[:, None] + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_ok)


# Tile shapes worth timing, from sweeps on an H100 (devices differ: the tuner times them).
# Pointer path: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
POINTER_SHAPES_FP32 = [(256, 64, 32, 8, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4),
                       (64, 128, 32, 4, 3)]
POINTER_SHAPES_16BIT = [(256, 64, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4),
                        (64, 128, 32, 4, 3)]
# Pointer kernel with TMA weights (Hopper, where box tiles run past small maps: _gather_pays):
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K is a 128-byte row, as on the TMA path. The five best of
# eight on ResNet's 3x3 layers at 7x7, 14x14 and 28x28 (probe 22); 64x128 beat the best box tile at 28x28 by 9%.
GATHER_SHAPES = [(64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
# NCHW path: (BLOCK_M output channels, BLOCK_N pixels, BLOCK_K, num_warps, num_stages).
NCHW_SHAPES_FP32 = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 256, 32, 8, 3),
                    (64, 64, 32, 4, 4)]
NCHW_SHAPES_16BIT = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3),
                     (64, 64, 64, 4, 4)]
# Direct (seed) kernel: (BLOCK_OC, BLOCK_HW, BLOCK_K, num_warps, num_stages), from the seed's configs.
SEED_SHAPES = [(32, 128, 32, 4, 2), (64, 128, 32, 8, 2), (64, 64, 64, 8, 3)]
# TMA path: (BLOCK_B, BLOCK_H, BLOCK_W, BLOCK_N, num_warps, num_stages); BLOCK_K is a 128-byte box row (the
# swizzle width: 32 fp32 or 64 16-bit channels) or all the channels where there are fewer. The 8x8 boxes serve
# small maps (56 = 7*8; 7x7 in one box), where 16-wide boxes waste a quarter of the tile. A fourth stage helped
# the 8x16 and 8x8 tiles with 128 channels (kb55, ResNet's 3x3 at 14 and 7x7) and 16x16 in bf16 by 2-9%
# (bench/results/probes/*-probe9-*, *-probe10-*); elsewhere it measured the same or slower. One warpgroup per
# 128x128 tile (4 warps, so several programs share an SM) beat two on #63 by 15% and #55 by 6% (probe 18).
TMA_SHAPES = [(1, 16, 16, 64, 8, 3), (1, 8, 32, 64, 8, 3), (1, 8, 16, 128, 8, 3), (1, 1, 128, 128, 8, 3),
              (1, 16, 8, 64, 4, 3), (1, 8, 16, 64, 4, 3), (1, 16, 16, 128, 8, 3), (1, 2, 128, 128, 8, 3),
              (2, 8, 8, 64, 4, 3), (1, 8, 8, 128, 4, 3),
              (1, 16, 16, 64, 8, 4), (1, 8, 16, 128, 8, 4), (1, 8, 8, 128, 4, 4),
              (1, 1, 128, 128, 4, 3), (1, 8, 16, 128, 4, 3)]
# TMA path, maps narrower than a tile: one output row of BLOCK_B images per tile (_row_stacks), as (pixels,
# BLOCK_N, num_warps, num_stages). The five best of eight on ResNet's 3x3 layers at 7x7, 14x14 and 28x28
# (probe 35): against the best 2-D box, 0.0253 against 0.0257 ms at 7x7 and 0.0196 against 0.0202 at 14x14.
ROW_STACK_SHAPES = [(64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 4), (128, 128, 8, 4), (256, 128, 8, 3)]
# TMA path, 1x1 convolutions seen as one row of pixels (_flat_pixels): (BLOCK_W, BLOCK_N, num_warps, num_stages).
FLAT_TMA_SHAPES = [(128, 128, 8, 3), (128, 64, 4, 3), (256, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4),
                   (256, 64, 8, 3), (128, 256, 8, 3)]


def _pow2_at_least(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def pointer_candidates(cg: int, ocg: int, dtype: torch.dtype) -> list:
    if interpreter_enabled():
        return [Candidate.make("igemm_pointer", BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)]
    return _pointer_kernel_tiles(POINTER_SHAPES_FP32 if dtype == torch.float32 else POINTER_SHAPES_16BIT, cg, ocg)


def gather_candidates(cg: int, ocg: int, dtype: torch.dtype) -> list:
    """The pointer kernel with TMA weights (Hopper; where _gather_pays)."""
    if interpreter_enabled():
        return [Candidate.make("igemm_pointer", BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, TMA_WEIGHTS=True)]
    k = box_row_channels(cg, dtype)
    return _pointer_kernel_tiles([(m, n, k, w, s) for m, n, w, s in GATHER_SHAPES], cg, ocg, TMA_WEIGHTS=True)


def _pointer_kernel_tiles(shapes, cg: int, ocg: int, **variant) -> list:
    """Candidates of the pointer kernel with these (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), no wider than
    the problem needs."""
    max_n, max_k = _pow2_at_least(ocg), _pow2_at_least(cg)
    picked = {Candidate.make("igemm_pointer", num_warps=w, num_stages=s, BLOCK_M=m, BLOCK_N=min(n, max_n),
                             BLOCK_K=min(k, max_k), GROUP_M=8, **variant) for m, n, k, w, s in shapes}
    return sorted(picked, key=lambda c: c.describe())


def _gather_pays(x, y, flat: bool, tma_why) -> bool:
    """Whether to time the pointer kernel with TMA weights: on Hopper, where input boxes cannot serve
    the problem, or where a box tile (8 rows or columns at least) would run past the edge of the
    output map (7x7, 14x14, 28x28), which runs of pixels across the batch do not."""
    return has_tma(x.device) and not flat and bool(tma_why or y.shape[2] % 8 or y.shape[3] % 8)


def _pixel_tiles(cand: Candidate, batch: int, out_h: int, out_w: int) -> tuple:
    """(output pixels per tile, pixel tiles) of a GEMM candidate on these maps: a TMA tile is a box of
    BLOCK_B x BLOCK_H x BLOCK_W pixels, a pointer tile BLOCK_M consecutive pixels of the whole batch."""
    p = cand.params
    if cand.kernel == "igemm_tma":
        return (p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"],
                triton.cdiv(batch, p["BLOCK_B"]) * triton.cdiv(out_h, p["BLOCK_H"]) * triton.cdiv(out_w, p["BLOCK_W"]))
    return p["BLOCK_M"], triton.cdiv(batch * out_h * out_w, p["BLOCK_M"])


def split_k_candidates(candidates: list, batch: int, out_h: int, out_w: int, ocg: int, groups: int, cg: int,
                       taps: int, device) -> list:
    """Split-K variants (K cut in 2 or 3) of candidates whose tiles leave SMs idle: small maps, deep K."""
    if interpreter_enabled() or device.type != "cuda":
        return []
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    picked = []
    for cand in candidates:
        p = cand.params
        block_m, pixel_tiles = _pixel_tiles(cand, batch, out_h, out_w)
        tiles = pixel_tiles * triton.cdiv(ocg, p["BLOCK_N"]) * groups
        k_steps = taps * triton.cdiv(cg, p["BLOCK_K"])
        for split in (2, 3):
            if (tiles < sms and tiles * split <= 2 * sms and k_steps >= 4 * split
                    and tiles * split * block_m * p["BLOCK_N"] < 2**31):
                picked.append(Candidate.make(cand.kernel, cand.num_warps, cand.num_stages, SPLIT_K=split, **p))
    return picked


def nchw_candidates(cg: int, ocg: int, dtype: torch.dtype, flat: bool = False) -> list:
    """`flat` (_flat_nchw): also tiles streamed through one program (TILES; igemm_nchw_streamed_kernel) where
    the channels fit one K step."""
    if interpreter_enabled():
        return [Candidate.make("igemm_nchw", BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)]
    shapes = NCHW_SHAPES_FP32 if dtype == torch.float32 else NCHW_SHAPES_16BIT
    max_m, max_k = _pow2_at_least(ocg), _pow2_at_least(cg)
    picked = {Candidate.make("igemm_nchw", num_warps=w, num_stages=s, BLOCK_M=min(m, max_m), BLOCK_N=n,
                             BLOCK_K=min(k, max_k)) for m, n, k, w, s in shapes}
    if dtype != torch.float32 and ocg >= 128 and cg >= 64:
        # Capped at 80 registers a thread, more 128x64 programs fit on an SM: ResNet's 1x1 64->256 on NCHW,
        # memory-bound, 0.0243 -> 0.0233 ms (probe 28). Where the tile is clipped, the cap may not fit.
        picked.add(Candidate.make("igemm_nchw", num_warps=4, num_stages=3, maxnreg=80, BLOCK_M=128, BLOCK_N=64,
                                  BLOCK_K=64))
    if flat:  # 2, 4 and 8 tiles a program each won on ResNet's 1x1 64->256 (probe 37: 0.0209 against 0.0233 ms)
        picked |= {Candidate.make("igemm_nchw", c.num_warps, c.num_stages, TILES=tiles, **c.params)
                   for c in list(picked) if c.params["BLOCK_K"] >= cg and c.params["BLOCK_N"] <= 128
                   and "maxnreg" not in c.params for tiles in (2, 4, 8)}
    return sorted(picked, key=lambda c: c.describe())


def tma_candidates(cg: int, ocg: int, out_h: int, out_w: int, batch: int, groups: int, dtype: torch.dtype,
                   strided: bool = False, flat: bool = False) -> list:
    """`flat`: the problem is one row of out_w pixels (_flat_pixels), tiled by 1-D boxes."""
    # A box must not reach past its own channels: into the next group's, or (strided, where the W phase
    # shares the channel axis) into the next pixel's. Past the last channel it reads zeros.
    exact_k = groups > 1 or strided
    if interpreter_enabled():
        return [Candidate.make("igemm_tma", BLOCK_B=1, BLOCK_H=1 if flat else 4, BLOCK_W=32 if flat else 8,
                               BLOCK_N=16, BLOCK_K=_box_k(cg, min(16, _pow2_at_least(cg)), exact_k))]
    k = _box_k(cg, box_row_channels(cg, dtype), exact_k)
    max_n = _pow2_at_least(ocg)
    if flat:
        return sorted({Candidate.make("igemm_tma", num_warps=w, num_stages=s, BLOCK_B=1, BLOCK_H=1,
                                      BLOCK_W=min(bw, _pow2_at_least(out_w)), BLOCK_N=min(n, max_n), BLOCK_K=k)
                       for bw, n, w, s in FLAT_TMA_SHAPES}, key=lambda c: c.describe())
    picked = set()
    for bb, bh, bw, n, w, s in TMA_SHAPES:
        bb, bh, bw = fit_box(bb, bh, bw, batch, out_h, out_w)
        picked.add(Candidate.make("igemm_tma", num_warps=w, num_stages=s, BLOCK_B=bb, BLOCK_H=bh, BLOCK_W=bw,
                                  BLOCK_N=min(n, max_n), BLOCK_K=k))
    if out_h % 8 or out_w % 8:  # where 2-D boxes of 8 rows or columns and up would run past the map's edge
        picked |= _row_stacks(ocg, out_w, batch, k)
    return sorted(picked, key=lambda c: c.describe())


def _row_stacks(ocg: int, out_w: int, batch: int, block_k: int) -> set:
    """TMA tiles of one output row of several images (BLOCK_H = 1, BLOCK_B > 1), for maps narrower than a
    tile. The copy engine zero-fills only what a box reads past the input's edges, so a 2-D box's sides
    are powers of two and a 7x7 map fills 49 of an 8x8 box's 64 pixels, 14x14 196 of 256. With one row per
    map, the rows fit exactly and only the columns are rounded up: 7 of 8, 14 of 16, 28 of 32."""
    bw = _pow2_at_least(out_w, 8)
    return {Candidate.make("igemm_tma", num_warps=w, num_stages=s, BLOCK_B=pixels // bw, BLOCK_H=1, BLOCK_W=bw,
                           BLOCK_N=min(n, _pow2_at_least(ocg)), BLOCK_K=block_k)
            for pixels, n, w, s in ROW_STACK_SHAPES if 2 <= pixels // bw <= _pow2_at_least(batch, 1)}


def _box_k(cg: int, k: int, exact: bool) -> int:
    """Channels per box row: `k`, halved until it divides `cg` where `exact` (tma_reason keeps rows of >= 16
    bytes dividing cg, so this ends there at the latest)."""
    while exact and cg % k:
        k //= 2
    return k


def _flat_pixels(weight, y, stride, padding, residual=None) -> bool:
    """A 1x1, stride-1, unpadded convolution into a dense channels_last output: in NHWC, input and output
    are [N*H*W, C] matrices, so the TMA kernel takes them as one image of one row of N*H*W pixels. Its
    tiles are then 1-D boxes, which feed the tensor cores straight from shared memory, and no tile runs
    past the edge of a map. A fused residual is addressed by the same flat pixel index, so it must have
    the output's strides (otherwise the problem keeps its maps)."""
    return (tuple(weight.shape[2:]), tuple(stride), tuple(padding)) == ((1, 1), (1, 1), (0, 0)) and \
        y.is_contiguous(memory_format=torch.channels_last) and (residual is None or residual.stride() == y.stride())


def _flat_nchw(x, weight, y, stride, padding) -> bool:
    """A 1x1, stride-1, unpadded convolution over dense NCHW planes: output pixel p reads input pixel p."""
    return (tuple(weight.shape[2:]), tuple(stride), tuple(padding)) == ((1, 1), (1, 1), (0, 0)) and \
        x.stride()[2:] == (x.shape[3], 1) and y.stride()[2:] == (y.shape[3], 1)


def _tma_maps(x, y, flat: bool) -> tuple:
    """(images, input height, input width, output height, output width) as the TMA kernels see them: a flat
    problem (_flat_pixels) is one image of one row of all the pixels."""
    n, in_h, in_w, out_h, out_w = x.shape[0], x.shape[2], x.shape[3], y.shape[2], y.shape[3]
    if flat:
        return 1, 1, n * in_h * in_w, 1, n * out_h * out_w
    return n, in_h, in_w, out_h, out_w


def _nhwc_strides(shape) -> tuple:
    """(N, C, H, W) strides of a dense channels_last tensor of `shape`. They equal those of
    t.contiguous(memory_format=torch.channels_last) wherever an index can be nonzero (a
    size-1 dim may carry any stride), without copying t to find out."""
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def _launcher(cand: Candidate, x, weight, bias, y, stride, padding, dilation, groups, input_precision,
              epilogue: Epilogue = IDENTITY, epi: EpilogueTensors = NO_TENSORS):
    """A closure launch(x, weight, bias, y, epi) that runs `cand` on tensors shaped like these, with `epilogue`
    fused (`epi`: example tensors, for the residual's strides); every scalar argument is fixed once here."""
    n, c, in_h, in_w = x.shape
    oc, cg, kernel_h, kernel_w = weight.shape
    out_h, out_w = y.shape[2], y.shape[3]
    ocg = oc // groups
    p = cand.params
    if cand.kernel == "seed_direct":
        return _seed_launcher(cand, x, weight, bias, y, stride, padding, dilation, input_precision, epilogue, epi)
    bias_stride = bias.stride(0) if bias is not None else 0
    fused = EpilogueArgs(epilogue, epi, y)
    residual = epi.residual if epilogue.residual else None
    flags = dict(KH=kernel_h, KW=kernel_w, HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision,
                 USE_INT64=needs_int64(x, weight, y, *residual_of(epilogue, epi)), UPCAST_DOT=needs_dot_upcast(x.dtype),
                 num_warps=cand.num_warps, num_stages=cand.num_stages, **p)
    gluon_flags = {**flags, "bias_stride": bias_stride, "epilogue": epilogue,
                   "residual_strides": fused.residual_strides}
    flags.update(fused.constexprs)

    def channels_last(t):  # no-op for channels_last tensors: the GEMM's K loads are contiguous
        return t.contiguous(memory_format=torch.channels_last)

    bk = p["BLOCK_K"]
    cpad = triton.cdiv(cg, bk) * bk  # channels per tap in the packed weight (TMA)
    if cand.kernel == "igemm_pointer":
        block_m, pixel_tiles = _pixel_tiles(cand, n, out_h, out_w)
        grid = (pixel_tiles * triton.cdiv(ocg, p["BLOCK_N"]), groups)
        scalars = (n * out_h * out_w, out_h, out_w, in_h, in_w, cg, ocg, triton.cdiv(cg, bk), cpad,
                   *_nhwc_strides(x.shape), *_nhwc_strides(weight.shape), *y.stride(), bias_stride,
                   *stride, *padding, *dilation, *fused.scalars)

        split, tma_weights = p.get("SPLIT_K", 1), p.get("TMA_WEIGHTS", False)
        kernel = KernelLauncher(igemm_pointer_kernel, grid + (split,), scalars,
                                **{**flags, "SPLIT_K": split, "TMA_WEIGHTS": tma_weights})
        scratch = _split_k_scratch(grid[0] * groups, split, block_m * p["BLOCK_N"])
        weight_operand = _weight_descriptors(weight.shape, bk, p["BLOCK_N"]) if tma_weights else channels_last

        def launch(x, weight, bias, y, epi=NO_TENSORS):
            kernel(channels_last(x), weight_operand(weight), y if bias is None else bias, y, *scratch(y),
                   *fused.pointers(epi, y))
        return launch

    if cand.kernel == "igemm_halo":
        return halo.halo_launcher(cand, x, weight, y, padding, dilation, gluon_flags)

    if cand.kernel in ("igemm_ws", "igemm_ws_halo"):
        maps = _tma_maps(x, y, _flat_pixels(weight, y, stride, padding, residual))
        return warp_specialized.ws_launcher(cand, maps, weight, y, stride, padding, dilation, gluon_flags)

    if cand.kernel == "igemm_nchw":
        flat = _flat_nchw(x, weight, y, stride, padding)
        if p.get("TILES", 1) > 1:  # igemm_nchw_streamed_kernel
            if not (flat and cg <= bk):
                raise ValueError(f"{cand.describe()}: streamed tiles take 1x1 convolutions of dense planes whose "
                                 "channels fit one K step")
            grid = (triton.cdiv(n * triton.cdiv(out_h * out_w, p["BLOCK_N"]), p["TILES"]) *
                    triton.cdiv(ocg, p["BLOCK_M"]), groups)
            scalars = (n, out_h * out_w, out_w, cg, ocg, x.stride(0), x.stride(1), weight.stride(0),
                       weight.stride(1), y.stride(0), y.stride(1), bias_stride, *fused.scalars)
            kernel = KernelLauncher(igemm_nchw_streamed_kernel, grid, scalars,
                                    **{k: v for k, v in flags.items() if k not in ("KH", "KW")})
        else:
            grid = (n * triton.cdiv(out_h * out_w, p["BLOCK_N"]) * triton.cdiv(ocg, p["BLOCK_M"]), groups)
            scalars = (out_h, out_w, out_h * out_w, in_h, in_w, cg, ocg, triton.cdiv(cg, bk), *x.stride(),
                       *weight.stride(), *y.stride(), bias_stride, *stride, *padding, *dilation, *fused.scalars)
            kernel = KernelLauncher(igemm_nchw_kernel, grid, scalars, PIXELS_FLAT=flat, **flags)

        def launch(x, weight, bias, y, epi=NO_TENSORS):
            kernel(x, weight, y if bias is None else bias, y, *fused.pointers(epi, y))
        return launch

    n, in_h, in_w, out_h, out_w = _tma_maps(x, y, _flat_pixels(weight, y, stride, padding, residual))
    block_m, pixel_tiles = _pixel_tiles(cand, n, out_h, out_w)
    grid = (pixel_tiles * triton.cdiv(ocg, p["BLOCK_N"]), groups)
    scalars = (n, out_h, out_w, c, cg, ocg, triton.cdiv(cg, bk), cpad, *y.stride(), bias_stride, *stride, *padding,
               *dilation, *fused.scalars)
    # [N, H/sh, sh, W/sw, sw*C] (see the kernel); tma_reason checks that the strides divide H and W.
    x_box = [p["BLOCK_B"], p["BLOCK_H"], 1, p["BLOCK_W"], bk]
    x_shape, x_strides = strided_input_view(n, in_h, in_w, c, stride)

    split = p.get("SPLIT_K", 1)
    kernel = KernelLauncher(igemm_tma_kernel, grid + (split,), scalars, **{**flags, "SPLIT_K": split})
    scratch = _split_k_scratch(grid[0] * groups, split, block_m * p["BLOCK_N"])
    weight_descriptor = _weight_descriptors(weight.shape, bk, p["BLOCK_N"])

    def launch(x, weight, bias, y, epi=NO_TENSORS):
        x_desc = TensorDescriptor(channels_last(x), x_shape, x_strides, x_box)
        kernel(x_desc, weight_descriptor(weight), y if bias is None else bias, y, *scratch(y),
               *fused.pointers(epi, y))
    return launch


def _weight_descriptors(weight_shape, block_k: int, block_n: int) -> WeightDescriptors:
    """TMA descriptors of weights of this shape packed as [OC, KH*KW*CPAD], in [BLOCK_N, BLOCK_K] tiles."""
    oc, cg, kernel_h, kernel_w = weight_shape
    k = kernel_h * kernel_w * triton.cdiv(cg, block_k) * block_k
    return WeightDescriptors(block_k, lambda packed: TensorDescriptor(packed, [oc, k], [k, 1], [block_n, block_k]))


def _split_k_scratch(tiles: int, split: int, tile_elems: int):
    """`scratch(y) -> (partial tiles, arrival counters)` for a split-K launch writing `y`.

    Both are new per launch, in one allocation, the counters zeroed: the kernel leaves them
    at zero, but counters kept across launches would be memory that outlives the call, which
    CUDA-graph trees refuse when the launch runs in their memory pool ("tensors in the
    cudagraph pool not tracked as outputs"), and per-launch counters need no care for
    streams. Without split-K the kernel never touches either, and `y` stands in for both.
    """
    if split == 1:
        return lambda y: (y, y)
    partial_elems = tiles * split * tile_elems

    def scratch(y):
        buffer = torch.empty(partial_elems + tiles, dtype=torch.float32, device=y.device)
        arrivals = buffer[partial_elems:].view(torch.int32).zero_()
        return buffer, arrivals
    return scratch


def _seed_launcher(cand: Candidate, x, weight, bias, y, stride, padding, dilation, input_precision,
                   epilogue: Epilogue = IDENTITY, epi: EpilogueTensors = NO_TENSORS):
    """The seed's direct kernel, K = C*KH*KW flattened: for a few input channels (a network's
    stem) it wastes no K lanes, where the implicit GEMM pads each tap's channels to BLOCK_K."""
    fused = EpilogueArgs(epilogue, epi, y)
    scalars, flags, grid_of = seed_launch_args(x, weight, bias, y, stride, padding, dilation, input_precision,
                                               fused, residual_of(epilogue, epi))
    grid = grid_of(cand.params)

    kernel = KernelLauncher(seed_conv2d_kernel, grid, scalars, **flags, num_warps=cand.num_warps,
                            num_stages=cand.num_stages, **cand.params)

    def launch(x, weight, bias, y, epi=NO_TENSORS):
        kernel(x, weight, y if bias is None else bias, y, *fused.pointers(epi, y))
    return launch


def seed_candidates(cg: int, groups: int, batch: int) -> list:
    """Direct-kernel candidates, only where they can win: groups == 1 and few input channels."""
    if groups != 1 or cg > 8 or batch > 65535 or interpreter_enabled():
        return []
    return [Candidate.make("seed_direct", num_warps=w, num_stages=s, BLOCK_OC=oc, BLOCK_HW=hw, BLOCK_K=k)
            for oc, hw, k, w, s in SEED_SHAPES]


def implicit_gemm_plan(x, weight, bias, stride, padding, dilation, groups, input_precision, load_path="auto",
                       output_format="eager", epilogue: Epilogue = IDENTITY, epi: EpilogueTensors = NO_TENSORS):
    """Tune (or recall) the best kernel for this problem; return `run(x, weight, bias, epi=NO_TENSORS) -> y`.

    `load_path` is "auto", "tma", "pointer" or "nchw" (the NCHW kernel alone; "auto"
    offers it for 1x1 convolutions of NCHW inputs). `epilogue` is fused into the
    kernel; `epi` holds example tensors of it (the residual's strides are the plan's).
    The plan serves any tensors with the same shapes, strides, dtype and device as
    the ones given here.
    """
    tma_why = tma_reason(x, weight, stride, groups)
    if not tma_why and x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16:
        # A channels_last view at an odd offset is read in place; the copy engine can't start there.
        # Only known at run time (dispatch keys its plans on it), so even a forced TMA path
        # takes pointer loads here rather than failing mid-model.
        tma_why = "input base address not 16-byte aligned"
        if load_path == "tma":
            log.info("tritonconv: %s; using pointer loads", tma_why)
            load_path = "pointer"
    if load_path == "tma" and tma_why:
        raise ValueError(f"tritonconv: the TMA path cannot take this convolution: {tma_why}")
    y = empty_output(x, weight, stride, padding, dilation, output_format)
    oc, cg = weight.shape[0], weight.shape[1]
    candidates = []
    batch_hw = (x.shape[0], y.shape[2], y.shape[3])
    split_k_args = (oc // groups, groups, cg, weight.shape[2] * weight.shape[3], x.device)
    flat = _flat_pixels(weight, y, stride, padding, *residual_of(epilogue, epi))
    if load_path in ("auto", "tma") and not tma_why:
        tma_n, _, _, tma_h, tma_w = _tma_maps(x, y, flat)
        tma = tma_candidates(cg, oc // groups, tma_h, tma_w, tma_n, groups, x.dtype,
                             strided=tuple(stride) != (1, 1), flat=flat)
        candidates += tma + split_k_candidates(tma, tma_n, tma_h, tma_w, *split_k_args)
        offer_gluon = gluon_takes_epilogue(epilogue)
        if offer_gluon and not halo.halo_reason(x, weight, stride, dilation, groups, input_precision):
            candidates += halo.halo_candidates(cg, oc, y.shape[2], y.shape[3], weight.shape[2], dilation[0], x.dtype)
        if offer_gluon and not warp_specialized.ws_reason(x, weight, stride, dilation, groups, input_precision):
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            strided = tuple(stride) != (1, 1)
            candidates += warp_specialized.ws_candidates(cg, oc, tma_n, tma_h, tma_w, x.dtype, sms, strided=strided)
            if not strided:  # a patch's row taps are consecutive input rows
                candidates += warp_specialized.ws_halo_candidates(cg, oc, tma_n, tma_h, tma_w, weight.shape[2],
                                                                  dilation[0], x.dtype, sms)
    if load_path in ("auto", "pointer"):
        pointer = pointer_candidates(cg, oc // groups, x.dtype)
        candidates += pointer + split_k_candidates(pointer, *batch_hw, *split_k_args)
    if load_path == "auto" and _gather_pays(x, y, flat, tma_why):
        gather = gather_candidates(cg, oc // groups, x.dtype)
        candidates += gather + split_k_candidates(gather, *batch_hw, *split_k_args)
    flat_nchw = _flat_nchw(x, weight, y, stride, padding)
    if load_path == "nchw" or (load_path == "auto" and flat_nchw):
        # A 1x1 convolution of NCHW planes is a batched GEMM over them: reading them in place saves the copy
        # to channels_last the other paths make. With a gather per tap (3x3 and up) it lost 4-15x to that copy.
        candidates += nchw_candidates(cg, oc // groups, x.dtype, flat=flat_nchw)
    if load_path == "auto":
        candidates += seed_candidates(cg, groups, x.shape[0])

    def make(cand):
        return _launcher(cand, x, weight, bias, y, stride, padding, dilation, groups, input_precision, epilogue, epi)

    return tuned_plan(f"igemm-{load_path}", x, weight, bias, y, stride, padding, dilation, groups, candidates, make,
                      extra_key=f"{input_precision}|tma:{not tma_why}", epilogue=epilogue, epi=epi)


def implicit_gemm_conv2d(x, weight, bias, stride, padding, dilation, groups, input_precision, load_path="auto",
                         epilogue: Epilogue = IDENTITY, epi: EpilogueTensors = NO_TENSORS):
    """One-off call: plan and run."""
    return implicit_gemm_plan(x, weight, bias, stride, padding, dilation, groups, input_precision, load_path,
                              epilogue=epilogue, epi=epi)(x, weight, bias, epi)
