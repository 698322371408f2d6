"""Does a kernel's time move with how long the GPU has been busy? For one problem, alternates do_bench runs of
cuDNN (channels_last) and of given tritonconv configs, at several do_bench lengths, while nvidia-smi logs the SM
clock, power and temperature every 100 ms.

Usage on a GPU: python bench/probe_sustained.py [PROBLEM] [--rounds=N]   (default kb55, 4 rounds)
Prints each round's medians; the clock log goes to $OUT/clocks.csv (or /tmp/clocks.csv).
"""
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton

from conv_backend import tuning
from conv_backend.kernels import common

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_tiles import PROBLEMS, make_plan, relerr  # noqa: E402

torch.backends.cudnn.benchmark = True
torch.backends.cudnn.allow_tf32 = True
CONFIGS = {  # the tuner's picks for #55 in runs 19-21 (H100 and H200)
    "ws128": tuning.Candidate.make("igemm_ws", 4, 6, BLOCK_B=1, BLOCK_H=1, BLOCK_W=128, BLOCK_N=128, BLOCK_K=32,
                                   CONSUMERS=1, PIXELS_AS_N=False),
    "ws256n": tuning.Candidate.make("igemm_ws", 8, 4, BLOCK_B=1, BLOCK_H=8, BLOCK_W=32, BLOCK_N=128, BLOCK_K=32,
                                    CONSUMERS=1, PIXELS_AS_N=True),
    "tma128": tuning.Candidate.make("igemm_tma", 4, 3, BLOCK_B=1, BLOCK_H=1, BLOCK_W=128, BLOCK_N=128, BLOCK_K=32),
}

name = next((a for a in sys.argv[1:] if not a.startswith("-")), "kb55")
rounds = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--rounds=")), 4))
n, c, oc, h, w, kh, kw, s, p, d, g, dt = PROBLEMS[name]
x = torch.randn(n, c, h, w, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
wt = torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
ref = F.conv2d(x.double(), wt.double(), None, s, p, d, g)
fns = {"cudnn": lambda: F.conv2d(x, wt, None, s, p, d, g)}
for label, cand in CONFIGS.items():
    common.select = lambda *args, cand=cand: cand
    plan = make_plan(x, wt, s, p, d, g, "tf32")
    err = relerr(plan(x, wt, None), ref)
    assert err < 2e-3, (label, err)
    fns[label] = lambda plan=plan: plan(x, wt, None)
common.select = tuning.select
log_path = os.path.join(os.environ.get("OUT", "/tmp"), "clocks.csv")
clock_log = open(log_path, "w")
smi = subprocess.Popen(["nvidia-smi", "--format=csv", "-lms", "100",
                        "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"],
                       stdout=clock_log, stderr=subprocess.DEVNULL)
try:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, name, flush=True)
    for r in range(rounds):
        for rep in (25, 50, 200):
            row = {label: triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
                   for label, fn in fns.items()}
            print(f"round {r} rep {rep:3d} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                  + f"; x cuDNN (ws128) {row['cudnn'] / row['ws128']:.2f}", flush=True)
    time.sleep(0.3)
finally:
    smi.terminate()
    smi.wait()
    clock_log.close()
