"""One call of one convolution, for Nsight Compute:
`ncu --profile-from-start off [sections] python bench/probe_ncu.py CASE`.

CASE names a problem and what runs it, the tuner bypassed so that the profiled kernels are that config's alone:
  dw82       kb82 depthwise, channels_last, the tuner's pick in run 10;
  rn50-512   ResNet-50's 3x3 512 at 7x7, bf16 channels_last, the TMA tile with split-K 2;
  kb55-tma   kb55 fp32 (TF32), channels_last, the TMA kernel's 128x128 one-warpgroup tile (run 18's NCHW pick);
  kb55-ws    kb55, the warp-specialized kernel's 128x128 tile (run 18's channels_last pick);
  kb55-ws256 kb55, the warp-specialized kernel with a 256x128 tile shared by two consumer warpgroups;
  kb55-wshalo   kb55, its patch variant: a 16x16 tile by 128 channels (runs 23 and 24's pick);
  kb55-wshalo-n kb55, the patch variant with 8x32 pixels as the MMA's N (probe 51's fastest);
  kb55-cudnn kb55 through F.conv2d (cuDNN, channels_last).
Two warm-up calls run first; only the third is inside the profiler range.
"""
import sys

import torch
import torch.nn.functional as F

from conv_backend import tuning
from conv_backend.kernels import common

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_tiles import make_plan  # noqa: E402

Candidate = tuning.Candidate
KB55 = ((8, 64, 512, 1024), (128, 64, 3, 3), 1, (0, 0), torch.float32)
CASES = {  # name: ((x shape, weight shape, groups, padding, dtype), candidate or None for cuDNN)
    "dw82": (((16, 64, 512, 512), (64, 1, 3, 3), 64, (0, 0), torch.float32),
             Candidate.make("depthwise", 8, 1, BLOCK_H=16, BLOCK_W=8, BLOCK_C=32)),
    "rn50-512": (((32, 512, 7, 7), (512, 512, 3, 3), 1, (1, 1), torch.bfloat16),
                 Candidate.make("igemm_tma", 4, 4, BLOCK_B=1, BLOCK_H=8, BLOCK_W=8, BLOCK_N=128, BLOCK_K=64,
                                SPLIT_K=2)),
    "kb55-tma": (KB55, Candidate.make("igemm_tma", 4, 3, BLOCK_B=1, BLOCK_H=1, BLOCK_W=128, BLOCK_N=128,
                                      BLOCK_K=32)),
    "kb55-ws": (KB55, Candidate.make("igemm_ws", 4, 6, BLOCK_B=1, BLOCK_H=1, BLOCK_W=128, BLOCK_N=128, BLOCK_K=32,
                                     CONSUMERS=1, PIXELS_AS_N=False)),
    "kb55-ws256": (KB55, Candidate.make("igemm_ws", 8, 4, BLOCK_B=1, BLOCK_H=1, BLOCK_W=256, BLOCK_N=128,
                                        BLOCK_K=32, CONSUMERS=1, PIXELS_AS_N=False)),
    "kb55-wshalo": (KB55, Candidate.make("igemm_ws_halo", 8, 3, BLOCK_B=1, BLOCK_H=16, BLOCK_W=16, BLOCK_N=128,
                                         BLOCK_K=16, CONSUMERS=1, PIXELS_AS_N=False)),
    "kb55-wshalo-n": (KB55, Candidate.make("igemm_ws_halo", 8, 3, BLOCK_B=1, BLOCK_H=8, BLOCK_W=32, BLOCK_N=128,
                                           BLOCK_K=16, CONSUMERS=1, PIXELS_AS_N=True)),
    "kb55-cudnn": (KB55, None),
}

(x_shape, w_shape, groups, pad, dtype), cand = CASES[sys.argv[1]]
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True
x = torch.randn(x_shape, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
w = torch.randn(w_shape, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
if cand is None:
    plan = lambda x, w, b: F.conv2d(x, w, b, 1, pad, 1, groups)  # noqa: E731
else:
    common.select = lambda *args: cand
    plan = make_plan(x, w, (1, 1), pad, (1, 1), groups, "tf32" if dtype == torch.float32 else "ieee")
for _ in range(2):
    plan(x, w, None)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
plan(x, w, None)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("ran", "cuDNN" if cand is None else cand.describe())
