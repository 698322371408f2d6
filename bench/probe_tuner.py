"""Does the tuner's clock agree with the benchmark's? Per candidate: do_bench (L2 flushed before each
call, as bench/conv_bench.py times) against CUDA-graph replays (L2 warm, what the tuner ranks by).

Usage on a GPU: python bench/probe_tuner.py > log
"""
import math

import torch
import triton

from conv_backend.kernels import common
from conv_backend.kernels import implicit_gemm as ig

PROBLEMS = [  # (name, n, c, oc, h, w, k, stride, pad, channels_last)
    ("rn50-1x1-64-256 NCHW", 32, 64, 256, 56, 56, 1, 1, 0, False),
    ("rn50-3x3-512 CL", 32, 512, 512, 7, 7, 3, 1, 1, True),
]


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for name, n, c, oc, h, w, k, s, p, cl in PROBLEMS:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
        wt = torch.randn(oc, c, k, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(c * k * k)
        if cl:
            x, wt = x.to(memory_format=torch.channels_last), wt.to(memory_format=torch.channels_last)
        ref = torch.nn.functional.conv2d(x, wt, None, s, p)
        cudnn = triton.testing.do_bench(lambda: torch.nn.functional.conv2d(x, wt, None, s, p), return_mode="median")
        print(f"== {name}: cuDNN do_bench {cudnn:.4f} ms", flush=True)
        captured = []
        real_select = common.select
        common.select = lambda key, sig, dev, cands, run: captured.extend(cands) or cands[0]
        ig.implicit_gemm_plan(x, wt, None, (s, s), (p, p), (1, 1), 1, "ieee", "auto")
        for cand in list(captured):
            common.select = lambda key, sig, dev, cands, run, cand=cand: cand
            plan = ig.implicit_gemm_plan(x, wt, None, (s, s), (p, p), (1, 1), 1, "ieee", "auto")
            err = float((plan(x, wt, None).float() - ref.float()).norm() / ref.float().norm())
            t = triton.testing.do_bench(lambda: plan(x, wt, None), return_mode="median")
            g = triton.testing.do_bench_cudagraph(lambda: plan(x, wt, None), return_mode="median")
            print(f"  {cand.describe():75s} do_bench {t:.4f}  graph {g:.4f}  err {err:.1e}", flush=True)
        common.select = real_select


if __name__ == "__main__":
    main()
