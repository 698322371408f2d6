"""Host-side cost of convolution launches, per kernel family (GPU only).

Usage: python bench/probe_host.py
For ResNet-50's 3x3 512 at 7x7 (bf16, channels_last), forces one candidate of each family (TMA and
pointer, with and without split-K) and prints: do_bench median (L2 flushed before each call), CUDA-graph
replay (GPU time alone), host microseconds per call (percentiles over single calls), and a cProfile of
the slowest family. do_bench reads more than the graph replay when the host cannot queue the next launch
while the GPU clears L2.
"""
import cProfile
import pstats
import statistics
import time

import torch
import triton

from conv_backend import tuning
from conv_backend.kernels import common, implicit_gemm as ig

CANDIDATES = [
    tuning.Candidate.make("igemm_tma", 4, 3, BLOCK_B=1, BLOCK_H=8, BLOCK_W=8, BLOCK_N=128, BLOCK_K=64),
    tuning.Candidate.make("igemm_tma", 4, 3, BLOCK_B=1, BLOCK_H=8, BLOCK_W=8, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2),
    tuning.Candidate.make("igemm_pointer", 4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    tuning.Candidate.make("igemm_pointer", 4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_K=2),
]


def per_call_us(fn, calls=300):
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.9)], samples[-1], statistics.mean(samples)


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    x = torch.randn(32, 512, 7, 7, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = (torch.randn(512, 512, 3, 3, device="cuda", dtype=torch.bfloat16) / 68).to(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
    args = ((1, 1), (1, 1), (1, 1), 1, "ieee")
    plans = {}
    for cand in CANDIDATES:
        common.select = lambda key, sig, dev, cs, prep, cand=cand: cand
        plan = plans[cand.describe()] = ig.implicit_gemm_plan(x, w, None, *args)
        common.select = tuning.select
        err = float((plan(x, w, None).double() - ref).norm() / ref.norm())
        fn = lambda: plan(x, w, None)
        t = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        tg = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
        p50, p90, worst, mean = per_call_us(fn)
        print(f"{cand.describe():90s} do_bench {t:.4f} ms, graph {tg:.4f} ms; host us/call p50 {p50:.0f} "
              f"p90 {p90:.0f} max {worst:.0f} mean {mean:.0f}; err {err:.1e}", flush=True)
    # do_bench again, after every plan exists (state shared between plans shows here)
    for name, plan in plans.items():
        t = triton.testing.do_bench(lambda: plan(x, w, None), warmup=10, rep=40, return_mode="median")
        print(f"again {name:84s} do_bench {t:.4f} ms", flush=True)
    name = CANDIDATES[1].describe()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        plans[name](x, w, None)
    torch.cuda.synchronize()
    pr.disable()
    print("cProfile,", name)
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
