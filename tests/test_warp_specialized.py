"""The warp-specialized kernel's host-side rules, on any machine (its numerics are tested on a Hopper GPU in
test_cuda.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton

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
        assert cand.num_stages * stage_bytes <= ws.SMEM_BUDGET, cand.describe()
        assert p["CONSUMERS"] in (1, 2) and (p["CONSUMERS"] == 1 or cand.num_warps == 4)
        # With pixels as the MMA's N, the channels are its M: 64 for each warpgroup.
        assert not p["PIXELS_AS_N"] or p["BLOCK_N"] >= 16 * cand.num_warps, cand.describe()


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


def test_not_offered_off_gpu():
    x, w = torch.randn(1, 32, 16, 16), torch.randn(64, 32, 3, 3)
    assert "CUDA" in ws.ws_reason(x, w, (1, 1), (1, 1), 1, "tf32") or ws.gluon is None


def test_plan_on_cpu_offers_no_ws_candidate(monkeypatch):
    """Off a Hopper GPU the warp-specialized kernel is never timed (the interpreter can't run Gluon)."""
    assert_plan_on_cpu_never_offers(monkeypatch, ws, "ws_candidates", "warp-specialized")


# Compiles every config the tuner may pick for these problems, in a process of its own: the interpreter, which
# runs the rest of the CPU suite, rewires parts of triton.language that Gluon's compiler then trips over.
COMPILE_EVERY_CANDIDATE = """
import torch, triton
import conv_backend.kernels.warp_specialized as ws
if not ws.warp_specialize_compiles():
    print("NOT OFFERED"); raise SystemExit(0)
for dtype, shape in [(torch.float32, (512, 512, 32, 7, 7)),
                     (torch.bfloat16, (64, 256, 1, 1, 4 * 56 * 56)),  # a flat 1x1: 256-channel tiles
                     (torch.float16, (8, 24, 2, 20, 33))]:
    for cand in ws.ws_candidates(*shape, dtype, sms=1):
        ptx = ws.compile_for_sm90(dtype, cand.params, cand.num_warps, cand.num_stages).asm["ptx"]
        # The loader's copies and the consumers' MMAs, in warps whose registers were re-divided.
        assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx, cand.describe()
        p = cand.params
        if p["PIXELS_AS_N"]:  # all the tile's pixels are each MMA's N
            assert f"m64n{p['BLOCK_B'] * p['BLOCK_H'] * p['BLOCK_W']}k" in ptx, cand.describe()
        print("compiled", dtype, cand.describe())
"""


@needs_gluon
def test_compile_probe_agrees_with_every_candidate():
    """warp_specialize_compiles() decides whether the kernel is offered: where it says yes, every config the
    tuner may pick compiles for sm_90 on this Triton (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_EVERY_CANDIDATE], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if "NOT OFFERED" in done.stdout:
        # Releases it is known to compile on must not lose it: that would be our bug, not Gluon's API moving.
        assert not triton.__version__.startswith(("3.6.", "3.8.")), done.stderr[-4000:]
        pytest.skip(f"Triton {triton.__version__} does not compile the kernel; it is not offered")
    assert done.stdout.count("compiled") >= 3, done.stdout
    assert "PIXELS_AS_N=True" in done.stdout, done.stdout  # the swapped orientation is among them


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
    assert "groups 1" in common.gluon_sm90_reason(True, x, (1, 1), 2, "tf32")
    assert "exact fp32" in common.gluon_sm90_reason(True, x, (1, 1), 1, "ieee")
    x16 = types.SimpleNamespace(device=x.device, dtype=torch.bfloat16)
    assert common.gluon_sm90_reason(True, x16, (1, 1), 1, "ieee") is None
    capability[0] = (8, 0)
    assert "Hopper" in common.gluon_sm90_reason(True, x, (1, 1), 1, "tf32")
    capability[0] = (9, 0)
    # Each kernel adds its own: the halo kernel needs a kernel taller than one row.
    assert "one row" in halo.halo_reason(x, torch.empty(64, 32, 1, 3), (1, 1), (1, 1), 1, "tf32")
