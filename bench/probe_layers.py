#!/usr/bin/env python3
"""A model's convolutions one by one: cuDNN against tritonconv at each fp32 math, and what that adds up to.

Usage on a GPU: python bench/probe_layers.py [--models resnet50,resnet18] [--batch 32]
                [--precisions tf32,tf32_round,tf32x3] [--dtype fp32] [--out DIR]

The model (torchvision, random weights) runs once on the meta device to collect its distinct convolutions and
how often each occurs. Per distinct convolution: random channels_last input (the graph pass keeps activations
channels_last between our convolutions), F.conv2d through cuDNN (cudnn.benchmark, TF32 allowed as eager allows
it by default) and conv_backend.dispatch.launch_conv2d at each `--precisions` value, every output checked
against a float64 convolution (relative error) before it is timed; then two more interleaved rounds (do_bench
medians, best of three). The totals weight each layer by its count: the model's convolution time per variant,
the part of a whole-model gap that the convolutions explain. Writes <out>/<date>-<gpu>-layers-<model>.json/.md.
On CPU (--smoke --size 32 --batch 1, through TRITON_INTERPRET=1) it checks the plumbing only.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

ROUNDS = 3


def distinct_convolutions(model_name: str, batch: int, size: int):
    """[(spec, count)] of the model's convolutions, spec = (x_shape, w_shape, stride, padding, dilation, groups)."""
    import torch
    import torch.nn as nn
    import torchvision
    with torch.device("meta"):
        model = getattr(torchvision.models, model_name)(weights=None).eval()
    counts = collections.Counter()

    def record(module, args):
        x = args[0]
        counts[(tuple(x.shape), tuple(module.weight.shape), tuple(module.stride), tuple(module.padding),
                tuple(module.dilation), module.groups)] += 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.empty(batch, 3, size, size, device="meta"))
    return list(counts.items())


def describe(spec) -> str:
    x, w, stride, padding, dilation, groups = spec
    text = f"{x[0]}x{x[1]}x{x[2]}x{x[3]}->{w[0]} k{w[2]}x{w[3]}"
    text += "" if stride == (1, 1) else f" s{stride[0]}"
    text += "" if groups == 1 else f" g{groups}"
    return text


def probe_model(model_name: str, args, timer, device: str) -> dict:
    import torch
    import torch.nn.functional as F
    from conv_backend import tuning
    from conv_backend.dispatch import launch_conv2d
    from conv_backend.runtime import choose_fp32_precision
    dtype = bu.torch_dtype(args.dtype)
    rows = []
    for spec, count in distinct_convolutions(model_name, args.batch, args.size):
        x_shape, w_shape, stride, padding, dilation, groups = spec
        gen = torch.Generator(device=device).manual_seed(len(rows))
        x = torch.randn(x_shape, device=device, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        w = bu.conv_weight(w_shape[0], w_shape[1], w_shape[2], w_shape[3], dtype, device)
        ref = bu.reference_conv(x, w, None, stride, padding, dilation, groups)
        ref_norm = bu.vector_norm(ref)
        variants = {"cudnn": lambda: F.conv2d(x, w, None, stride, padding, dilation, groups)}
        for p in args.precisions:
            variants[p] = (lambda p=p: launch_conv2d(x, w, None, stride, padding, dilation, groups, p))
        row = {"layer": describe(spec), "count": count, "spec": [list(v) if isinstance(v, tuple) else v for v in spec],
               "auto_picks": choose_fp32_precision("auto", x_shape, w_shape, stride, padding, dilation, groups, dtype,
                                                   x.device),
               "ms": {}, "rel_err": {}, "kernel": {}}
        for name, fn in variants.items():
            out = fn()
            bu.synchronize(device)
            row["rel_err"][name] = bu.rel_err(out, ref, ref_norm)
            del out
            if name != "cudnn":
                row["kernel"][name] = [str(k) for k in tuning.chosen_kernels(x_shape, w_shape, stride, padding,
                                                                             dilation, groups, dtype)][-1:]
        for _ in range(args.rounds):  # interleaved: every variant once per round, best median kept
            for name, fn in variants.items():
                ms = timer(fn)
                row["ms"][name] = min(ms, row["ms"].get(name, ms))
        del x, w, ref
        rows.append(row)
        print(f"{model_name} {row['layer']:<34} x{count:<2} auto={row['auto_picks']:<10} "
              + "  ".join(f"{n} {row['ms'][n]:.4f} ms ({row['rel_err'][n]:.1e})" for n in variants)
              + "  " + "; ".join(f"{n}: {' '.join(k)}" for n, k in row["kernel"].items()), flush=True)
    names = ["cudnn", *args.precisions]
    totals = {n: sum(r["ms"][n] * r["count"] for r in rows) for n in names}
    auto_total = sum(r["ms"].get(r["auto_picks"], float("nan")) * r["count"] for r in rows)
    return {"model": model_name, "batch": args.batch, "size": args.size, "dtype": args.dtype, "rows": rows,
            "total_ms": totals, "auto_total_ms": auto_total}


def markdown(info: dict, results: list) -> str:
    lines = [f"# Per-layer probe: {info.get('gpu', 'cpu')}, {datetime.date.today()}", "",
             f"- torch {info.get('torch')}, triton {info.get('triton')}; cuDNN TF32 allowed (eager's default); "
             "channels_last inputs; do_bench medians, best of the interleaved rounds", ""]
    for res in results:
        names = list(res["total_ms"])
        lines += [f"## {res['model']} {res['dtype']} batch {res['batch']} at {res['size']}x{res['size']}", "",
                  "| layer | count | auto picks | " + " | ".join(f"{n} ms" for n in names) + " | kernels |",
                  "|---|---|---|" + "---|" * len(names) + "---|"]
        for r in res["rows"]:
            kernels = "; ".join(f"{n}: {' '.join(k)}" for n, k in r["kernel"].items())
            lines.append(f"| {r['layer']} | {r['count']} | {r['auto_picks']} | "
                         + " | ".join(f"{r['ms'][n]:.4f} ({r['rel_err'][n]:.0e})" for n in names)
                         + f" | {kernels} |")
        lines += ["", "Totals (each layer times its count): "
                  + ", ".join(f"{n} {v:.3f} ms" for n, v in res["total_ms"].items())
                  + f", the auto rule's picks {res['auto_total_ms']:.3f} ms", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--models", default="resnet50,resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--precisions", default="tf32,tf32_round,tf32x3", type=lambda s: s.split(","))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU through TRITON_INTERPRET=1 (use a small --size)")
    args = ap.parse_args()
    device = bu.init_runtime(smoke=args.smoke)
    bu.set_fp32_precision(ieee=False)
    timer = bu.make_timer(device, 100.0, 50.0)
    info = bu.versions(device)
    results = [probe_model(m, args, timer, device) for m in args.models.split(",")]
    for res in results:
        print(f"{res['model']}: totals " + ", ".join(f"{n} {v:.3f} ms" for n, v in res["total_ms"].items())
              + f", auto {res['auto_total_ms']:.3f} ms")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = bu.result_stem(info, smoke=device != "cuda", suffix="-layers-" + "-".join(args.models.split(",")))
        (args.out / f"{stem}.json").write_text(json.dumps({**info, "results": results}, indent=1))
        (args.out / f"{stem}.md").write_text(markdown(info, results))


if __name__ == "__main__":
    main()
