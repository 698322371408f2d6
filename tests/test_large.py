"""Every `tl` kernel family on one image past 2**31 elements (GPU): 64-bit offsets wherever an index meets a
stride, with a fused epilogue whose residual is in the other memory format.

One fp16 image of 64 x 8192 x 4100 (2.15e9 elements, 4.3 GB a tensor; under 20 GB per test), each kernel
forced through its plan builder with one config; the output's last rows, past element 2**31 in every
channel of an NCHW tensor, are checked against float64 ATen.
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import conv_backend.kernels.depthwise as depthwise_mod
import conv_backend.kernels.implicit_gemm as igemm_mod
from conv_backend.epilogue import EpilogueTensors, apply_reference

from _util import Case, rel_err
from test_epilogue_kernels import FAMILIES, epilogue_of, plan_for

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
HEIGHT, WIDTH, CHANNELS = 8192, 4100, 64
ROWS = 3  # output rows checked, the last ones


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


class Large(NamedTuple):
    family: str
    in_channels: int
    kernel: int
    groups: int
    channels_last: bool  # the input's (and so the output's) format; the residual takes the other
    config: object       # () -> the Candidate, from the family's own candidate function


DT = torch.float16
LARGE = {
    "pointer": Large("pointer", CHANNELS, 3, 1, True, lambda: igemm_mod.pointer_candidates(CHANNELS, CHANNELS, DT)[0]),
    "tma": Large("tma", CHANNELS, 3, 1, True,
                 lambda: igemm_mod.tma_candidates(CHANNELS, CHANNELS, HEIGHT, WIDTH, 1, 1, DT)[0]),
    "nchw": Large("nchw", CHANNELS, 3, 1, False, lambda: igemm_mod.nchw_candidates(CHANNELS, CHANNELS, DT)[0]),
    "nchw_streamed": Large("nchw_streamed", CHANNELS, 1, 1, False, lambda: next(
        c for c in igemm_mod.nchw_candidates(CHANNELS, CHANNELS, DT, flat=True) if "TILES" in c.params)),
    "seed_direct": Large("seed_direct", 3, 3, 1, False, lambda: igemm_mod.seed_candidates(3, 1, 1)[0]),
    "depthwise": Large("depthwise", CHANNELS, 3, CHANNELS, False,
                       lambda: depthwise_mod.depthwise_candidates(False, True)[0]),
    "depthwise_streamed": Large("depthwise_streamed", CHANNELS, 3, CHANNELS, True, lambda: next(
        c for c in depthwise_mod.depthwise_candidates(True, True) if c.params.get("STREAM_ROWS"))),
}


def last_rows_reference(x, w, b, groups: int, rows: int):
    """The stride-1 'same' convolution's last `rows` output rows in float64, from the input rows they read."""
    pad = (w.shape[2] - 1) // 2
    xs = F.pad(x[:, :, x.shape[2] - rows - pad:].double(), (pad, pad, 0, pad))
    return F.conv2d(xs, w.double(), b.double(), groups=groups)


@pytest.mark.parametrize("name", sorted(LARGE))
def test_one_image_past_2_to_the_31_elements(name, monkeypatch, kernel_launches):
    large = LARGE[name]
    if name == "tma" and not hopper():
        pytest.skip("tensor-descriptor (TMA) loads need sm_90+")
    family = FAMILIES[large.family]
    fmt = torch.channels_last if large.channels_last else torch.contiguous_format
    other = torch.contiguous_format if large.channels_last else torch.channels_last
    x = torch.empty(1, large.in_channels, HEIGHT, WIDTH, device="cuda", dtype=DT, memory_format=fmt).normal_()
    fan_in = large.in_channels // large.groups * large.kernel ** 2
    w = (torch.randn(CHANNELS, large.in_channels // large.groups, large.kernel, large.kernel, device="cuda")
         / fan_in ** 0.5).to(DT)
    b = torch.randn(CHANNELS, device="cuda", dtype=DT)
    epilogue = epilogue_of("relu", batch_norm=True, residual=True)
    epi = EpilogueTensors(torch.randn(CHANNELS, device="cuda"), torch.rand(CHANNELS, device="cuda") + 0.5,
                          torch.randn(CHANNELS, device="cuda"), torch.randn(CHANNELS, device="cuda"),
                          torch.empty(1, CHANNELS, HEIGHT, WIDTH, device="cuda", dtype=DT,
                                      memory_format=other).normal_())
    assert epi.residual.numel() > 2**31
    pad = (large.kernel - 1) // 2
    cand = large.config()
    case = Case(1, large.in_channels, CHANNELS, HEIGHT, WIDTH, (large.kernel, large.kernel), padding=(pad, pad),
                groups=large.groups, dtype=DT)  # the problem's arguments (its tensors are made here)
    plan = plan_for(family, monkeypatch, x, w, b, case, epilogue, epi, cand)
    y = plan(x, w, b, epi)
    torch.cuda.synchronize()
    kernel = "igemm_nchw_streamed_kernel" if "TILES" in cand.params else family.kernel
    assert kernel_launches.names == [kernel] and kernel_launches[0][1]["USE_INT64"] is True
    assert y.shape == (1, CHANNELS, HEIGHT, WIDTH) and y.is_contiguous(memory_format=fmt)
    tail = slice(HEIGHT - ROWS, HEIGHT)
    ref = apply_reference(last_rows_reference(x, w, b, large.groups, ROWS), epilogue,
                          EpilogueTensors(*(t.double() for t in epi[:4]), epi.residual[:, :, tail].double()))
    assert rel_err(y[:, :, tail], ref) <= 1e-2
    del x, y, epi
    torch.cuda.empty_cache()
