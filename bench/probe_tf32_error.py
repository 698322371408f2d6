#!/usr/bin/env python3
"""A whole model's error against float64 when some of its convolutions multiply in TF32, on CPU (no GPU needed).

Each nn.Conv2d of a torchvision model (random weights, eval mode) is replaced by a float64 convolution of
its operands rounded to TF32 where runtime.choose_fp32_precision's rule would pick TF32 at the threshold
given (arithmetic intensity above it), and of the exact operands elsewhere ("tf32x3" and "ieee" are within
fp32's rounding of exact). Two roundings to TF32: truncation, what Triton's TF32 dot does with fp32
operands (the low 13 mantissa bits dropped), and round-to-nearest, what cuDNN does. The relative error
||y - ref|| / ||ref|| of the output against the plain float64 model says how many TF32 layers a model can
take within a bound such as "2x eager's error or 1e-3" before a GPU run.

With --stored, a TF32 layer's input is rounded in place, so every later reader of that activation (a
residual branch too) sees the rounded value: what a compiled graph does when it rounds operands where they
are made (conv_backend/tf32.py) rather than inside the convolution.

  python bench/probe_tf32_error.py --models mobilenet_v2,resnet18 --batch 8 --thresholds 0,49,150,inf
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conv_backend import runtime  # noqa: E402

TF32_DROPPED_BITS = 13  # fp32 has 23 mantissa bits, TF32 10


def to_tf32(t: torch.Tensor, rounding: str) -> torch.Tensor:
    """t (any float dtype) as fp32 with TF32's 10 mantissa bits, returned as float64."""
    bits = t.float().view(torch.int32)
    if rounding == "nearest":  # half an ulp of TF32, then truncate: ties away from zero, as cvt.rna does
        bits = bits + (1 << (TF32_DROPPED_BITS - 1))
    return (bits & ~((1 << TF32_DROPPED_BITS) - 1)).view(torch.float32).double()


class EmulatedConv(nn.Module):
    """A float64 convolution whose operands are rounded to TF32 where the rule picks TF32."""

    def __init__(self, conv: nn.Conv2d, setting: dict):
        super().__init__()
        self.conv, self.setting = conv, setting

    def forward(self, x):
        c = self.conv
        intensity = runtime.conv_flop_per_byte(tuple(x.shape), tuple(c.weight.shape), c.stride, c.padding, c.dilation)
        weight = c.weight
        if intensity > self.setting["threshold"]:
            self.setting["tf32_layers"] += 1
            if self.setting.get("stored"):
                x.copy_(to_tf32(x, self.setting["rounding"]))  # the activation as its maker stores it
            x, weight = to_tf32(x, self.setting["rounding"]), to_tf32(weight, self.setting["rounding"])
        self.setting["layers"] += 1
        return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def emulate(model: nn.Module, setting: dict) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(model, name, EmulatedConv(child, setting))
        else:
            emulate(child, setting)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18", help="comma-separated torchvision names")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--thresholds", default=f"0,{runtime.TF32_MIN_FLOP_PER_BYTE:.0f},inf",
                    help="FLOP per byte above which a layer takes TF32 (0: every layer; inf: none)")
    ap.add_argument("--stored", action="store_true",
                    help="round each TF32 layer's input in place, for every later reader (see above)")
    args = ap.parse_args()
    import torchvision

    print(f"rule's threshold: {runtime.TF32_MIN_FLOP_PER_BYTE:.1f} FLOP/byte; input {args.batch}x3x{args.size}x"
          f"{args.size}; error of the output against float64")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval().double()
        x = torch.randn(args.batch, 3, args.size, args.size, dtype=torch.float64)
        with torch.no_grad():
            ref = model(x)
            fp32_err = ((model.float()(x.float()).double() - ref).norm() / ref.norm()).item()
            model.double()
            print(f"{name}: exact fp32 {fp32_err:.2e}", flush=True)
            for threshold in (float(t) for t in args.thresholds.split(",")):
                errs = {}
                for rounding in ("truncate", "nearest"):
                    setting = {"threshold": threshold, "rounding": rounding, "tf32_layers": 0, "layers": 0,
                                "stored": args.stored}
                    y = emulate(copy.deepcopy(model), setting)(x.clone())
                    errs[rounding] = ((y - ref).norm() / ref.norm()).item()
                print(f"  threshold {threshold:g}: TF32 in {setting['tf32_layers']} of {setting['layers']} layers, "
                      f"error {errs['truncate']:.2e} (Triton's truncation), {errs['nearest']:.2e} "
                      f"(round to nearest)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
