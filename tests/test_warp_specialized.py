"""The warp-specialized kernel's host-side rules, on any machine (its numerics are tested on a Hopper GPU in
test_cuda.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton

import conv_backend.kernels.halo as halo
import conv_backend.kernels.warp_specialized as ws
from conv_backend.kernels.common import box_row_channels

from _util import assert_plan_on_cpu_never_offers

needs_gluon = pytest.mark.skipif(ws.gluon is None, reason="this Triton has no Gluon")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,out_channels,batch,out_h,out_w", [
    (64, 128, 8, 510, 1022),   # #55
    (512, 512, 32, 7, 7),      # ResNet's 3x3 at 7x7
    (256, 256, 32, 14, 14),
    (48, 72, 2, 23, 37),       # a partial channel chunk and a partial N tile
    (8, 24, 2, 20, 33),        # fewer channels than a box row
])
def test_candidates_fit_the_map_and_shared_memory(dtype, channels, out_channels, batch, out_h, out_w):
    cands = ws.ws_candidates(channels, out_channels, batch, out_h, out_w, dtype, sms=1)
    assert cands
    pixel_counts = {bb * bh * bw for bb, bh, bw, *_ in ws.WS_SHAPES}
    for cand in cands:
        p = cand.params
        block_m = p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"]
        assert block_m in pixel_counts, cand.describe()  # fitting a tile to the map keeps its pixel count
        assert p["BLOCK_W"] <= max(8, triton.next_power_of_2(out_w))
        assert p["BLOCK_H"] <= max(1, triton.next_power_of_2(out_h))
        assert p["BLOCK_B"] <= max(1, triton.next_power_of_2(batch))
        assert p["BLOCK_K"] == box_row_channels(channels, dtype)
        assert p["BLOCK_N"] <= max(16, triton.next_power_of_2(out_channels))
        assert 3 <= cand.num_stages <= 8
        stage_bytes = (block_m + p["BLOCK_N"]) * p["BLOCK_K"] * dtype.itemsize
        # What the epilogue's trip through shared memory takes is left free (its rule is tested below).
        scratch = ws.epilogue_scratch(dtype, p["PIXELS_AS_N"])
        assert cand.num_stages * stage_bytes <= ws.SMEM_BUDGET - scratch, cand.describe()
        assert p["CONSUMERS"] in (1, 2) and (p["CONSUMERS"] == 1 or cand.num_warps == 4)
        # With pixels as the MMA's N, the channels are its M: 64 for each warpgroup.
        assert not p["PIXELS_AS_N"] or p["BLOCK_N"] >= 16 * cand.num_warps, cand.describe()
        # Such tiles of two warpgroups run them as two consumers, each taking half the channels.
        assert p["SPLIT_TILE"] == (p["PIXELS_AS_N"] and cand.num_warps == 8), cand.describe()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,block_k", [(128, None), (48, 16), (96, 32), (8, None), (24, None)])
def test_strided_candidates_read_box_rows_within_the_channels(dtype, channels, block_k):
    """With a stride, the input's column phase shares the channel axis ([N, H/sh, sh, W/sw, sw*C]), so a box row
    of BLOCK_K channels must end within them: BLOCK_K divides the channels (halved from a 128-byte row) and is
    16 or more, as at stride 1; where it can't be (8 or 24 channels), no candidate."""
    stride_1 = ws.ws_candidates(channels, 128, 32, 28, 28, dtype, sms=1)
    strided = ws.ws_candidates(channels, 128, 32, 28, 28, dtype, sms=1, strided=True)
    if channels % 16:
        assert strided == [] and stride_1
        return
    expected = block_k if block_k else box_row_channels(channels, dtype)
    assert strided and {c.params["BLOCK_K"] for c in strided} == {expected}
    assert all(channels % c.params["BLOCK_K"] == 0 for c in strided)
    # Every tile of stride 1 is there too (shorter rows leave room for as many stages, or more).
    def tiles(cands):
        return {(c.num_warps, *(v for k, v in sorted(c.params.items()) if k != "BLOCK_K")) for c in cands}
    assert tiles(stride_1) <= tiles(strided)


