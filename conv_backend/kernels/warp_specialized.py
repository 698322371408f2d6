"""Warp-specialized, persistent implicit GEMM for Hopper (sm_90), written in Gluon.

The TMA kernel in implicit_gemm.py is software-pipelined by Triton: the warps that run the tensor
cores also issue the copies, wait on them, and drain the pipeline at the end of every tile, so on
problems whose tiles are short (K = 9 taps x 64 channels on #55) or few (3x3 512 at 7x7) the tensor
cores idle while a tile starts and ends. Here the work is split by warps:

- a loader warp issues every TMA copy, running up to STAGES K steps ahead, across tile boundaries;
- one or two consumer warpgroups run the MMAs and the epilogue. With two, they take a program's
  tiles in turn: one stores its tile while the other multiplies the next (the "ping-pong" schedule),
  and a turn barrier keeps their main loops in the order the loader fills the ring. Or, with
  SPLIT_TILE, they share every tile, each taking half its channels, and hand each stage back to the
  loader on their own: they never wait for each other, so one's epilogue can run under the other's MMAs.

Programs are persistent: one per SM, each looping over tiles pid, pid + programs, ...
A tile is the TMA kernel's: a BLOCK_B x BLOCK_H x BLOCK_W box of output pixels by BLOCK_N channels,
one input box and one weight tile per K step (one tap, one channel chunk); padding is the copy
engine's zero fill. A consumer of 8 warps is two warpgroups sharing one tile, each taking half its
pixel rows; on 256-pixel tiles each weight tile brought in feeds twice the pixels of a 128-pixel one.
With PIXELS_AS_N the MMA runs transposed (channels as M, 64 for each warpgroup; the tile's pixels as N:
m64n256), so that a weight row read from shared memory feeds all 256 pixels.

The patch variant (candidates "igemm_ws_halo", HALO_ROW_STEP > 0) brings the halo kernel's input reuse
into this pipeline: a K step is one kernel column and one channel chunk, for which the loader copies one
patch of BLOCK_H + (KH-1)*dil_h input rows and KH weight tiles, and the consumer runs the KH row taps as
MMAs on views of the patch, HALO_ROW_STEP pixels apart (halo.py says how those views are made). An input
pixel then crosses from L2 once per kernel column instead of once per tap: #80 1.10 ms against 1.31 with
the halo kernel, #56 1.52 against 1.66 (an H100, entries 56-57 of bench/NOTES.md). Like the halo kernel,
it is offered only where this Triton compiles those views.

It wins where tiles are few and K is deep (ResNet's 3x3 layers at 7x7 and 14x14: GPU time 0.0254 and
0.0197 ms with the TMA kernel, 0.0183 here), and with 256-pixel tiles on large fp32 problems with 128
output channels (#56 on an H100: 2.09 -> 1.66 ms; bench/NOTES.md, entries 44, 49 and 50).

A consumer's store may carry a fused epilogue (eval batch norm, a residual add, an activation;
epilogue_gluon.py), applied in fp32 in the layout the tile is stored from: the MMA layout, or, where the
tile leaves through shared memory, after that conversion. A 1x1 problem seen as one row of all its pixels
takes a residual only where that row's pixels are evenly spaced in it (flat_residual_strides).

Scope: groups 1, TF32 or 16-bit operands, compute capability 9.x; any stride that divides the input's
height and width with a tap per K step (the input is then read as the TMA kernel reads it, [N, H/sh, sh,
W/sw, sw*C]), stride 1 with a patch; `ws_reason` says why not otherwise.
"""
import functools
import logging

import torch
import triton

from ..epilogue import IDENTITY, NO_TENSORS
from ..tuning import Candidate
from .common import (GluonTensorDescriptor, KernelLauncher, box_row_channels, fit_box, gl, gluon, gluon_dtype,
                     gluon_sm90_reason, gluon_tile_origin, gluon_weight_descriptors, mbarrier, strided_input_view, tma,
                     warpgroup_mma, warpgroup_mma_wait)
from .epilogue_gluon import (by_alignment, epilogue_constexprs, epilogue_pointers, epilogue_scalars,
                             flat_residual_strides, fused_epilogue, gluon_takes_epilogue, residual_needs_int64,
                             same_strides)
from .halo import patch_boxes, patch_split, smem_bytes, unaligned_views_supported

try:  # the class decorator the kernel's argument bundle (_Args) needs, by its private name
    from triton.language.core import _aggregate as aggregate
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None  # noqa: F811 - this kernel is then not offered, as without Gluon

log = logging.getLogger("conv_backend")

SMEM_BUDGET = 220 * 1024
# Taken from SMEM_BUDGET where the epilogue converts its tile's layout through shared memory (blocked_store).
EPILOGUE_SCRATCH = 16 * 1024
# (BLOCK_B, BLOCK_H, BLOCK_W, BLOCK_N, consumer warps, consumers, PIXELS_AS_N); stages are what fits
# SMEM_BUDGET. Fitted to a map like the TMA kernel's boxes: a 128-pixel row becomes 8x16 on 14x14 maps. The
# first seven were each best or within 5% of the best on one of #55, #56, #63 and ResNet's 3x3 layers at 7x7,
# 14x14 and 56x56 on an H200 (bench/results/probes/*-probe45-*); two consumers won only on #56. The 256-pixel
# tiles, two consumer warpgroups each taking 128 pixels (or, with PIXELS_AS_N, 64 channels of all 256 pixels),
# feed twice the pixels per weight tile: on an H100 #56 1.66 ms against 2.09, #63 4.27 against 6.09, #55 2.03
# against 2.15 (bench/results/probes/*-probe48-*, *-probe49-*).
WS_SHAPES = [(1, 1, 128, 128, 4, 1, False), (1, 1, 128, 128, 8, 1, False), (1, 8, 16, 128, 4, 2, False),
             (2, 8, 8, 128, 4, 1, False), (1, 8, 8, 128, 4, 1, False), (2, 8, 8, 64, 4, 1, False),
             (1, 1, 128, 256, 8, 1, False),
             (1, 2, 128, 128, 8, 1, True), (1, 8, 32, 128, 8, 1, True), (1, 1, 256, 128, 8, 1, True),
             (1, 1, 256, 128, 8, 1, False)]

