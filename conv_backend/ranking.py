"""Expected-speed order of kernel candidates, for choosing without timing (or timing only a few).

The rules encode which kernel family, and which tile within it, won which class of
convolution on an H100 (bench/NOTES.md, and the "Kernels chosen" lists of the benchmark's
results in bench/results/). They only order the candidates the kernel modules offer
for a problem; which families are offered already says much about the hardware (the
Gluon kernels only on Hopper, tensor-descriptor loads only where TMA runs).
"""
from __future__ import annotations

import ast
from typing import NamedTuple, Optional, Sequence

import torch
import triton

# Families in their usual order of speed, for a problem every one of them can take. A family is a kernel and the
# variant flags that change its algorithm (family()); a lower number is expected faster.
FAMILY_ORDER = {
    # Only offered where they are the specialists: a few input channels (the seed's direct kernel, which wastes
    # no K lanes on a 3-channel stem), 1x1 convolutions of NCHW planes read in place (streamed tiles first),
    # depthwise convolutions.
    "seed_direct": 0,
    "igemm_nchw+streamed": 0,
    "igemm_nchw": 1,
    "depthwise+capped": 0,
    "depthwise+streamed": 0,
    "depthwise": 1,
    # Hopper: the warp-specialized kernel's patch variant won every stride-1 convolution taller than one row on
    # maps of 14x14 and up (one input patch feeds all row taps); the tap-per-step variant won strided layers,
    # 7x7 maps and 1x1 layers into channels_last.
    "igemm_ws_halo": 2,
    "igemm_ws": 3,
    "igemm_tma": 4,
    "igemm_halo": 5,  # the patch variant does what it does, inside a deeper pipeline
    "igemm_pointer+tma_weights": 6,  # promoted on maps whose side is not a multiple of 8 (_family_score)
    "igemm_pointer": 7,
}
WAVE_TILES = 128  # tiles that fill an H100's or H200's 132 SMs about once
SPLIT_K_PENALTY = 0.5  # split-K variants follow their base family: offered only where tiles leave SMs idle


class ConvShape(NamedTuple):
    """What the ranking rules look at: the convolution's sizes, as a problem signature records them."""

    batch: int
    channels: int
    in_h: int
    in_w: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    dtype: torch.dtype

    @classmethod
    def from_signature(cls, signature: Sequence[str]) -> Optional["ConvShape"]:
        """Inverse of tuning.problem_signature (its fields are the str() of tuples, ints and a dtype name); None
        for a signature of another form."""
        try:
            x_shape, w_shape, stride, padding, dilation, groups, dtype = signature
            n, c, h, w = ast.literal_eval(x_shape)
            oc, _, kh, kw = ast.literal_eval(w_shape)
            dtype = getattr(torch, dtype)
            if not isinstance(dtype, torch.dtype):
                return None
            return cls(n, c, h, w, oc, kh, kw, tuple(ast.literal_eval(stride)), tuple(ast.literal_eval(padding)),
                       tuple(ast.literal_eval(dilation)), int(groups), dtype)
        except (ValueError, TypeError, SyntaxError, AttributeError):
            return None

    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_h - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_w - 1) - 1) // self.stride[1] + 1


def family(candidate) -> str:
    """The candidate's kernel and the flags that make it another algorithm (split-K is scored apart)."""
    p = candidate.params
    if candidate.kernel == "igemm_pointer" and p.get("TMA_WEIGHTS"):
        return "igemm_pointer+tma_weights"
    if candidate.kernel == "igemm_nchw" and p.get("TILES", 1) > 1:
        return "igemm_nchw+streamed"
    if candidate.kernel == "depthwise" and p.get("STREAM_ROWS"):
        return "depthwise+streamed"
    if candidate.kernel == "depthwise" and "maxnreg" in p:
        return "depthwise+capped"
    return candidate.kernel


def _family_score(candidate, shape: ConvShape) -> float:
    fam = family(candidate)
    score = float(FAMILY_ORDER.get(fam, len(FAMILY_ORDER)))
    if fam == "igemm_pointer+tma_weights" and (shape.out_h % 8 or shape.out_w % 8):
        # A box tile runs past a map whose side is not a multiple of 8, runs of pixels across the batch do not:
        # this variant beat the best box tile at 28x28.
        score = FAMILY_ORDER["igemm_tma"] - 0.25
    if fam == "igemm_tma" and (shape.kernel_h, shape.kernel_w) == (1, 1) and shape.dtype == torch.float32:
        score = FAMILY_ORDER["igemm_ws"] - 0.25  # the flat TMA tile won the fp32 1x1 layer (#87)
    if fam == "depthwise+streamed" and candidate.params.get("BLOCK_C", 1) > 1:
        score = FAMILY_ORDER["depthwise"]  # streamed rows won on NCHW planes only
    if candidate.params.get("SPLIT_K", 1) > 1:
        score += SPLIT_K_PENALTY
    return score