def test_tap_boxes_are_boxes_of_the_strided_view():
    """A tap-per-step tile reads [BLOCK_B, BLOCK_H, 1, BLOCK_W, BLOCK_K] boxes of [N, H/sh, sh, W/sw, sw*C] (at
    stride 1, [N, H, 1, W, C]); the patch variant keeps 4-D NHWC boxes."""
    params = dict(BLOCK_B=2, BLOCK_H=8, BLOCK_W=16, BLOCK_K=32)
    assert ws.input_boxes("igemm_ws", params, 3, 1) == ([2, 8, 1, 16, 32], [2, 8, 1, 16, 32], 0, 0)
    box, _, tail, row_step = ws.input_boxes("igemm_ws_halo", {**params, "BLOCK_B": 1}, 3, 1)
    assert len(box) == 4 and tail == 2 and row_step == 16


@needs_gluon
def test_patch_variant_refuses_strides():
    """Its row taps are consecutive input rows: a strided problem (never offered it) gets a clear error."""
    from conv_backend.tuning import Candidate
    cand = Candidate.make("igemm_ws_halo", 8, 3, BLOCK_B=1, BLOCK_H=16, BLOCK_W=16, BLOCK_N=64, BLOCK_K=16,
                          CONSUMERS=1, PIXELS_AS_N=False, SPLIT_TILE=False)
    with pytest.raises(ValueError, match="needs stride 1"):
        ws.ws_launcher(cand, (2, 34, 34, 16, 16), torch.empty(64, 32, 3, 3), torch.empty(2, 64, 16, 16), (2, 2),
                       (0, 0), (1, 1), {})


def test_256_pixel_tiles_in_both_orientations_for_large_maps():
    cands = ws.ws_candidates(64, 128, 8, 510, 1022, torch.float32, sms=132)  # #55
    big = {(c.params["BLOCK_H"], c.params["BLOCK_W"], c.params["PIXELS_AS_N"]) for c in cands
           if c.params["BLOCK_B"] * c.params["BLOCK_H"] * c.params["BLOCK_W"] == 256}
    assert big == {(2, 128, True), (8, 32, True), (1, 256, True), (1, 256, False)}
    assert all(c.num_warps == 8 and c.num_stages == 4 for c in cands
               if c.params["BLOCK_B"] * c.params["BLOCK_H"] * c.params["BLOCK_W"] == 256)
    # 64 output channels: one warpgroup's worth, so no pixels-as-N tile of two warpgroups.
    narrow = ws.ws_candidates(32, 64, 8, 512, 512, torch.float32, sms=132)
    assert narrow and not any(c.params["PIXELS_AS_N"] for c in narrow)


def test_seven_by_seven_maps_get_one_box_per_image():
    cands = ws.ws_candidates(512, 512, 32, 7, 7, torch.bfloat16, sms=132)
    assert {(c.params["BLOCK_H"], c.params["BLOCK_W"]) for c in cands} == {(8, 8)}


def test_no_candidate_where_tiles_leave_most_sms_idle():
    # One 7x7 image: four tiles of 64 pixels x 128 channels, where the GPU has 132 SMs.
    assert ws.ws_candidates(512, 512, 1, 7, 7, torch.bfloat16, sms=132) == []
    assert ws.ws_candidates(512, 512, 1, 7, 7, torch.bfloat16, sms=8)


