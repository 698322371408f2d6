"""Helpers shared by the test modules (not a test module itself)."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import conv_backend.kernels.implicit_gemm as igemm_mod

# Relative-error bounds against a float64 reference, per math mode.
TOL = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2e-3, "tf32_round": 2e-3, "auto": 2e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}

X_LAYOUTS = ("contiguous", "channels_last", "sliced", "strided_w", "transposed_hw", "channels_last_sliced")


def tolerance(dtype: torch.dtype, precision: str = "ieee") -> float:
    return TOL[precision] if dtype == torch.float32 else TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def reference(x, w, b, stride, padding, dilation, groups):
    """The convolution in float64 through ATen."""
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation, groups)


def format_flags(t: torch.Tensor) -> tuple:
    """What a test can say about a 4-D tensor's memory format."""
    return (t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last))


def make_input(shape, layout: str, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A random N,C,H,W tensor with the given logical shape and one of X_LAYOUTS."""
    n, c, h, w = shape
    if layout == "contiguous":
        return torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":  # offset view, every dim but N strided oddly
        big = torch.randn((n, c + 2, h + 3, w + 2), device=device).to(dtype)
        out = big[:, 1:c + 1, 2:h + 2, 1:w + 1]
    elif layout == "strided_w":
        out = torch.randn((n, c, h, 2 * w), device=device).to(dtype)[..., ::2]
    elif layout == "transposed_hw":  # a permuted view: W is not the innermost dimension
        out = torch.randn((n, c, w, h), device=device).to(dtype).transpose(2, 3)
    elif layout == "channels_last_sliced":
        big = torch.randn((n, c, h + 2, w + 3), device=device).to(dtype).to(memory_format=torch.channels_last)
        out = big[:, :, 1:h + 1, 2:w + 2]
    else:
        raise ValueError(layout)
    assert out.shape == shape
    return out


def make_weight(shape, layout: str, dtype=torch.float32, device="cpu") -> torch.Tensor:
    oc, cg, kh, kw = shape
    if layout == "contiguous":
        return torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    if layout == "transposed":  # non-contiguous view of a [OC, CG, KW, KH] tensor
        return torch.randn((oc, cg, kw, kh), device=device).to(dtype).transpose(2, 3)
    raise ValueError(layout)


@dataclasses.dataclass
class Case:
    n: int
    c: int
    oc: int
    h: int
    w: int
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias: bool = True
    x_layout: str = "contiguous"
    w_layout: str = "contiguous"
    dtype: torch.dtype = torch.float32

    def out_hw(self) -> tuple:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                     zip((self.h, self.w), self.kernel, self.stride, self.padding, self.dilation))

    def tensors(self, device="cpu"):
        x = make_input((self.n, self.c, self.h, self.w), self.x_layout, self.dtype, device)
        w = make_weight((self.oc, self.c // self.groups, *self.kernel), self.w_layout, self.dtype, device)
        b = torch.randn(self.oc, device=device).to(self.dtype) if self.bias else None
        return x, w, b

    def args(self):
        return self.stride, self.padding, self.dilation, self.groups


def draw_case(rng: random.Random, path: str, dtype=torch.float32) -> Case:
    """A random small problem that `path` can take (interpreter-sized)."""
    while True:
        n = rng.choice([1, 2])
        if path == "depthwise":
            c = rng.randint(2, 6)
            groups, oc = c, c * rng.choice([1, 2, 3])
        elif path == "gemm_tma":
            if rng.random() < 0.25:
                groups, cg = 2, 16  # grouped boxes need 16 channels per group
            else:
                groups, cg = 1, rng.choice([4, 8, 12]) if dtype == torch.float32 else rng.choice([8, 16])
            c, oc = cg * groups, rng.randint(1, 20) * groups
        elif path in ("gemm_pointer", "gemm_nchw", "auto"):
            groups = rng.choice([1, 1, 2, 3])
            c, oc = rng.randint(1, 6) * groups, rng.randint(1, 7) * groups
        else:  # seed
            groups, c, oc = 1, rng.randint(1, 9), rng.randint(1, 20)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = (1, 1) if path == "gemm_tma" else (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, 3), rng.randint(0, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        x_layout = rng.choice(X_LAYOUTS)
        w_layout = rng.choice(["contiguous", "transposed", "channels_last"])
        case = Case(n, c, oc, rng.randint(3, 12), rng.randint(3, 12), kernel, stride, padding, dilation, groups,
                    rng.random() < 0.5, x_layout, w_layout, dtype)
        if min(case.out_hw()) >= 1:
            return case


def assert_plan_on_cpu_never_offers(monkeypatch, module, candidates_fn: str, kernel: str):
    """Off a Hopper GPU a Gluon kernel's candidates (`module.candidates_fn`) are never asked for: the
    interpreter can't run Gluon, so the kernel must not reach the tuner."""
    monkeypatch.setattr(module, candidates_fn, lambda *a, **k: pytest.fail(f"{kernel} kernel offered"))
    x = torch.randn(1, 16, 9, 9).to(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3)
    if not igemm_mod.tma_reason(x, w, (1, 1), 1):
        igemm_mod.implicit_gemm_plan(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto")


def read_tuning_file(path) -> dict:
    """A tuning cache file as {"format": ..., "entries": {key: entry}}, replayed as its format says (a header
    line, then one record per line, the last record of a key winning); every line must be whole JSON."""
    header, *records = (json.loads(line) for line in Path(path).read_text().splitlines())
    entries = {}
    for record in records:
        entries[record.pop("key")] = record
    return {"format": header["tritonconv_tuning_cache"], "entries": entries}