# (BLOCK_H, BLOCK_W, BLOCK_N, consumer warps, PIXELS_AS_N) of the patch variant ("igemm_ws_halo"): per K step
# one patch of BLOCK_H + (KH-1)*dil_h input rows feeds all KH row taps, so an input pixel crosses from L2 once
# per kernel column, not once per tap. Each was best or within 5% of the best on one of #55, #56, #62, #63,
# #80 and #80 in bf16 on an H100 (bench/results/probes/*-probe51-*, *-probe52-*): #56 1.52 ms against 1.66
# with a tap per K step, #80 1.10 against 1.31 with the halo kernel. Two consumers taking turns lost everywhere.
# A 16x16 tile with pixels as N, best on #63 by 0.4% over 4x64, was dropped: on #55 it ran 5% behind the best
# tile, too little for the tuner's short timings to see, and was picked there (bench/NOTES.md entry 60).
WS_HALO_SHAPES = [(8, 32, 128, 8, True), (4, 64, 128, 8, True), (8, 32, 128, 8, False), (16, 16, 128, 8, False),
                  (16, 16, 64, 8, False), (16, 8, 64, 4, False), (8, 16, 64, 4, False)]


def ws_reason(x, weight, stride, dilation, groups, input_precision) -> str | None:
    """None when the warp-specialized kernel can take this convolution, else why not."""
    why = gluon_sm90_reason(gluon is not None, x, stride, groups, input_precision, any_stride=True)
    if why:
        return why
    if not warp_specialize_compiles():
        return f"Triton {triton.__version__} does not compile the warp-specialized kernel"
    return None


def ws_candidates(channels, out_channels, batch, out_h, out_w, dtype, sms: int, strided: bool = False) -> list:
    """Tile configs worth timing: WS_SHAPES fitted to the map as the TMA kernel's boxes are (fit_box), as many
    stages as fit, and only where there are tiles for at least half the SMs. `strided`: a stride above 1 folds
    the input's column phase into its channel axis (as the TMA kernel reads it), so a box row must not run past
    the channels: its channel count divides them, and is at least 16 as at stride 1 (32 bytes or more, whole
    MMA K steps)."""
    elem = dtype.itemsize
    bk = box_row_channels(channels, dtype)
    while strided and channels % bk:
        bk //= 2
    if bk < 16:
        return []
    max_n = max(16, triton.next_power_of_2(out_channels))
    picked = set()
    for bb, bh, bw, bn, warps, consumers, pixels_as_n in WS_SHAPES:
        bn = min(bn, max_n)
        pixels = bb * bh * bw
        bb, bh, bw = fit_box(bb, bh, bw, batch, out_h, out_w)
        if bb * bh * bw != pixels:  # the maps can't fill this many pixels: a smaller shape serves them
            continue
        if pixels_as_n and bn < 16 * warps:  # each warpgroup's MMA takes 64 channels as its M
            continue
        stages = (SMEM_BUDGET - epilogue_scratch(dtype, pixels_as_n)) // ((pixels + bn) * bk * elem)
        tiles = triton.cdiv(batch, bb) * triton.cdiv(out_h, bh) * triton.cdiv(out_w, bw) * triton.cdiv(out_channels, bn)
        if stages >= 3 and tiles * 2 >= sms:
            picked.add(Candidate.make("igemm_ws", num_warps=warps, num_stages=min(stages, 8), BLOCK_B=bb, BLOCK_H=bh,
                                      BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, CONSUMERS=consumers,
                                      PIXELS_AS_N=pixels_as_n, SPLIT_TILE=split_tile(warps, consumers, pixels_as_n)))
    return sorted(picked, key=lambda c: c.describe())