@pytest.fixture
def views_supported(monkeypatch):
    """The patch variant is offered only where this Triton compiles its shared-memory views (3.6 does, 3.8
    does not); its host-side rules are tested as if it did."""
    monkeypatch.setattr(ws, "unaligned_views_supported", lambda: True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,out_channels,batch,out_h,out_w,kernel_h,dil_h", [
    (64, 128, 8, 510, 1022, 3, 1),  # #55
    (32, 64, 8, 508, 496, 5, 2),    # the seed problem (#80): a 24-row patch for 16-row tiles
    (64, 64, 4, 127, 255, 2, 1),    # a 2-row kernel: patches of BLOCK_H + 1 rows
    (8, 24, 2, 60, 70, 3, 1),       # fewer channels than a box row
    (48, 72, 2, 23, 37, 3, 1),      # a small map, a partial channel chunk and a partial N tile
])
def test_halo_candidates_fit_the_map_and_shared_memory(views_supported, dtype, channels, out_channels, batch, out_h,
                                                       out_w, kernel_h, dil_h):
    cands = ws.ws_halo_candidates(channels, out_channels, batch, out_h, out_w, kernel_h, dil_h, dtype, sms=1)
    assert cands
    elem, row = dtype.itemsize, box_row_channels(channels, dtype)
    max_n = max(16, triton.next_power_of_2(out_channels))
    shapes = {(bh, bw, min(bn, max_n), warps, pixels_as_n) for bh, bw, bn, warps, pixels_as_n in ws.WS_HALO_SHAPES}
    for cand in cands:
        p = cand.params
        bh, bw, bn, bk = p["BLOCK_H"], p["BLOCK_W"], p["BLOCK_N"], p["BLOCK_K"]
        assert cand.kernel == "igemm_ws_halo" and p["BLOCK_B"] == 1 and p["CONSUMERS"] == 1, cand.describe()
        assert (bh, bw, bn, cand.num_warps, p["PIXELS_AS_N"]) in shapes, cand.describe()
        assert bw <= max(8, triton.next_power_of_2(out_w)) and bh <= max(1, triton.next_power_of_2(out_h))
        assert ws.patch_split(bh, kernel_h, dil_h) is not None, cand.describe()
        assert 3 <= cand.num_stages <= 8
        stage_bytes = halo.smem_bytes(bh, bw, bn, bk, kernel_h, dil_h, elem, 1)
        budget = ws.SMEM_BUDGET - ws.epilogue_scratch(dtype, p["PIXELS_AS_N"])
        assert cand.num_stages * stage_bytes <= budget, cand.describe()
        # A full 128-byte row of channels, or half of one only where a full row would not leave three stages.
        full_row_stages = budget // halo.smem_bytes(bh, bw, bn, row, kernel_h, dil_h, elem, 1)
        assert bk == row or (bk == row // 2 and full_row_stages < 3), cand.describe()
        # With pixels as the MMA's N, the channels are its M: 64 for each warpgroup.
        assert not p["PIXELS_AS_N"] or bn >= 16 * cand.num_warps, cand.describe()
        assert p["SPLIT_TILE"] == (p["PIXELS_AS_N"] and cand.num_warps == 8), cand.describe()


def test_halo_candidates_for_problem_55(views_supported):
    """#55 in fp32 (64 -> 128 channels, 3x3, out 510x1022; 32 channels fill a 128-byte row) takes every shape.
    Budget 220 KiB = 225280 bytes; a stage holds next_pow2(BLOCK_H + 2) * BLOCK_W patch pixels and 3 * BLOCK_N
    weight rows, of BLOCK_K * 4 bytes each:
    - 8x32 and 4x64 (patches of 16 and 8 rows: 512 pixels) and 16x16 (32 rows: 512) with BLOCK_N 128 (16x16
      only with pixels as M):
      (512 + 384) * 128 B = 114688 B, one stage; a half row (16 channels) makes it 57344 B, three stages.
    - 16x16 with BLOCK_N 64: (512 + 192) * 128 B = 90112 B, two stages; a half row: 45056 B, five stages.
    - 16x8 and 8x16 with BLOCK_N 64 (256 patch pixels): (256 + 192) * 128 B = 57344 B, three stages, a full row.
    Pixels as N only with 128 channels (64 per warpgroup of 8 warps), as two consumers of 64 channels each
    (SPLIT_TILE); tiles are in the thousands."""
    cands = ws.ws_halo_candidates(64, 128, 8, 510, 1022, 3, 1, torch.float32, sms=132)
    got = {(c.params["BLOCK_H"], c.params["BLOCK_W"], c.params["BLOCK_N"], c.params["PIXELS_AS_N"],
            c.params["BLOCK_K"]): c.num_stages for c in cands}
    assert got == {(8, 32, 128, True, 16): 3, (4, 64, 128, True, 16): 3, (8, 32, 128, False, 16): 3,
                   (16, 16, 128, False, 16): 3, (16, 16, 64, False, 16): 5,
                   (16, 8, 64, False, 32): 3, (8, 16, 64, False, 32): 3}
    assert len(cands) == len(got)
    assert {c.params["SPLIT_TILE"] for c in cands if c.params["PIXELS_AS_N"]} == {True}
    assert not any(c.params["SPLIT_TILE"] for c in cands if not c.params["PIXELS_AS_N"])


def test_split_tile_only_for_two_warpgroups_with_pixels_as_n():
    """Two consumers of 4 warps, each taking half the channels, only for 8-warp pixels-as-N tiles (with pixels
    as M the halves ran slower); the kernel is then launched with 4 warps, its first consumer's."""
    assert ws.split_tile(8, 1, True)
    assert not ws.split_tile(8, 1, False) and not ws.split_tile(4, 1, True) and not ws.split_tile(4, 2, False)
    assert ws.launch_warps(8, True) == 4 and ws.launch_warps(8, False) == 8 and ws.launch_warps(4, False) == 4


def test_halo_variant_not_offered_where_it_cannot_help(monkeypatch):
    """No rows to share in a one-row kernel; no views on a Triton that rejects them; and, like the other
    configs, none where the tiles would leave most SMs idle."""
    monkeypatch.setattr(ws, "unaligned_views_supported", lambda: True)
    assert ws.ws_halo_candidates(64, 128, 8, 510, 1022, 1, 1, torch.float32, sms=132) == []
    # One 16x16 image: at most four tiles (16x8 or 8x16 pixels by 64 channels, twice), where the GPU has 132 SMs.
    assert ws.ws_halo_candidates(64, 128, 1, 16, 16, 3, 1, torch.bfloat16, sms=132) == []
    assert ws.ws_halo_candidates(64, 128, 1, 16, 16, 3, 1, torch.bfloat16, sms=1)
    monkeypatch.setattr(ws, "unaligned_views_supported", lambda: False)
    assert ws.ws_halo_candidates(64, 128, 8, 510, 1022, 3, 1, torch.float32, sms=132) == []


def test_epilogue_stores_through_shared_memory_for_16_bit_outputs():
    """16-bit channels_last outputs leave the MMA layout in 4-byte pairs, so the epilogue converts them through
    shared memory into 8-byte stores; fp32 stores 8 bytes from the MMA layout already, and with pixels as N or
    into NCHW (pixels contiguous) the conversion would take the whole tile's worth of shared memory."""
    assert ws.blocked_store(torch.bfloat16, False, True) and ws.blocked_store(torch.float16, False, True)
    assert not ws.blocked_store(torch.float32, False, True)
    assert not ws.blocked_store(torch.bfloat16, True, True) and not ws.blocked_store(torch.bfloat16, False, False)
    # Where it does, the stages leave the conversion its scratch: 128x128 bf16 tiles of 64-channel rows.
    plain = {c.params["BLOCK_B"] * c.params["BLOCK_H"] * c.params["BLOCK_W"]: c.num_stages
             for c in ws.ws_candidates(64, 128, 8, 510, 1022, torch.bfloat16, sms=1)
             if c.params["BLOCK_N"] == 128 and not c.params["PIXELS_AS_N"] and c.params["CONSUMERS"] == 1}
    assert plain[128] == (ws.SMEM_BUDGET - ws.EPILOGUE_SCRATCH) // ((128 + 128) * 64 * 2)

def test_not_offered_off_gpu():
    x, w = torch.randn(1, 32, 16, 16), torch.randn(64, 32, 3, 3)
    assert "CUDA" in ws.ws_reason(x, w, (1, 1), (1, 1), 1, "tf32") or ws.gluon is None


def test_plan_on_cpu_offers_no_ws_candidate(monkeypatch):
    """Off a Hopper GPU the warp-specialized kernel is never timed (the interpreter can't run Gluon)."""
    assert_plan_on_cpu_never_offers(monkeypatch, ws, "ws_candidates", "warp-specialized")


def test_plan_on_cpu_offers_no_ws_halo_candidate(monkeypatch):
    """Nor is its patch variant."""
    assert_plan_on_cpu_never_offers(monkeypatch, ws, "ws_halo_candidates", "warp-specialized patch")


# Compiles every config the tuner may pick for these problems, in a process of its own: the interpreter, which
# runs the rest of the CPU suite, rewires parts of triton.language that Gluon's compiler then trips over.
COMPILE_EVERY_CANDIDATE = """
import re
import torch, triton
import conv_backend.kernels.warp_specialized as ws


def check_split(ptx, cand):
    # Two consumers sharing each tile: each stage's 'empty' barrier waits for both, and no CTA barrier spans
    # more than one consumer's 4 warps (an 8-warp consumer meets at 256-thread barriers every K step).
    split = re.search(r"mbarrier\.init\.shared(::cta)?\.b64 \[[^]]+\], 2;", ptx) is not None
    wide = re.search(r"bar\.sync\s+\d+, 256;", ptx) is not None
    assert split == cand.params["SPLIT_TILE"] and (not split or not wide), cand.describe()


if not ws.warp_specialize_compiles():
    print("NOT OFFERED"); raise SystemExit(0)
for dtype, shape in [(torch.float32, (512, 512, 32, 7, 7)),
                     (torch.bfloat16, (64, 256, 1, 1, 4 * 56 * 56)),  # a flat 1x1: 256-channel tiles
                     (torch.float16, (8, 24, 2, 20, 33))]:
    for cand in ws.ws_candidates(*shape, dtype, sms=1):
        kernel = ws.compile_for_sm90(dtype, cand.params, cand.num_warps, cand.num_stages)
        ptx = kernel.asm["ptx"]
        # The stages and the epilogue's scratch fit the 227 KiB a block may take on an H100 or H200.
        assert kernel.metadata.shared <= 227 * 1024, (cand.describe(), kernel.metadata.shared)
        # The loader's copies and the consumers' MMAs, in warps whose registers were re-divided.
        assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx, cand.describe()
        p = cand.params
        if p["PIXELS_AS_N"]:  # all the tile's pixels are each MMA's N
            assert f"m64n{p['BLOCK_B'] * p['BLOCK_H'] * p['BLOCK_W']}k" in ptx, cand.describe()
        check_split(ptx, cand)
        print("compiled", dtype, cand.describe())
# The patch variant, where this Triton compiles its views: #55 in fp32 (8 configs) and the seed problem in bf16
# (4 configs; 32 channels are half a bf16 row, and its patches are split 8 + 4, 16 and 16 + 8).
print("views supported:", ws.unaligned_views_supported())
if ws.unaligned_views_supported():
    for dtype, shape, kernel_hw, dil_h in [(torch.float32, (64, 128, 8, 510, 1022), (3, 3), 1),
                                           (torch.bfloat16, (32, 64, 8, 508, 496), (5, 9), 2)]:
        for cand in ws.ws_halo_candidates(*shape, kernel_hw[0], dil_h, dtype, sms=1):
            kernel = ws.compile_for_sm90(dtype, cand.params, cand.num_warps, cand.num_stages, kernel_hw=kernel_hw,
                                         kernel="igemm_ws_halo", dil_h=dil_h)
            ptx = kernel.asm["ptx"]
            assert kernel.metadata.shared <= 227 * 1024, (cand.describe(), kernel.metadata.shared)
            assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx, cand.describe()
            p = cand.params
            if p["PIXELS_AS_N"]:
                assert f"m64n{p['BLOCK_H'] * p['BLOCK_W']}k" in ptx, cand.describe()
            check_split(ptx, cand)
            print("compiled-halo", dtype, kernel_hw, cand.describe())
"""


def _compile_in_subprocess(script: str) -> list:
    """Run a compile script in a process of its own (no interpreter) and return its output lines; skip where
    this Triton does not compile the kernel (it is then not offered)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if "NOT OFFERED" in done.stdout:
        # Releases it is known to compile on must not lose it: that would be our bug, not Gluon's API moving.
        assert not triton.__version__.startswith(("3.6.", "3.8.")), done.stderr[-4000:]
        pytest.skip(f"Triton {triton.__version__} does not compile the kernel; it is not offered")
    return done.stdout.splitlines()


@needs_gluon
def test_compile_probe_agrees_with_every_candidate():
    """warp_specialize_compiles() decides whether the kernel is offered: where it says yes, every config the
    tuner may pick compiles for sm_90 on this Triton (no GPU needed); so does every config of the patch
    variant where unaligned_views_supported() offers it."""
    lines = _compile_in_subprocess(COMPILE_EVERY_CANDIDATE)
    plain = [line for line in lines if line.startswith("compiled ")]
    assert len(plain) >= 3, lines
    assert any("PIXELS_AS_N=True" in line for line in plain), lines  # the swapped orientation is among them
    assert any("SPLIT_TILE=True" in line for line in plain), lines
    views = "views supported: True" in lines
    if triton.__version__.startswith("3.6."):  # the release the patch variant was written for must keep it
        assert views, lines
    if views:
        patched = [line for line in lines if line.startswith("compiled-halo ")]
        assert patched and any("PIXELS_AS_N=True" in line for line in patched), lines
        assert any("SPLIT_TILE=True" in line for line in patched), lines


def test_gluon_rules_on_a_pretend_hopper(monkeypatch):
    """The conditions both Gluon kernels share (common.gluon_sm90_reason), checked without a GPU: the
    capability query and the interpreter switch are stood in for, and the tensor is a stand-in on 'cuda'."""
    import types

    import conv_backend.kernels.halo as halo
    from conv_backend.kernels import common
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    assert common.gluon_sm90_reason(True, x, (1, 1), 1, "tf32") is None
    assert "no Gluon" in common.gluon_sm90_reason(False, x, (1, 1), 1, "tf32")
    assert "stride 1" in common.gluon_sm90_reason(True, x, (2, 2), 1, "tf32")
    assert common.gluon_sm90_reason(True, x, (2, 2), 1, "tf32", any_stride=True) is None
    assert "groups 1" in common.gluon_sm90_reason(True, x, (1, 1), 2, "tf32")
    assert "'ieee'" in common.gluon_sm90_reason(True, x, (1, 1), 1, "ieee")
    assert "'tf32x3'" in common.gluon_sm90_reason(True, x, (1, 1), 1, "tf32x3")
    x16 = types.SimpleNamespace(device=x.device, dtype=torch.bfloat16)
    assert common.gluon_sm90_reason(True, x16, (1, 1), 1, "ieee") is None
    capability[0] = (8, 0)
    assert "Hopper" in common.gluon_sm90_reason(True, x, (1, 1), 1, "tf32")
    capability[0] = (9, 0)
    # Each kernel adds its own: the halo kernel needs a kernel taller than one row.
    assert "one row" in halo.halo_reason(x, torch.empty(64, 32, 1, 3), (1, 1), (1, 1), 1, "tf32")


# Compiles the fused epilogue (epilogue.py) into both Gluon kernels for sm_90 on representative configs, in a
# process of its own (as above): every store path once with batch norm, a residual and an activation together,
# and every activation once on one small config. PTX is read for the steps: batch norm's rsqrt, the residual's
# extra global loads, the exponentials of the exp-based activations.
COMPILE_EPILOGUES = """
import torch, triton
import conv_backend.kernels.halo as halo
import conv_backend.kernels.warp_specialized as ws
from conv_backend.epilogue import ACTIVATIONS, Epilogue
from conv_backend.kernels.epilogue_gluon import gluon_takes_epilogue

if not ws.warp_specialize_compiles():
    print("NOT OFFERED"); raise SystemExit(0)
BN_ADD_RELU = Epilogue(batch_norm=True, bn_eps=1e-5, residual=True, activation="relu")
BN_ADD_GELU = Epilogue(batch_norm=True, bn_eps=1e-3, residual=True, activation="gelu")
PARAMS = {"hardtanh": (0.0, 6.0), "leaky_relu": (0.01,)}
EXP_BASED = {"silu", "gelu", "gelu_tanh", "sigmoid", "tanh"}


def tap(bb, bh, bw, bn, bk, pixels_as_n=False, consumers=1, split=False):
    return dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, CONSUMERS=consumers,
                PIXELS_AS_N=pixels_as_n, SPLIT_TILE=split)


