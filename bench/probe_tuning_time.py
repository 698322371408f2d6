"""Cold tuning time: how long the first call of each problem takes, compiling its candidates one at a time
or ahead in a thread pool (tuning._compile_ahead), and whether both settings pick kernels of equal speed.

Usage on a GPU: python bench/probe_tuning_time.py [problem ...] [--threads=1,8,16]
(problems as in probe_tiles.py; default: ResNet-50's 3x3 layers and 1x1). Each setting runs in a fresh
process with empty Triton and tritonconv caches, so every candidate is compiled from scratch. Prints per
problem the seconds of the first launch_conv2d call (tuning included), the kernel chosen, and its
do_bench time.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import torch, triton
sys.path.insert(0, "bench")
from probe_tiles import PROBLEMS
from conv_backend import tuning
from conv_backend.dispatch import launch_conv2d
rows = []
for name in sys.argv[1:]:
    n, c, oc, h, w, kh, kw, s, p, d, g, dt = PROBLEMS[name]
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    wt = torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    prec = "tf32" if dt == torch.float32 else "ieee"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    launch_conv2d(x, wt, None, s, p, d, g, prec, "auto")
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = triton.testing.do_bench(lambda: launch_conv2d(x, wt, None, s, p, d, g, prec, "auto"), warmup=10, rep=50)
    rows.append([name, first, ms, tuning.chosen_kernels(x.shape, wt.shape, s, p, d, g, dt)])
print(json.dumps(rows))
"""

DEFAULT = ["rn50-3x3-64", "rn50-1x1-64-256", "rn50-3x3s2-128", "rn50-3x3-256", "rn50-3x3-512"]


def main(args):
    problems = [a for a in args if not a.startswith("--")] or DEFAULT
    threads = next((a.split("=", 1)[1] for a in args if a.startswith("--threads=")), "1,16").split(",")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for setting in threads:
        with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as tuning_cache:
            env = dict(os.environ, TRITON_CACHE_DIR=triton_cache, XDG_CACHE_HOME=tuning_cache,
                       TRITONCONV_COMPILE_THREADS=setting, PYTHONPATH=root)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, *problems], env=env, cwd=root, capture_output=True,
                                 text=True)
            total = time.perf_counter() - t0
        if out.returncode:
            print(f"threads={setting}: failed\n{out.stderr[-3000:]}", flush=True)
            continue
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"== compile threads {setting}: process {total:.1f} s, first calls "
              f"{sum(r[1] for r in rows):.1f} s", flush=True)
        for name, first, ms, chosen in rows:
            print(f"  {name:18s} first call {first:6.1f} s  then {ms:.4f} ms  {', '.join(chosen)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
