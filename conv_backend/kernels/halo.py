"""Halo-reuse implicit GEMM for Hopper (sm_90), written in Gluon.

The TMA kernel in implicit_gemm.py loads one input box per (kh, kw) tap, so an
input pixel crosses from L2 into the SM once per tap that reads it: 45 times
for a 5x9 kernel. On the large fp32 problems that L2->SM traffic, not the
tensor cores, sets the time (bench/NOTES.md). Triton's block language cannot
take a sub-view of shared memory, so it cannot do better; Gluon can.

Here a program loads, per kernel column kw and channel chunk, one patch of
BLOCK_H + (KH-1)*dil_h input rows by BLOCK_W columns, and feeds each of the KH
row taps to the tensor cores as a row-offset view of that patch: KH taps for
one load. The views start at multiples of BLOCK_W pixel rows (a multiple of
8), where the 128-byte swizzle pattern repeats, so wgmma reads them straight
from shared memory. Weights come per step as KH [BLOCK_N, BLOCK_K] tiles.

The ops that follow a convolution (eval batch norm, a residual add, an activation) may be fused into its
store (epilogue_gluon.py): compile-time switches, so the plain convolution compiles as without them.

Scope: stride 1, groups 1, TF32 or 16-bit operands (wgmma has no exact fp32),
CUDA devices of compute capability 9.x. Everything else stays with the other
kernels; `halo_reason` says why.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import torch
import triton

from ..epilogue import IDENTITY, NO_TENSORS
from ..tuning import Candidate
from .common import (GluonTensorDescriptor, KernelLauncher, box_row_channels, gl, gluon, gluon_dtype,
                     gluon_sm90_reason, gluon_tile_origin, gluon_weight_descriptors, mbarrier, tma, warpgroup_mma,
                     warpgroup_mma_wait)
from .epilogue_gluon import (by_alignment, epilogue_constexprs, epilogue_pointers, epilogue_scalars, fused_epilogue,
                             gluon_takes_epilogue, residual_needs_int64, same_strides)

log = logging.getLogger("conv_backend")

# Shared memory the pipeline buffers may take (H100/H200 allow 227 KiB per block; the rest is headroom).
SMEM_BUDGET = 224 * 1024
# (BLOCK_H, BLOCK_W, BLOCK_N, num_warps, num_stages): output tiles of 128 or 256 pixels, from probes on an
# H200 (bench/results/probes/*-probe12-*, *-probe13-*). Stages are cut to what fits SMEM_BUDGET for the
# problem's kernel height and channel chunk (at least two); a third stage helped 128-channel tiles where the
# channel chunk is small (#63: 16 channels).
HALO_SHAPES = [(16, 16, 64, 8, 2), (8, 16, 64, 4, 3), (8, 32, 64, 8, 2), (16, 8, 64, 4, 3), (8, 16, 128, 8, 3),
               (16, 16, 128, 8, 2), (8, 32, 128, 8, 2), (16, 16, 128, 8, 3), (8, 32, 128, 8, 3)]


def halo_reason(x, weight, stride, dilation, groups, input_precision) -> str | None:
    """None when the halo kernel can take this convolution, else why not."""
    why = gluon_sm90_reason(gluon is not None, x, stride, groups, input_precision)
    if why:
        return why
    if weight.shape[2] < 2:
        return "a kernel one row high reuses nothing across rows"
    if not unaligned_views_supported():
        return f"Triton {triton.__version__} forbids the shared-memory views the kernel reads its taps through"
    return None


def patch_split(block_h: int, kernel_h: int, dil_h: int):
    """(head, tail) rows of the input patch: box sizes must be powers of two, so the patch is copied as one
    box (tail 0) or two; None where two power-of-two boxes can't make it."""
    patch_h = block_h + (kernel_h - 1) * dil_h
    head = 1 << (patch_h.bit_length() - 1)
    tail = patch_h - head
    if patch_h > 256 or (tail & (tail - 1)):
        return None
    return head, tail


