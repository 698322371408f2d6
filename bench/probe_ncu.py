"""One launch of one kernel config, for Nsight Compute: `ncu [sections] python bench/probe_ncu.py CASE`.

CASE: dw82 (kb82 depthwise, channels_last, the tuner's pick in run 10) or rn50-512 (ResNet-50's 3x3 512 at 7x7,
bf16 channels_last, the TMA tile with split-K 2 that the tuner picks). The plan is built with the tuner bypassed,
so the profiled launches are this config's alone: a warm-up launch, then the one to profile (ncu -s 1 -c 1).
"""
import sys

import torch

from conv_backend import tuning
from conv_backend.kernels import common, depthwise, implicit_gemm

CASES = {
    "dw82": ((16, 64, 512, 512), (64, 1, 3, 3), 64, torch.float32,
             tuning.Candidate.make("depthwise", 8, 1, BLOCK_H=16, BLOCK_W=8, BLOCK_C=32)),
    "rn50-512": ((32, 512, 7, 7), (512, 512, 3, 3), 1, torch.bfloat16,
                 tuning.Candidate.make("igemm_tma", 4, 4, BLOCK_B=1, BLOCK_H=8, BLOCK_W=8, BLOCK_N=128, BLOCK_K=64,
                                       SPLIT_K=2)),
}

x_shape, w_shape, groups, dtype, cand = CASES[sys.argv[1]]
x = torch.randn(x_shape, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
w = torch.randn(w_shape, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
common.select = lambda *args: cand
pad = (1, 1) if groups == 1 else (0, 0)
if groups > 1:
    plan = depthwise.depthwise_plan(x, w, None, (1, 1), pad, (1, 1))
else:
    plan = implicit_gemm.implicit_gemm_plan(x, w, None, (1, 1), pad, (1, 1), 1, "ieee")
for _ in range(2):
    plan(x, w, None)
torch.cuda.synchronize()
print("ran", cand.describe())