def global_loads(ptx):
    return ptx.count("ld.global")


def check_fused(label, compile_one, residual_as_y=False):
    plain, fused = compile_one(Epilogue(), False), compile_one(BN_ADD_GELU, residual_as_y)
    assert fused.metadata.shared <= 227 * 1024, (label, fused.metadata.shared)
    p, f = plain.asm["ptx"], fused.asm["ptx"]
    assert "rsqrt" not in p and "ex2.approx" not in p, label  # identity: no epilogue code
    assert "rsqrt" in f and "ex2.approx" in f and global_loads(f) > global_loads(p), label
    assert "wgmma.mma_async" in f, label
    print("fused", label)


# The tap-per-step kernel: the MMA layout's stores (fp32 into channels_last; 16-bit into NCHW), the blocked
# store through shared memory (16-bit into channels_last), pixels as N with split consumers, two consumers.
# A residual with the output's strides reuses the store's offsets (RESIDUAL_AS_Y); once each way per path.
for label, dtype, params, warps, stages, channels_last, as_y in [
        ("mma-fp32-nhwc", torch.float32, tap(1, 1, 128, 128, 32), 4, 5, True, True),
        ("mma-bf16-nchw", torch.bfloat16, tap(2, 8, 8, 64, 64), 4, 6, False, False),
        ("blocked-fp16-nhwc", torch.float16, tap(1, 1, 128, 128, 64), 8, 6, True, True),
        ("pixels-as-n-split-bf16", torch.bfloat16, tap(1, 2, 128, 128, 64, True, 1, True), 8, 4, True, False),
        ("two-consumers-bf16", torch.bfloat16, tap(1, 8, 16, 128, 64, False, 2), 4, 5, True, False)]:
    check_fused(label, lambda epi, as_y: ws.compile_for_sm90(dtype, params, warps, stages, epilogue=epi,
                                                             channels_last=channels_last, residual_as_y=as_y), as_y)