def patch_boxes(block_h: int, block_w: int, block_k: int, kernel_h: int, dil_h: int) -> tuple:
    """(head box, tail box, tail rows) the patch of a BLOCK_H x BLOCK_W tile is copied in; where there is no
    tail, the tail box is a 1-row stand-in that is never copied."""
    head, tail = patch_split(block_h, kernel_h, dil_h)
    return [1, head, block_w, block_k], [1, max(tail, 1), block_w, block_k], tail


def smem_bytes(block_h, block_w, block_n, block_k, kernel_h, dil_h, elem, stages) -> int:
    """Shared memory of the pipeline: per stage a patch (its rows rounded up to a power of two, as buffer
    shapes must be) and KH weight tiles."""
    patch_rows = triton.next_power_of_2(block_h + (kernel_h - 1) * dil_h)
    return stages * (patch_rows * block_w + kernel_h * block_n) * block_k * elem


def halo_candidates(channels, out_channels, out_h, out_w, kernel_h, dil_h, dtype) -> list:
    """The tile configs worth timing for this problem: HALO_SHAPES fitted to the map, the channels and
    shared memory."""
    elem = dtype.itemsize
    bk = box_row_channels(channels, dtype)
    max_n = max(16, triton.next_power_of_2(out_channels))
    picked = set()
    for bh, bw, bn, warps, stages in HALO_SHAPES:
        bn = min(bn, max_n)
        if bw > max(8, triton.next_power_of_2(out_w)) or bh > max(1, triton.next_power_of_2(out_h)):
            continue  # the map is smaller than the tile: the TMA kernel's stacked tiles serve it
        if patch_split(bh, kernel_h, dil_h) is None:
            continue
        while stages >= 2 and smem_bytes(bh, bw, bn, bk, kernel_h, dil_h, elem, stages) > SMEM_BUDGET:
            stages -= 1
        if stages >= 2:
            picked.add(Candidate.make("igemm_halo", num_warps=warps, num_stages=stages, BLOCK_H=bh, BLOCK_W=bw,
                                      BLOCK_N=bn, BLOCK_K=bk))
    return sorted(picked, key=lambda c: c.describe())


