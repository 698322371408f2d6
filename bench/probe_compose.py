"""Host cost and speed of the backend composed with Inductor, on a stack of identical conv blocks (GPU only).

Usage: python bench/probe_compose.py [--blocks 16] [--channels 64] [--size 56] [--batch 32 1] [--dtype bfloat16]
       [--options '{"autotune": "fast"}']

One convolution shape, so the tuner has one problem to choose for. For each batch size, every variant is
compiled first, then all are timed in interleaved rounds (do_bench medians, best of three rounds):
eager, torch.compile default, tritonconv with inner="inductor" (its default, CUDA graphs on), the same kernel by
kernel (options cudagraphs=False) and inner="aten", and with --cudagraphs the mode="reduce-overhead" variants
of both compilers. Host microseconds per forward are measured separately:
the time to enqueue one forward with the GPU idle, divided by the blocks, next to the GPU time of one forward
(CUDA-graph replay of the eager model).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

import conv_backend

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_tiles import host_laps_us  # noqa: E402


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def make_model(blocks: int, channels: int, dtype: torch.dtype) -> nn.Module:
    model = nn.Sequential(*[Block(channels) for _ in range(blocks)])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.0)
    return model.eval().cuda().to(dtype).to(memory_format=torch.channels_last)


def host_us(fn, calls: int = 50) -> float:
    """Median microseconds to enqueue one call with the GPU idle."""
    return statistics.median(host_laps_us(fn, calls))


def graph_replay_ms(fn) -> float:
    """GPU milliseconds of one call, from a CUDA graph of it (no host cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=100, rep=300, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--cudagraphs", action="store_true")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants to run")
    parser.add_argument("--profile", action="store_true", help="cProfile 100 calls of each tritonconv variant")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    extra = json.loads(args.options)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}; "
          f"{args.blocks} blocks of 2 convs, {args.channels} channels, {args.size}x{args.size}, {args.dtype}, "
          f"options {extra}", flush=True)
    model = make_model(args.blocks, args.channels, dtype)
    convs = 2 * args.blocks
    variants = {
        "eager": lambda: model,
        "compile": lambda: torch.compile(model),
        "tritonconv": lambda: torch.compile(model, backend="tritonconv", options=extra),
        # kernel by kernel, as torch.compile's default runs: the host cost of our launches shows here
        "tritonconv-nocg": lambda: torch.compile(model, backend="tritonconv", options={**extra, "cudagraphs": False}),
        "tritonconv-aten": lambda: torch.compile(model, backend="tritonconv", options={**extra, "inner": "aten"}),
    }
    if args.cudagraphs:
        variants["compile-ro"] = lambda: torch.compile(model, mode="reduce-overhead")
        # torch.compile takes a mode or options, not both: the options spell out reduce-overhead's setting.
        variants["tritonconv-ro"] = lambda: torch.compile(model, backend="tritonconv",
                                                          options={**extra, "triton.cudagraphs": True})
    if args.variants:
        variants = {name: build for name, build in variants.items()
                    if name in ("eager", "compile") or name in args.variants.split(",")}
    for batch in args.batch:
        torch._dynamo.reset()
        x = torch.randn(batch, args.channels, args.size, args.size, device="cuda", dtype=dtype).to(
            memory_format=torch.channels_last)
        with torch.no_grad():
            fns, first = {}, {}
            for name, build in variants.items():
                start = time.perf_counter()
                compiled = build()
                for _ in range(3 if name.endswith("-ro") else 1):  # CUDA graphs record on the third call
                    out = compiled(x)
                torch.cuda.synchronize()
                first[name] = time.perf_counter() - start
                fns[name] = (compiled, out.clone())  # CUDA-graph outputs are overwritten by the next replay
            base = fns["eager"][1].float()
            for name, (_, out) in fns.items():
                err = ((out.float() - base).norm() / base.norm()).item()
                print(f"  batch {batch} {name}: first call {first[name]:.1f} s, rel. diff to eager {err:.2e}",
                      flush=True)
            report = conv_backend.last_report()
            best = {name: float("inf") for name in fns}
            for _ in range(3):
                for name, (compiled, _) in fns.items():
                    fn = (lambda c=compiled: c(x))
                    triton.testing.do_bench(fn, warmup=250, rep=1, return_mode="median")
                    best[name] = min(best[name], triton.testing.do_bench(fn, warmup=25, rep=200,
                                                                         return_mode="median"))
            gpu_ms = graph_replay_ms(lambda: model(x))
            for name, (compiled, _) in fns.items():
                host = host_us(lambda c=compiled: c(x)) if not name.endswith("-ro") else float("nan")
                print(f"  batch {batch} {name:16s} {best[name]:.4f} ms  ({best['compile'] / best[name]:.2f}x compile, "
                      f"{best['eager'] / best[name]:.2f}x eager); enqueue {host:.0f} us = {host / convs:.1f} us/conv",
                      flush=True)
            print(f"  batch {batch} eager GPU time (graph replay) {gpu_ms:.4f} ms", flush=True)
            for name, (compiled, _) in fns.items():
                if args.profile and name.startswith("tritonconv") and not name.endswith("-ro"):
                    profile = cProfile.Profile()
                    profile.enable()
                    for _ in range(100):
                        compiled(x)
                    profile.disable()
                    torch.cuda.synchronize()
                    print(f"  cProfile of 100 calls, {name}, batch {batch}:", flush=True)
                    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(22)
            if report is not None:
                print("  " + str(report).replace("\n", "\n  ")[:1500], flush=True)


if __name__ == "__main__":
    sys.exit(main())