# Every activation (and batch norm + residual + ReLU) on one small config.
small = tap(2, 8, 8, 64, 32)
def compile_small(epi):
    return ws.compile_for_sm90(torch.float32, small, 4, 4, epilogue=epi, channels_last=False)
ptx = {"none": compile_small(Epilogue()).asm["ptx"]}
for act in ACTIVATIONS:
    if act == "none":
        continue
    assert gluon_takes_epilogue(Epilogue(activation=act, activation_params=PARAMS.get(act, ()))), act
    ptx[act] = compile_small(Epilogue(activation=act, activation_params=PARAMS.get(act, ()))).asm["ptx"]
    assert ("ex2.approx" in ptx[act]) == (act in EXP_BASED), act
    print("activation", act)
assert len(set(ptx.values())) == len(ptx), "two activations compiled to the same code"
bn_relu = compile_small(BN_ADD_RELU).asm["ptx"]
assert "rsqrt" in bn_relu and global_loads(bn_relu) > global_loads(ptx["relu"])
print("fused bn+add+relu")

# An fp32 output stored rounded to TF32 (Epilogue.round_tf32, conv_backend/tf32.py): its mask, in the MMA
# layout's store and in the fp32 channels_last one, and (below) in the patch variant and the halo kernel.
def rounds(ptx_text, base):
    return ptx_text != base and ptx_text.count("and.b32") > base.count("and.b32")