def _tile_score(candidate, shape: ConvShape) -> tuple:
    """Order within a family (lower first): the tile that won the nearest problem class on an H100."""
    p, kernel = candidate.params, candidate.kernel
    elem = shape.dtype.itemsize
    if kernel == "igemm_ws_halo":
        # Few input channels and >= 128 output channels: pixels as the MMA's N, split between two consumers (#63);
        # elsewhere pixels as M. Up to 64 output channels and no dilation, a tall 128-pixel tile of 4 warps with
        # the full 128-byte channel chunk won (#62, ResNet's 3x3 64); elsewhere 256-pixel tiles of 8 warps, their
        # chunk halved to fit the stages (#55, #56, dilated #80, ResNet's 3x3 256 at 14x14).
        # Then the tallest tile (16x8 over 8x16, 8x32 over 4x64), and the widest channel tile that still leaves a
        # wave of tiles (ResNet's 3x3 256 at 14x14 took 64).
        wants_n = shape.channels <= 16 and shape.out_channels >= 128
        narrow = shape.out_channels <= 64 and shape.dilation == (1, 1)
        pixels = p["BLOCK_H"] * p["BLOCK_W"]
        tiles = (shape.batch * triton.cdiv(shape.out_h, p["BLOCK_H"]) * triton.cdiv(shape.out_w, p["BLOCK_W"])
                 * triton.cdiv(shape.out_channels, p["BLOCK_N"]))
        return (bool(p.get("PIXELS_AS_N")) != wants_n, pixels != (128 if narrow else 256),
                narrow and p["BLOCK_K"] * elem < 128, -p["BLOCK_H"], tiles < WAVE_TILES, -p["BLOCK_N"])
    if kernel == "igemm_ws":
        # One consumer warpgroup on a 128-channel tile, deep ring, one map's 8x8 box on maps that small (7x7) and
        # 128 pixels elsewhere: the 3x3/2 layer (4x32) and 1x1 into channels_last (1x128). Two consumers in
        # turn won only #56.
        pixels = p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"]
        wanted = 64 if shape.out_h * shape.out_w <= 64 else 128
        return (p.get("CONSUMERS", 1) != 1, pixels != wanted, candidate.num_warps != 4, -p["BLOCK_N"],
                -candidate.num_stages)
    if kernel == "igemm_tma":
        # One warpgroup per tile (4 warps, several programs an SM) beat two on #63 and #55; the flat 1x1 tile of
        # 128 pixels and 64 channels won #87.
        pixels = p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"]
        return (candidate.num_warps != 4, pixels != 128, candidate.num_stages != 3, -p["BLOCK_N"])
    if kernel == "igemm_halo":
        return (p["BLOCK_H"] * p["BLOCK_W"] != 256, -p["BLOCK_N"])
    if kernel == "igemm_pointer":
        # As many output channels as the layer has (up to 128), then the larger tile: the pointer path's picks were
        # 256x64 for 64 output channels and 128x128 for 128 (the benchmark's forced pointer path).
        wanted_n = min(128, triton.next_power_of_2(shape.out_channels // shape.groups))
        return (p["BLOCK_N"] != wanted_n, -p["BLOCK_M"] * p["BLOCK_N"], candidate.num_warps != 8)
    if kernel == "igemm_nchw":
        # Four streamed tiles of 64x64 won ResNet's 1x1; one-tile 128x64 won #87 on NCHW.
        return (p.get("TILES", 1) != 4, (p["BLOCK_M"], p["BLOCK_N"]) != ((64, 64) if p.get("TILES") else (128, 64)),
                "maxnreg" in p)
    if kernel == "depthwise":
        # 8x8 pixels x 64 channels, 8 warps (capped at 80 registers) on channels_last; 8x64 pixels of one plane
        # with streamed rows, 2 warps, on NCHW.
        if p.get("BLOCK_C", 1) > 1:
            return ((p["BLOCK_H"], p["BLOCK_W"], p["BLOCK_C"]) != (8, 8, 64), "maxnreg" not in p)
        return ((p["BLOCK_H"], p["BLOCK_W"]) != (8, 64), candidate.num_warps)
    if kernel == "seed_direct":
        return ((p["BLOCK_OC"], p["BLOCK_HW"]) != (64, 128), -candidate.num_warps)  # the stem's pick
    return ()


def rank_key(candidate, shape: ConvShape) -> tuple:
    # The family's name between the two scores: tile scores only compare within one family.
    return (_family_score(candidate, shape), family(candidate), _tile_score(candidate, shape), candidate.describe())


def rank_candidates(candidates: Sequence, shape: ConvShape) -> list:
    """`candidates` from the expected fastest to the slowest (a stable, deterministic order)."""
    return sorted(candidates, key=lambda c: rank_key(c, shape))


def short_list(ranked: Sequence, size: int = 4, families: int = 3) -> list:
    """What the "fast" level times: the best-ranked candidate of each of the first `families` families, then the
    next candidates in rank order up to `size` (usually the leading family's runner-up tile)."""
    picked, seen = [], set()
    for cand in ranked:
        fam = (family(cand), cand.params.get("SPLIT_K", 1) > 1)
        if fam not in seen and len(seen) < families:
            seen.add(fam)
            picked.append(cand)
    for cand in ranked:
        if len(picked) >= size:
            break
        if cand not in picked:
            picked.append(cand)
    return sorted(picked[:size], key=ranked.index)