def ws_halo_candidates(channels, out_channels, batch, out_h, out_w, kernel_h, dil_h, dtype, sms: int) -> list:
    """Configs of the patch variant worth timing: WS_HALO_SHAPES that fit the map, with the channel chunk of a
    full 128-byte row where three stages fit, else of half a row (each stage holds a patch and KH weight
    tiles, as the halo kernel's do), and only where there are tiles for at least half the SMs."""
    if kernel_h < 2 or not unaligned_views_supported():
        return []
    elem = dtype.itemsize
    max_n = max(16, triton.next_power_of_2(out_channels))
    picked = set()
    for bh, bw, bn, warps, pixels_as_n in WS_HALO_SHAPES:
        bn = min(bn, max_n)
        if bw > max(8, triton.next_power_of_2(out_w)) or bh > max(1, triton.next_power_of_2(out_h)):
            continue
        if patch_split(bh, kernel_h, dil_h) is None or (pixels_as_n and bn < 16 * warps):
            continue  # no two power-of-two boxes make the patch; or less than 64 channels a warpgroup
        bk, budget = box_row_channels(channels, dtype), SMEM_BUDGET - epilogue_scratch(dtype, pixels_as_n)
        stages = budget // smem_bytes(bh, bw, bn, bk, kernel_h, dil_h, elem, 1)
        if stages < 3 and bk * elem >= 64:  # half a row still feeds whole MMA K steps (32 bytes)
            bk //= 2
            stages = budget // smem_bytes(bh, bw, bn, bk, kernel_h, dil_h, elem, 1)
        tiles = batch * triton.cdiv(out_h, bh) * triton.cdiv(out_w, bw) * triton.cdiv(out_channels, bn)
        if stages >= 3 and tiles * 2 >= sms:
            picked.add(Candidate.make("igemm_ws_halo", num_warps=warps, num_stages=min(stages, 8), BLOCK_B=1,
                                      BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, CONSUMERS=1,
                                      PIXELS_AS_N=pixels_as_n, SPLIT_TILE=split_tile(warps, 1, pixels_as_n)))
    return sorted(picked, key=lambda c: c.describe())


def split_tile(warps: int, consumers: int, pixels_as_n: bool) -> bool:
    """Whether a tile's 8 consumer warps run as two consumers of 4, each taking half its channels (SPLIT_TILE),
    not as one consumer of two warpgroups that meet at a barrier every K step. With pixels as N that is
    faster on an H100 (GPU time: #63 3.66 ms against 4.08, twice; #55 level, within its noise; bench/NOTES.md
    entry 61); with pixels as M the halves ran slower (#55 2.39 against 2.06), so they stay one consumer there."""
    return warps == 8 and consumers == 1 and pixels_as_n


def blocked_store(dtype: torch.dtype, pixels_as_n: bool, channels_contiguous: bool = True) -> bool:
    """Whether the epilogue stores through shared memory, in 8-byte vectors: for 16-bit outputs in channels_last,
    whose stores from the MMA layout are 4-byte pairs of channels (ResNet's 3x3 64 at 56 in bf16: 0.0201 ms
    against 0.0242, bench/NOTES.md entry 59). Not for fp32, where it lost a little, and not where the
    conversion would take the whole tile's worth of shared memory: with pixels as N, or into NCHW, whose
    contiguous axis is the pixels."""
    return dtype.itemsize == 2 and not pixels_as_n and channels_contiguous


def epilogue_scratch(dtype: torch.dtype, pixels_as_n: bool) -> int:
    """Shared memory the stages leave free for the epilogue's conversion where it may run (the output's layout
    is known only at launch)."""
    return EPILOGUE_SCRATCH if blocked_store(dtype, pixels_as_n) else 0