RELU_TF32 = Epilogue(activation="relu", round_tf32=True)
assert rounds(compile_small(RELU_TF32).asm["ptx"], ptx["relu"])
nhwc = lambda epi: ws.compile_for_sm90(torch.float32, tap(1, 1, 128, 128, 32), 4, 5, epilogue=epi,  # noqa: E731
                                       channels_last=True, residual_as_y=True).asm["ptx"]
assert rounds(nhwc(RELU_TF32), nhwc(Epilogue(activation="relu")))
print("rounded to tf32")

# The patch variant and the halo kernel, where this Triton compiles their views.
print("views supported:", ws.unaligned_views_supported())
if ws.unaligned_views_supported():
    for label, dtype, params, warps, stages, as_y in [
            ("patch-fp32", torch.float32, dict(tap(1, 16, 16, 64, 16)), 8, 5, True),
            ("patch-pixels-as-n-bf16", torch.bfloat16, dict(tap(1, 8, 32, 128, 32, True, 1, True)), 8, 3, False)]:
        check_fused(label, lambda epi, as_y: ws.compile_for_sm90(dtype, params, warps, stages, kernel="igemm_ws_halo",
                                                                 epilogue=epi, residual_as_y=as_y), as_y)
    for label, dtype, as_y in [("halo-fp32", torch.float32, True), ("halo-bf16", torch.bfloat16, False)]:
        check_fused(label, lambda epi, as_y: halo.compile_for_sm90(
            dtype, dict(BLOCK_H=16, BLOCK_W=8, BLOCK_N=64, BLOCK_K=32), 4, 2, epilogue=epi, residual_as_y=as_y), as_y)
    patch = lambda epi: ws.compile_for_sm90(torch.float32, dict(tap(1, 16, 16, 64, 16)), 8, 5,  # noqa: E731
                                            kernel="igemm_ws_halo", epilogue=epi).asm["ptx"]
    halo_fp32 = lambda epi: halo.compile_for_sm90(torch.float32, dict(BLOCK_H=16, BLOCK_W=8, BLOCK_N=64,  # noqa: E731
                                                                      BLOCK_K=32), 4, 2, epilogue=epi).asm["ptx"]
    for label, compile_ptx in (("patch", patch), ("halo", halo_fp32)):
        assert rounds(compile_ptx(RELU_TF32), compile_ptx(Epilogue(activation="relu"))), label
        print("rounded to tf32", label)
"""


@needs_gluon
def test_fused_epilogues_compile_for_sm90():
    """Batch norm, residual, every activation and the rounding of fp32 outputs to TF32 compile into every store
    path of both Gluon kernels for sm_90 (no GPU needed); their numerics are tested on a Hopper GPU in
    test_gluon_epilogue_cuda.py."""
    lines = _compile_in_subprocess(COMPILE_EPILOGUES)
    assert sum(line.startswith("fused ") for line in lines) >= 6, lines
    assert sum(line.startswith("activation ") for line in lines) == 10, lines
    assert "rounded to tf32" in lines, lines
    if "views supported: True" in lines:
        assert sum(line.startswith("fused patch") for line in lines) == 2, lines
        assert sum(line.startswith("fused halo") for line in lines) == 2, lines
        assert "rounded to tf32 patch" in lines and "rounded to tf32 halo" in lines, lines