def compile_for_sm90(dtype: torch.dtype, params: dict, num_warps: int, num_stages: int, kernel_hw=(5, 9),
                     dil_h: int = 2, epilogue=IDENTITY, residual_as_y: bool = False):
    """igemm_halo_kernel compiled for sm_90 with these tile parameters (a Candidate's) and this fused epilogue,
    on any machine; raises where this Triton rejects it."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    type_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    bh, bw, bn, bk = params["BLOCK_H"], params["BLOCK_W"], params["BLOCK_N"], params["BLOCK_K"]
    x_box, tail_box, tail = patch_boxes(bh, bw, bk, kernel_hw[0], dil_h)
    x_layout = gl.NVMMASharedLayout.get_default_for(x_box, gluon_dtype(dtype))
    w_box = [bn, bk]
    names = igemm_halo_kernel.arg_names
    signature = {name: "i32" for name in names}
    for name, box, layout in (("x_desc", x_box, x_layout), ("x_tail_desc", tail_box, x_layout),
                              ("w_desc", w_box, gl.NVMMASharedLayout.get_default_for(w_box, gluon_dtype(dtype)))):
        signature[name] = f"tensordesc<{type_name}[{', '.join(map(str, box))}],{layout!r}>"
    for name in ("b_ptr", "y_ptr", "r_ptr"):
        signature[name] = f"*{type_name}"
    for name in ("mean_ptr", "var_ptr", "bn_w_ptr", "bn_b_ptr"):
        signature[name] = "*fp32"  # running statistics stay fp32 under autocast
    for name in ("bn_eps", "act_param0", "act_param1"):
        signature[name] = "fp32"
    constexprs = dict(KH=kernel_hw[0], KW=kernel_hw[1], DIL_H=dil_h, TAIL_H=tail, HAS_BIAS=True,
                      INPUT_PRECISION="tf32", USE_INT64=False, **epilogue_constexprs(epilogue),
                      RESIDUAL_AS_Y=residual_as_y, BLOCK_H=bh, BLOCK_W=bw,
                      BLOCK_N=bn, BLOCK_K=bk, SWIZZLE=x_layout.swizzle_byte_width, STAGES=num_stages,
                      num_warps=num_warps)
    for name in constexprs:
        signature[name] = "constexpr"
    source = GluonASTSource(igemm_halo_kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
    with _stderr_silenced():  # the verifier prints a rejection to the process's stderr
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null for a moment: MLIR writes diagnostics there, not to sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def unaligned_views_supported() -> bool:
    """Whether this Triton compiles the kernel's tap views: a view of shared memory that starts at a
    multiple of 8 rows but not of its own size, made by reinterpreting an 8-row slice. Triton 3.6
    accepts it; later versions reject reinterpreting a slice. Found out by compiling a small kernel for
    sm_90, which needs no GPU, once per process."""
    if gluon is None:
        return False
    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
        with _stderr_silenced():  # the verifier prints its rejection to the process's stderr
            triton.compile(GluonASTSource(_tap_view_probe, {"out_ptr": "*fp16"}, {}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except Exception as exc:  # the verifier's error, or a Gluon whose internals moved: either way, not offered
        log.info("tritonconv: halo kernel not offered: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return False
    return True


if gluon is not None:
    @gluon.jit
    def _tap_view_probe(out_ptr):
        layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        buf = gl.allocate_shared_memory(gl.float16, [256, 64], layout)
        view = buf.slice(8, 8)._reinterpret(gl.float16, [128, 64], layout)
        blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        gl.store(out_ptr + gl.arange(0, 64, layout=gl.SliceLayout(0, blocked)),
                 gl.sum(view.load(blocked), axis=0))

    @gluon.jit
    def _issue_loads(x_desc, x_tail_desc, w_desc, x_smem, w_smem, ready, step, img, oh0, ow0, n0, pad_h, pad_w, dil_w,
                     C_CHUNKS, CPAD, KH: gl.constexpr, KW: gl.constexpr, BLOCK_K: gl.constexpr,
                     TAIL_H: gl.constexpr, STAGES: gl.constexpr):
        """Start the copies of K step `step` (one kernel column kw and one channel chunk) into its stage."""
        HEAD_H: gl.constexpr = x_desc.block_type.shape[1]
        kw = step // C_CHUNKS
        c0 = (step - kw * C_CHUNKS) * BLOCK_K
        s = step % STAGES
        bar = ready.index(s)
        patch = x_smem.index(s)
        w = ow0 - pad_w + kw * dil_w
        if TAIL_H > 0:
            mbarrier.expect(bar, x_desc.block_type.nbytes + x_tail_desc.block_type.nbytes + KH * w_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, x_desc.block_type.nbytes + KH * w_desc.block_type.nbytes)
        # Rows and columns before or past the image are zero-filled by the copy engine: that is the padding.
        # Box sizes must be powers of two, so a patch of 24 rows arrives as 16 + 8.
        tma.async_copy_global_to_shared(x_desc, [img, oh0 - pad_h, w, c0], bar, patch.slice(0, HEAD_H, dim=1))
        if TAIL_H > 0:
            tma.async_copy_global_to_shared(x_tail_desc, [img, oh0 - pad_h + HEAD_H, w, c0], bar,
                                            patch.slice(HEAD_H, TAIL_H, dim=1))
        for kh in gl.static_range(KH):
            tma.async_copy_global_to_shared(w_desc, [n0, (kh * KW + kw) * CPAD + c0], bar, w_smem.index(s * KH + kh))

    @gluon.jit
    def igemm_halo_kernel(
        # pointers: descriptors, bias, output, then the epilogue's (the output stands in where a step is off)
        x_desc, x_tail_desc, w_desc, b_ptr, y_ptr, mean_ptr, var_ptr, bn_w_ptr, bn_b_ptr, r_ptr,
        # sizes and strides
        OH, OW, OC, C_CHUNKS, CPAD, syn, syc, syh, syw, sb, pad_h, pad_w, dil_w, srn, src, srh, srw,
        # the epilogue's scalars
        bn_eps, act_param0, act_param1,
        # meta-parameters
        KH: gl.constexpr, KW: gl.constexpr, DIL_H: gl.constexpr, TAIL_H: gl.constexpr, HAS_BIAS: gl.constexpr,
        INPUT_PRECISION: gl.constexpr, USE_INT64: gl.constexpr,
        HAS_BN: gl.constexpr, HAS_RESIDUAL: gl.constexpr, ACTIVATION: gl.constexpr, ROUND_TF32: gl.constexpr,
        RESIDUAL_AS_Y: gl.constexpr,
        BLOCK_H: gl.constexpr, BLOCK_W: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        SWIZZLE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = BLOCK_H * BLOCK_W
        PATCH_H: gl.constexpr = x_desc.block_type.shape[1] + TAIL_H
        PATCH_ALLOC: gl.constexpr = PATCH_H if TAIL_H == 0 else 2 * x_desc.block_type.shape[1]
        pid = gl.program_id(0)
        # Output-channel tiles of one pixel tile run next to each other: they share the input patch in L2.
        img, oh0, ow0, n0 = gluon_tile_origin(pid, gl.cdiv(OC, BLOCK_N), OH, OW, 1, BLOCK_H, BLOCK_W, BLOCK_N)

        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, 1, PATCH_ALLOC, BLOCK_W, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * KH, BLOCK_N, BLOCK_K], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)

        a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE,
                                                      element_bitwidth=x_desc.dtype.primitive_bitwidth, rank=2)
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 256 // x_desc.dtype.primitive_bitwidth])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma_layout)

        k_steps = KW * C_CHUNKS
        for step in gl.static_range(STAGES - 1):
            if step < k_steps:
                _issue_loads(x_desc, x_tail_desc, w_desc, x_smem, w_smem, ready, step, img, oh0, ow0, n0, pad_h, pad_w, dil_w,
                             C_CHUNKS, CPAD, KH, KW, BLOCK_K, TAIL_H, STAGES)
        for step in range(k_steps):
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            patch = x_smem.index(s).reshape([PATCH_ALLOC * BLOCK_W, BLOCK_K])
            for kh in gl.static_range(KH):
                # Output row r at tap kh reads patch row r + kh*dil_h: a view BLOCK_W*dil_h*kh pixels down. A
                # subslice must start at a multiple of its own size, so the view grows from an 8-pixel slice
                # there (8 rows: the 128-byte swizzle's period, so the MMA reads it like any tile).
                a = patch.slice(kh * DIL_H * BLOCK_W, 8)._reinterpret(x_desc.dtype, [BLOCK_M, BLOCK_K], a_layout)
                b = w_smem.index(s * KH + kh).permute((1, 0))
                acc = warpgroup_mma(a, b, acc, precision=INPUT_PRECISION.value, is_async=True)
            # Once only this step's MMAs may be in flight, the previous step's stage can be refilled.
            acc = warpgroup_mma_wait(num_outstanding=KH, deps=(acc, ))
            if step + STAGES - 1 < k_steps:
                _issue_loads(x_desc, x_tail_desc, w_desc, x_smem, w_smem, ready, step + STAGES - 1, img, oh0, ow0, n0, pad_h,
                             pad_w, dil_w, C_CHUNKS, CPAD, KH, KW, BLOCK_K, TAIL_H, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        oh = oh0 + offs_m // BLOCK_W
        ow = ow0 + offs_m % BLOCK_W
        n_ok = offs_n < OC
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(b_ptr + offs_n * sb, mask=n_ok, other=0.0).to(gl.float32), 0)
        if USE_INT64:
            img = img.to(gl.int64)
        pix = img * syn + oh * syh + ow * syw
        y_offsets = gl.expand_dims(pix, 1) + gl.expand_dims(offs_n * syc, 0)
        mask = gl.expand_dims((oh < OH) & (ow < OW), 1) & gl.expand_dims(n_ok, 0)
        if HAS_BN or HAS_RESIDUAL or ACTIVATION != "none" or ROUND_TF32:
            if RESIDUAL_AS_Y:  # the output's strides: its offsets, not a second tile of them in registers
                r_offsets = y_offsets
            else:
                r_offsets = gl.expand_dims(img * srn + oh * srh + ow * srw, 1) + gl.expand_dims(offs_n * src, 0)
            acc = fused_epilogue(acc, offs_n, n_ok, r_offsets, mask, mean_ptr, var_ptr, bn_w_ptr, bn_b_ptr, r_ptr,
                                 bn_eps, act_param0, act_param1, 0, HAS_BN, HAS_RESIDUAL, ACTIVATION, ROUND_TF32)
        gl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)


def halo_launcher(cand: Candidate, x, weight, y, padding, dilation, flags):
    """launch(x, weight, bias, y, epi) for `cand` on tensors shaped like these; `flags` are implicit_gemm's
    constexprs (HAS_BIAS, INPUT_PRECISION, USE_INT64) plus the bias stride, and the fused epilogue
    ("epilogue", an Epilogue; none where missing) with the residual's (n, c, h, w) strides
    ("residual_strides"). `epi` is the call's EpilogueTensors (optional where the epilogue reads none)."""
    n, c, in_h, in_w = x.shape
    oc, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = y.shape[2], y.shape[3]
    p = cand.params
    bh, bw, bn, bk = p["BLOCK_H"], p["BLOCK_W"], p["BLOCK_N"], p["BLOCK_K"]
    dil_h, dil_w = dilation
    epilogue = flags.get("epilogue", IDENTITY)
    if not gluon_takes_epilogue(epilogue):
        raise ValueError(f"{cand.describe()}: this Triton's Gluon cannot fuse {epilogue.describe()}")
    residual_strides = tuple(flags.get("residual_strides", (0, 0, 0, 0))) if epilogue.residual else (0, 0, 0, 0)
    cpad = triton.cdiv(c, bk) * bk
    x_shape, x_strides = [n, in_h, in_w, c], [in_h * in_w * c, in_w * c, c, 1]
    x_box, x_tail_box, tail = patch_boxes(bh, bw, bk, kernel_h, dil_h)
    x_layout = gl.NVMMASharedLayout.get_default_for(x_box, gluon_dtype(x.dtype))  # the tail box shares it
    grid = (n * triton.cdiv(out_h, bh) * triton.cdiv(out_w, bw) * triton.cdiv(oc, bn),)
    scalars = (out_h, out_w, oc, triton.cdiv(c, bk), cpad, *y.stride(), flags["bias_stride"], *padding, dil_w,
               *residual_strides, *epilogue_scalars(epilogue))
    use_int64 = flags["USE_INT64"] or residual_needs_int64(y.shape, residual_strides)
    meta = dict(KH=kernel_h, KW=kernel_w, DIL_H=dil_h, TAIL_H=tail, HAS_BIAS=flags["HAS_BIAS"],
                INPUT_PRECISION=flags["INPUT_PRECISION"], USE_INT64=use_int64, **epilogue_constexprs(epilogue),
                RESIDUAL_AS_Y=epilogue.residual and same_strides(y.shape, residual_strides, y.stride()),
                BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, SWIZZLE=x_layout.swizzle_byte_width,
                STAGES=cand.num_stages, num_warps=cand.num_warps)
    kernel_for = by_alignment(lambda: KernelLauncher(igemm_halo_kernel, grid, scalars, **meta))
    weight_descriptor = gluon_weight_descriptors(weight.shape, x.dtype, bn, bk)

    def launch(x, weight, bias, y, epi=NO_TENSORS):
        x = x.contiguous(memory_format=torch.channels_last)
        x_desc = GluonTensorDescriptor(x, x_shape, x_strides, x_box, x_layout)
        x_tail_desc = GluonTensorDescriptor(x, x_shape, x_strides, x_tail_box, x_layout) if tail else x_desc
        pointers = epilogue_pointers(epilogue, epi, y, residual_strides)
        kernel_for(pointers)(x_desc, x_tail_desc, weight_descriptor(weight), y if bias is None else bias, y,
                             *pointers)
    return launch