@functools.cache
def warp_specialize_compiles() -> bool:
    """Whether this Triton compiles the kernel for sm_90 (Gluon's API still moves between releases).
    Needs no GPU; found out once per process."""
    if gluon is None:
        return False
    try:
        compile_for_sm90(torch.bfloat16, dict(BLOCK_B=1, BLOCK_H=8, BLOCK_W=8, BLOCK_N=64, BLOCK_K=64, CONSUMERS=2),
                         num_warps=4, num_stages=3)
    except Exception as exc:  # a Gluon whose API moved: the kernel is not offered
        log.info("tritonconv: warp-specialized kernel not offered: %s",
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    return True


def input_boxes(kernel: str, params: dict, kernel_h: int, dil_h: int) -> tuple:
    """(input box, tail box, tail rows, HALO_ROW_STEP) of a config of `kernel`: a tap-per-step tile reads one
    BLOCK_B x BLOCK_H x BLOCK_W box of the 5-D strided view (no tail); the patch variant's patch arrives as the
    halo kernel's head and tail boxes of the 4-D NHWC input, its row taps HALO_ROW_STEP pixels apart."""
    bh, bw, bk = params["BLOCK_H"], params["BLOCK_W"], params["BLOCK_K"]
    if kernel == "igemm_ws_halo":
        return (*patch_boxes(bh, bw, bk, kernel_h, dil_h), bw * dil_h)
    box = [params["BLOCK_B"], bh, 1, bw, bk]  # of the input as [N, H/sh, sh, W/sw, sw*C] (ws_launcher)
    return box, box, 0, 0


def compile_for_sm90(dtype: torch.dtype, params: dict, num_warps: int, num_stages: int, kernel_hw=(3, 3),
                     kernel: str = "igemm_ws", dil_h: int = 1, epilogue=IDENTITY, channels_last: bool = True,
                     residual_as_y: bool = False):
    """igemm_ws_kernel compiled for sm_90 with these tile parameters (a Candidate's of `kernel`) and this fused
    epilogue, storing into a channels_last output (else NCHW: no blocked store), on any machine."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    names = igemm_ws_kernel.arg_names
    type_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    gl_dtype = gluon_dtype(dtype)
    x_box, tail_box, tail, row_step = input_boxes(kernel, params, kernel_hw[0], dil_h)
    w_box = [params["BLOCK_N"], params["BLOCK_K"]]
    signature = {name: "i32" for name in names}
    x_layout = gl.NVMMASharedLayout.get_default_for(x_box, gl_dtype)
    for name, box, layout in (("x_desc", x_box, x_layout), ("x_tail_desc", tail_box, x_layout),
                              ("w_desc", w_box, gl.NVMMASharedLayout.get_default_for(w_box, gl_dtype))):
        signature[name] = f"tensordesc<{type_name}[{', '.join(map(str, box))}],{layout!r}>"
    signature["b_ptr"] = signature["y_ptr"] = signature["r_ptr"] = f"*{type_name}"
    for name in ("mean_ptr", "var_ptr", "bn_w_ptr", "bn_b_ptr"):
        signature[name] = "*fp32"  # running statistics stay fp32 under autocast
    for name in ("bn_eps", "act_param0", "act_param1"):
        signature[name] = "fp32"
    constexprs = dict(KH=kernel_hw[0], KW=kernel_hw[1], HAS_BIAS=True, USE_INT64=False, STAGES=num_stages,
                      PIXELS_AS_N=False, SPLIT_TILE=False, HALO_ROW_STEP=row_step, TAIL_H=tail,
                      **epilogue_constexprs(epilogue), RESIDUAL_AS_Y=residual_as_y)
    constexprs.update(params)
    num_warps = launch_warps(num_warps, constexprs["SPLIT_TILE"])
    constexprs["num_warps"] = num_warps
    constexprs["BLOCKED_STORE"] = blocked_store(dtype, constexprs["PIXELS_AS_N"], channels_last)
    for name in constexprs:
        signature[name] = "constexpr"
    source = GluonASTSource(igemm_ws_kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "maxnreg": 168})


if gluon is not None:
    TF32 = gl.constexpr("tf32")  # how wgmma multiplies fp32 operands (ws_reason turns exact fp32 away)

    class _Args:
        """Everything every partition reads. warp_specialize hands each partition the same arguments, and
        an aggregate keeps the constexprs constant where a tuple would turn them into tensors."""
        x_desc: tma.tensor_descriptor
        x_tail_desc: tma.tensor_descriptor
        w_desc: tma.tensor_descriptor
        b_ptr: gl.tensor
        y_ptr: gl.tensor
        mean_ptr: gl.tensor
        var_ptr: gl.tensor
        bn_w_ptr: gl.tensor
        bn_b_ptr: gl.tensor
        r_ptr: gl.tensor
        a_smem: gl.shared_memory_descriptor
        w_smem: gl.shared_memory_descriptor
        ready: gl.shared_memory_descriptor
        empty: gl.shared_memory_descriptor
        turn: gl.shared_memory_descriptor
        N: gl.tensor
        OH: gl.tensor
        OW: gl.tensor
        OC: gl.tensor
        C_CHUNKS: gl.tensor
        CPAD: gl.tensor
        syn: gl.tensor
        syc: gl.tensor
        syh: gl.tensor
        syw: gl.tensor
        sb: gl.tensor
        pad_h: gl.tensor
        pad_w: gl.tensor
        dil_h: gl.tensor
        dil_w: gl.tensor
        stride_h: gl.tensor
        stride_w: gl.tensor
        C: gl.tensor
        tiles: gl.tensor
        num_pid_n: gl.tensor
        srn: gl.tensor
        src: gl.tensor
        srh: gl.tensor
        srw: gl.tensor
        bn_eps: gl.tensor
        act_param0: gl.tensor
        act_param1: gl.tensor
        KH: gl.constexpr
        KW: gl.constexpr
        HAS_BIAS: gl.constexpr
        USE_INT64: gl.constexpr
        BLOCK_B: gl.constexpr
        BLOCK_H: gl.constexpr
        BLOCK_W: gl.constexpr
        BLOCK_N: gl.constexpr
        BLOCK_K: gl.constexpr
        STAGES: gl.constexpr
        CONSUMERS: gl.constexpr
        PIXELS_AS_N: gl.constexpr
        SPLIT_TILE: gl.constexpr
        HALO_ROW_STEP: gl.constexpr
        TAIL_H: gl.constexpr
        W_PER_STEP: gl.constexpr
        BLOCKED_STORE: gl.constexpr
        HAS_BN: gl.constexpr
        HAS_RESIDUAL: gl.constexpr
        ACTIVATION: gl.constexpr
        ROUND_TF32: gl.constexpr
        RESIDUAL_AS_Y: gl.constexpr

        def __init__(self, *values):
            for name, value in zip(_Args.__annotations__, values):
                setattr(self, name, value)
        # Runs while the kernel is traced, like Triton's own builtins; marked so, the JIT's cache key
        # skips it (it accepts only JIT functions and builtins).
        __init__.__triton_builtin__ = True

    WsArgs = aggregate(_Args)

    @gluon.jit
    def _ws_loader(p):
        """Fill the ring: K step k of this program's i-th tile goes to position i * k_steps + k."""
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        k_steps = (p.KH // p.W_PER_STEP) * p.KW * p.C_CHUNKS
        pos = 0
        for t in range(pid, p.tiles, programs):
            img0, oh0, ow0, n0 = gluon_tile_origin(t, p.num_pid_n, p.OH, p.OW, p.BLOCK_B, p.BLOCK_H, p.BLOCK_W, p.BLOCK_N)
            for k in range(k_steps):
                s = pos % p.STAGES
                # The stage's previous contents (position pos - STAGES) must have been consumed; a fresh
                # barrier passes the wait on parity 1 at once.
                mbarrier.wait(p.empty.index(s), ((pos // p.STAGES) & 1) ^ 1)
                if p.HALO_ROW_STEP > 0:
                    _load_patch_step(p, s, k, img0, oh0, ow0, n0)
                else:
                    _load_tap_step(p, s, k, img0, oh0, ow0, n0)
                pos += 1

    @gluon.jit
    def _load_tap_step(p, s, k, img0, oh0, ow0, n0):
        """K step k = one tap (kh, kw) and one channel chunk: an input box and a weight tile. The input is
        [N, H/sh, sh, W/sw, sw*C]: input row ih = sh*q + r is (q, r), so one box of consecutive q holds the rows
        that consecutive output rows read at this tap; along W the phase r selects a run of C channels."""
        tap = k // p.C_CHUNKS
        c0 = (k - tap * p.C_CHUNKS) * p.BLOCK_K
        kh = tap // p.KW
        # Input row kh*dil - pad + stride*oh = stride*(oh + q) + r; adding pad*(stride - 1) keeps the operands
        # of // and % non-negative.
        t_h = kh * p.dil_h + (p.stride_h - 1) * p.pad_h
        t_w = (tap - kh * p.KW) * p.dil_w + (p.stride_w - 1) * p.pad_w
        bar = p.ready.index(s)
        mbarrier.expect(bar, p.x_desc.block_type.nbytes + p.w_desc.block_type.nbytes)
        # Rows and columns before or past the image are zero-filled by the copy engine: the padding.
        tma.async_copy_global_to_shared(
            p.x_desc, [img0, oh0 + t_h // p.stride_h - p.pad_h, t_h % p.stride_h, ow0 + t_w // p.stride_w - p.pad_w,
                       (t_w % p.stride_w) * p.C + c0], bar, p.a_smem.index(s))
        tma.async_copy_global_to_shared(p.w_desc, [n0, tap * p.CPAD + c0], bar, p.w_smem.index(s))

    @gluon.jit
    def _load_patch_step(p, s, k, img0, oh0, ow0, n0):
        """K step k = one kernel column kw and one channel chunk: the input patch all KH row taps read (as
        one box, or a power-of-two head box and a tail box) and KH weight tiles."""
        HEAD_H: gl.constexpr = p.x_desc.block_type.shape[1]
        kw = k // p.C_CHUNKS
        c0 = (k - kw * p.C_CHUNKS) * p.BLOCK_K
        bar = p.ready.index(s)
        patch = p.a_smem.index(s)
        w = ow0 + kw * p.dil_w - p.pad_w
        if p.TAIL_H > 0:
            mbarrier.expect(bar, p.x_desc.block_type.nbytes + p.x_tail_desc.block_type.nbytes
                            + p.KH * p.w_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, p.x_desc.block_type.nbytes + p.KH * p.w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(p.x_desc, [img0, oh0 - p.pad_h, w, c0], bar, patch.slice(0, HEAD_H, dim=1))
        if p.TAIL_H > 0:
            tma.async_copy_global_to_shared(p.x_tail_desc, [img0, oh0 - p.pad_h + HEAD_H, w, c0], bar,
                                            patch.slice(HEAD_H, p.TAIL_H, dim=1))
        for kh in gl.static_range(p.KH):
            tma.async_copy_global_to_shared(p.w_desc, [n0, (kh * p.KW + kw) * p.CPAD + c0], bar,
                                            p.w_smem.index(s * p.KH + kh))

    @gluon.jit
    def _a_operand(p, s, j, BLOCK_M: gl.constexpr):
        """The [BLOCK_M, BLOCK_K] input tile of MMA j in stage s. With a patch, row tap j's tile starts
        j * HALO_ROW_STEP pixels down it; a subslice must start at a multiple of its own size, so the tile
        grows from an 8-pixel slice there (8 rows: the swizzle's period, so the MMA reads it like any tile)."""
        if p.HALO_ROW_STEP > 0:
            patch = p.a_smem.index(s)
            rows: gl.constexpr = patch.shape[1] * patch.shape[2]
            flat = patch.reshape([rows, p.BLOCK_K])
            tile_layout: gl.constexpr = gl.NVMMASharedLayout(
                swizzle_byte_width=p.x_desc.layout.swizzle_byte_width,
                element_bitwidth=p.x_desc.dtype.primitive_bitwidth, rank=2)
            a = flat.slice(j * p.HALO_ROW_STEP, 8)._reinterpret(p.x_desc.dtype, [BLOCK_M, p.BLOCK_K], tile_layout)
        else:
            a = p.a_smem.index(s).reshape([BLOCK_M, p.BLOCK_K])
        return a

    @gluon.jit
    def _ws_consume(p, WHO: gl.constexpr):
        """Consumer WHO of CONSUMERS: multiply and store tiles WHO, WHO + CONSUMERS, ... of this program; or,
        where SPLIT_TILE (with PIXELS_AS_N), channels WHO * half .. (WHO + 1) * half of every tile."""
        gl.static_assert(p.PIXELS_AS_N or not p.SPLIT_TILE, "SPLIT_TILE halves the channels: needs PIXELS_AS_N")
        BLOCK_M: gl.constexpr = p.BLOCK_B * p.BLOCK_H * p.BLOCK_W
        N_PART: gl.constexpr = p.BLOCK_N // 2 if p.SPLIT_TILE else p.BLOCK_N  # this consumer's channels
        N0: gl.constexpr = WHO * N_PART if p.SPLIT_TILE else 0
        TAKERS: gl.constexpr = 1 if p.SPLIT_TILE else p.CONSUMERS  # consumers taking the program's tiles in turn
        # The accumulator is [pixels, channels], or [channels, pixels] where PIXELS_AS_N.
        ACC_ROWS: gl.constexpr = N_PART if p.PIXELS_AS_N else BLOCK_M
        ACC_COLS: gl.constexpr = BLOCK_M if p.PIXELS_AS_N else N_PART
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
            instr_shape=[16, ACC_COLS, 256 // p.x_desc.dtype.primitive_bitwidth])
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        k_steps = (p.KH // p.W_PER_STEP) * p.KW * p.C_CHUNKS
        mine = 0
        for t in range(pid + WHO * programs * (TAKERS - 1), p.tiles, TAKERS * programs):
            base = ((t - pid) // programs) * k_steps
            if TAKERS > 1:
                # Main loops take turns in ring order: a consumer waiting on a position two fills ahead of
                # a barrier would mistake that barrier's older phase of the same parity for its own.
                mbarrier.wait(p.turn.index(WHO), (mine & 1) ^ (1 - WHO))
            acc = gl.zeros([ACC_ROWS, ACC_COLS], gl.float32, layout=mma_layout)
            for k in range(k_steps):
                pos = base + k
                s = pos % p.STAGES
                mbarrier.wait(p.ready.index(s), (pos // p.STAGES) & 1)
                for j in gl.static_range(p.W_PER_STEP):
                    a = _a_operand(p, s, j, BLOCK_M)
                    w = p.w_smem.index(s * p.W_PER_STEP + j)
                    if p.SPLIT_TILE:
                        w = w.slice(N0, N_PART)  # this consumer's weight rows
                    if p.PIXELS_AS_N:
                        acc = warpgroup_mma(w, a.permute((1, 0)), acc, precision=TF32.value, is_async=True)
                    else:
                        acc = warpgroup_mma(a, w.permute((1, 0)), acc, precision=TF32.value, is_async=True)
                # With at most this step's MMAs in flight, the previous step's stage goes back to the loader.
                acc = warpgroup_mma_wait(num_outstanding=p.W_PER_STEP, deps=(acc, ))
                mbarrier.arrive(p.empty.index((pos + p.STAGES - 1) % p.STAGES), count=1, pred=k > 0)
            if TAKERS > 1:
                mbarrier.arrive(p.turn.index(1 - WHO), count=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(p.empty.index((base + k_steps - 1) % p.STAGES), count=1)

            img0, oh0, ow0, n0 = gluon_tile_origin(t, p.num_pid_n, p.OH, p.OW, p.BLOCK_B, p.BLOCK_H, p.BLOCK_W, p.BLOCK_N)
            PIX_AXIS: gl.constexpr = 1 if p.PIXELS_AS_N else 0  # the accumulator's pixel axis
            n0 += N0
            if p.HAS_BIAS:
                offs_b = n0 + gl.arange(0, N_PART, layout=gl.SliceLayout(PIX_AXIS, mma_layout))
                bias = gl.load(p.b_ptr + offs_b * p.sb, mask=offs_b < p.OC, other=0.0).to(gl.float32)
                acc += gl.expand_dims(bias, PIX_AXIS)
            FUSED: gl.constexpr = p.HAS_BN or p.HAS_RESIDUAL or p.ACTIVATION != "none" or p.ROUND_TF32
            if p.BLOCKED_STORE:
                # [pixels, channels] into channels_last, through shared memory into a layout where each thread
                # holds 4 neighbouring channels: 8-byte stores of 16-bit values, not the MMA layout's 4-byte pairs.
                # A fused epilogue runs after the conversion, on fp32, where the residual loads as the store goes.
                store_layout: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [gl.num_warps(), 1], [1, 0])
                if FUSED:
                    acc = gl.convert_layout(acc, store_layout)
                else:
                    out = gl.convert_layout(acc.to(p.y_ptr.dtype.element_ty), store_layout)
            else:
                store_layout: gl.constexpr = mma_layout
                if not FUSED:
                    out = acc.to(p.y_ptr.dtype.element_ty)
            # Pixel offsets along the tile's pixel axis, channel offsets along its channel axis.
            offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1 - PIX_AXIS, store_layout))
            offs_n = n0 + gl.arange(0, N_PART, layout=gl.SliceLayout(PIX_AXIS, store_layout))
            in_map = offs_m % (p.BLOCK_H * p.BLOCK_W)
            oh = oh0 + in_map // p.BLOCK_W
            ow = ow0 + in_map % p.BLOCK_W
            img = img0 + offs_m // (p.BLOCK_H * p.BLOCK_W)
            n_ok = offs_n < p.OC
            m_ok = (img < p.N) & (oh < p.OH) & (ow < p.OW)
            if p.USE_INT64:
                img = img.to(gl.int64)
                oh = oh.to(gl.int64)
                ow = ow.to(gl.int64)
            pix = img * p.syn + oh * p.syh + ow * p.syw
            y_offsets = gl.expand_dims(pix, 1 - PIX_AXIS) + gl.expand_dims(offs_n * p.syc, PIX_AXIS)
            mask = gl.expand_dims(m_ok, 1 - PIX_AXIS) & gl.expand_dims(n_ok, PIX_AXIS)
            if FUSED:
                # The residual's offsets are the output's, through its own strides (the launcher maps them for a
                # flat problem, whose img and oh are 0 and ow runs over all the pixels); where those are the
                # output's, its offsets, not a second tile of them in registers.
                if p.RESIDUAL_AS_Y:
                    r_offsets = y_offsets
                else:
                    r_offsets = gl.expand_dims(img * p.srn + oh * p.srh + ow * p.srw, 1 - PIX_AXIS) \
                        + gl.expand_dims(offs_n * p.src, PIX_AXIS)
                acc = fused_epilogue(acc, offs_n, n_ok, r_offsets, mask, p.mean_ptr, p.var_ptr, p.bn_w_ptr,
                                     p.bn_b_ptr, p.r_ptr, p.bn_eps, p.act_param0, p.act_param1, PIX_AXIS, p.HAS_BN,
                                     p.HAS_RESIDUAL, p.ACTIVATION, p.ROUND_TF32)
                out = acc.to(p.y_ptr.dtype.element_ty)
            gl.store(p.y_ptr + y_offsets, out, mask=mask)
            mine += 1

    @gluon.jit
    def _ws_first_consumer(p):
        _ws_consume(p, 0)

    @gluon.jit
    def _ws_second_consumer(p):
        _ws_consume(p, 1)

    @gluon.jit
    def igemm_ws_kernel(
        # pointers: descriptors, bias, output, then the epilogue's (the output stands in where a step is off)
        x_desc, x_tail_desc, w_desc, b_ptr, y_ptr, mean_ptr, var_ptr, bn_w_ptr, bn_b_ptr, r_ptr,
        # sizes and strides
        N, OH, OW, OC, C_CHUNKS, CPAD, syn, syc, syh, syw, sb, pad_h, pad_w, dil_h, dil_w, stride_h, stride_w, C,
        tiles, num_pid_n, srn, src, srh, srw,
        # the epilogue's scalars
        bn_eps, act_param0, act_param1,
        # meta-parameters
        KH: gl.constexpr, KW: gl.constexpr, HAS_BIAS: gl.constexpr, USE_INT64: gl.constexpr,
        BLOCK_B: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_W: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr, PIXELS_AS_N: gl.constexpr,
        SPLIT_TILE: gl.constexpr, HALO_ROW_STEP: gl.constexpr, TAIL_H: gl.constexpr, BLOCKED_STORE: gl.constexpr,
        HAS_BN: gl.constexpr, HAS_RESIDUAL: gl.constexpr, ACTIVATION: gl.constexpr, ROUND_TF32: gl.constexpr,
        RESIDUAL_AS_Y: gl.constexpr, num_warps: gl.constexpr,
    ):
        # A stage holds an input box and a weight tile, or, with HALO_ROW_STEP (the pixels between the
        # tiles of consecutive kernel rows in a patch), a patch of head + tail rows, rounded up to a power
        # of two (buffer shapes must be), and KH weight tiles.
        BOX: gl.constexpr = x_desc.block_type.shape
        W_PER_STEP: gl.constexpr = KH if HALO_ROW_STEP > 0 else 1
        if HALO_ROW_STEP > 0:
            PATCH_ROWS: gl.constexpr = BOX[1] * 2 if TAIL_H > 0 else BOX[1]
            a_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BOX[0], PATCH_ROWS, BOX[2], BOX[3]],
                                               x_desc.layout)
        else:
            a_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + BOX, x_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * W_PER_STEP] + w_desc.block_type.shape,
                                           w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            # Where two consumers share each tile, a stage goes back to the loader once both are done with it.
            mbarrier.init(empty.index(i), count=2 if SPLIT_TILE else 1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)

        # Scalars equal to 1 arrive as constexprs (Triton specializes them); the aggregate wants tensors.
        p = WsArgs(x_desc, x_tail_desc, w_desc, b_ptr, y_ptr, mean_ptr, var_ptr, bn_w_ptr, bn_b_ptr, r_ptr,
                   a_smem, w_smem, ready, empty, turn,
                   gl.to_tensor(N), gl.to_tensor(OH), gl.to_tensor(OW), gl.to_tensor(OC), gl.to_tensor(C_CHUNKS),
                   gl.to_tensor(CPAD), gl.to_tensor(syn), gl.to_tensor(syc), gl.to_tensor(syh), gl.to_tensor(syw),
                   gl.to_tensor(sb), gl.to_tensor(pad_h), gl.to_tensor(pad_w), gl.to_tensor(dil_h),
                   gl.to_tensor(dil_w), gl.to_tensor(stride_h), gl.to_tensor(stride_w), gl.to_tensor(C),
                   gl.to_tensor(tiles), gl.to_tensor(num_pid_n), gl.to_tensor(srn), gl.to_tensor(src),
                   gl.to_tensor(srh), gl.to_tensor(srw), gl.to_tensor(bn_eps), gl.to_tensor(act_param0),
                   gl.to_tensor(act_param1),
                   KH, KW, HAS_BIAS, USE_INT64, BLOCK_B, BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K, STAGES, CONSUMERS,
                   PIXELS_AS_N, SPLIT_TILE, HALO_ROW_STEP, TAIL_H, W_PER_STEP, BLOCKED_STORE, HAS_BN, HAS_RESIDUAL,
                   ACTIVATION, ROUND_TF32, RESIDUAL_AS_Y)
        # Registers a thread: the loader warp needs few; the consumers share what is left of the SM's 64K
        # (the launch caps the average at 168 over the 12 warps).
        if CONSUMERS == 2 or SPLIT_TILE:
            gl.warp_specialize([(_ws_first_consumer, (p, )), (_ws_loader, (p, )), (_ws_second_consumer, (p, ))],
                               [1, num_warps], [40, 232])
        else:
            gl.warp_specialize([(_ws_first_consumer, (p, )), (_ws_loader, (p, ))], [1], [40])


def launch_warps(consumer_warps: int, split: bool) -> int:
    """The kernel's num_warps, its first consumer's: where SPLIT_TILE, half the tile's consumer warps."""
    return consumer_warps // 2 if split else consumer_warps


def persistent_programs(tiles: int, device) -> int:
    """Programs to launch: one per SM (each takes every programs-th tile), fewer where there are fewer tiles."""
    return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def ws_launcher(cand: Candidate, maps, weight, y, stride, padding, dilation, flags):
    """launch(x, weight, bias, y, epi) for `cand` (of igemm_ws or igemm_ws_halo) on tensors shaped like these.
    `maps` = (images, input height, input width, output height, output width) as the kernel sees them: a flat
    1x1 problem is one row of all the pixels. `flags` are implicit_gemm's constexprs (HAS_BIAS, USE_INT64)
    plus the bias stride, and the fused epilogue ("epilogue", an Epilogue; none where missing) with the
    residual's (n, c, h, w) strides ("residual_strides"). `epi` is the call's EpilogueTensors (optional where
    the epilogue reads none). The strides must divide the input's height and width (tma_reason); a flat problem
    takes a residual only where its pixels are evenly spaced (flat_residual_strides), else ValueError."""
    n, in_h, in_w, out_h, out_w = maps
    oc, c, kernel_h, kernel_w = weight.shape
    p = cand.params
    bb, bh, bw, bn, bk = p["BLOCK_B"], p["BLOCK_H"], p["BLOCK_W"], p["BLOCK_N"], p["BLOCK_K"]
    cpad = triton.cdiv(c, bk) * bk
    x_box, tail_box, tail, row_step = input_boxes(cand.kernel, p, kernel_h, dilation[0])
    if len(x_box) == 5:  # [N, H/sh, sh, W/sw, sw*C]: see _load_tap_step
        x_shape, x_strides = strided_input_view(n, in_h, in_w, c, stride)
    else:
        if tuple(stride) != (1, 1):
            raise ValueError(f"{cand.describe()}: a patch per K step needs stride 1")
        x_shape, x_strides = [n, in_h, in_w, c], [in_h * in_w * c, in_w * c, c, 1]
    epilogue = flags.get("epilogue", IDENTITY)
    if not gluon_takes_epilogue(epilogue):
        raise ValueError(f"{cand.describe()}: this Triton's Gluon cannot fuse {epilogue.describe()}")
    residual_strides = tuple(flags.get("residual_strides", (0, 0, 0, 0))) if epilogue.residual else (0, 0, 0, 0)
    use_int64 = flags["USE_INT64"] or residual_needs_int64(y.shape, residual_strides)
    kernel_residual_strides = residual_strides  # as the kernel's (img, oh, ow) index the residual
    if epilogue.residual and (n, out_h, out_w) != (y.shape[0], y.shape[2], y.shape[3]):  # a flat problem
        kernel_residual_strides = flat_residual_strides(y.shape, residual_strides)
        if kernel_residual_strides is None:
            raise ValueError(f"{cand.describe()}: a 1x1 problem seen as one row of pixels needs a residual whose "
                             f"pixels are evenly spaced, not strides {residual_strides} for shape {tuple(y.shape)}")
    x_layout = gl.NVMMASharedLayout.get_default_for(x_box, gluon_dtype(y.dtype))  # the tail box shares it
    num_pid_n = triton.cdiv(oc, bn)
    tiles = triton.cdiv(n, bb) * triton.cdiv(out_h, bh) * triton.cdiv(out_w, bw) * num_pid_n
    programs = persistent_programs(tiles, y.device)
    scalars = (n, out_h, out_w, oc, triton.cdiv(c, bk), cpad, *y.stride(), flags["bias_stride"], *padding, *dilation,
               *stride, c, tiles, num_pid_n, *kernel_residual_strides, *epilogue_scalars(epilogue))
    # At most 12 warps (two consumer warpgroups and the loader's): 168 registers a thread on average fit 64K.
    split = p.get("SPLIT_TILE", False)
    meta = dict(KH=kernel_h, KW=kernel_w, HAS_BIAS=flags["HAS_BIAS"], USE_INT64=use_int64, BLOCK_B=bb, BLOCK_H=bh,
                BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, STAGES=cand.num_stages, CONSUMERS=p["CONSUMERS"],
                PIXELS_AS_N=p["PIXELS_AS_N"], SPLIT_TILE=split, HALO_ROW_STEP=row_step, TAIL_H=tail,
                BLOCKED_STORE=blocked_store(y.dtype, p["PIXELS_AS_N"], y.stride(1) == 1),
                **epilogue_constexprs(epilogue), num_warps=launch_warps(cand.num_warps, split), maxnreg=168,
                RESIDUAL_AS_Y=epilogue.residual and same_strides((n, oc, out_h, out_w), kernel_residual_strides,
                                                                 y.stride()))
    kernel_for = by_alignment(lambda: KernelLauncher(igemm_ws_kernel, (programs,), scalars, **meta))
    weight_descriptor = gluon_weight_descriptors(weight.shape, y.dtype, bn, bk)

    def launch(x, weight, bias, y, epi=NO_TENSORS):
        x = x.contiguous(memory_format=torch.channels_last)
        x_desc = GluonTensorDescriptor(x, x_shape, x_strides, x_box, x_layout)
        x_tail_desc = GluonTensorDescriptor(x, x_shape, x_strides, tail_box, x_layout) if tail else x_desc
        pointers = epilogue_pointers(epilogue, epi, y, residual_strides)
        kernel_for(pointers)(x_desc, x_tail_desc, weight_descriptor(weight), y if bias is None else bias, y,
                             *pointers)
    return launch
