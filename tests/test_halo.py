"""The halo kernel's host-side rules, on any machine (its numerics are tested on a Hopper GPU in test_cuda.py)."""
from __future__ import annotations

import pytest
import torch
import triton

import conv_backend.kernels.halo as halo
from conv_backend.kernels.common import box_row_channels

from _util import assert_plan_on_cpu_never_offers

needs_gluon = pytest.mark.skipif(halo.gluon is None, reason="this Triton has no Gluon")


@pytest.mark.parametrize("block_h,kernel_h,dil_h,expected", [
    (16, 5, 2, (16, 8)),   # the seed problem: a 24-row patch in boxes of 16 + 8
    (8, 3, 1, (8, 2)),
    (16, 1, 1, (16, 0)),   # one box
    (8, 4, 1, None),       # 11 rows: 8 + 3, and 3 is no box size
    (250, 3, 4, None),     # past the 256 rows a box may hold
])
def test_patch_split(block_h, kernel_h, dil_h, expected):
    assert halo.patch_split(block_h, kernel_h, dil_h) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,out_channels,kernel_h,dil_h", [(32, 64, 5, 2), (64, 128, 3, 1), (16, 128, 3, 1),
                                                                  (48, 72, 5, 1)])
def test_candidates_fit_shared_memory(dtype, channels, out_channels, kernel_h, dil_h):
    elem = torch.tensor([], dtype=dtype).element_size()
    cands = halo.halo_candidates(channels, out_channels, 500, 500, kernel_h, dil_h, dtype)
    assert cands
    for cand in cands:
        p = cand.params
        assert cand.num_stages >= 2
        assert p["BLOCK_K"] * elem <= 128 and p["BLOCK_K"] == box_row_channels(channels, dtype)
        assert p["BLOCK_N"] <= triton.next_power_of_2(out_channels)
        assert halo.patch_split(p["BLOCK_H"], kernel_h, dil_h) is not None
        used = halo.smem_bytes(p["BLOCK_H"], p["BLOCK_W"], p["BLOCK_N"], p["BLOCK_K"], kernel_h, dil_h, elem,
                               cand.num_stages)
        assert used <= halo.SMEM_BUDGET, cand.describe()


def test_no_candidate_for_maps_smaller_than_the_tiles():
    # 7x7 maps: the TMA kernel's tiles of several images serve them.
    assert halo.halo_candidates(512, 512, 7, 7, 3, 1, torch.bfloat16) == []


def test_not_offered_off_gpu():
    x, w = torch.randn(1, 32, 16, 16), torch.randn(64, 32, 3, 3)
    assert "CUDA" in halo.halo_reason(x, w, (1, 1), (1, 1), 1, "tf32") or halo.gluon is None


def test_plan_on_cpu_offers_no_halo_candidate(monkeypatch):
    """Off a Hopper GPU the halo kernel is never timed (the interpreter can't run Gluon)."""
    assert_plan_on_cpu_never_offers(monkeypatch, halo, "halo_candidates", "halo")


def _compile_halo_for_sm90():
    """Compile one config of the real kernel for sm_90 (no GPU needed); raises where Triton rejects it."""
    halo.compile_for_sm90(torch.float32, dict(BLOCK_H=16, BLOCK_W=8, BLOCK_N=64, BLOCK_K=32), num_warps=4,
                          num_stages=2, kernel_hw=(5, 9), dil_h=2)


@needs_gluon
def test_view_probe_agrees_with_the_kernel():
    """unaligned_views_supported() decides whether the kernel is offered: it must say yes exactly where the
    kernel compiles (Triton 3.6 does; later versions reject its views)."""
    try:
        _compile_halo_for_sm90()
        compiles = True
    except Exception:
        compiles = False
    assert halo.unaligned_views_supported() == compiles
