"""Host-side cost of a convolution launch, piece by piece (GPU only).

Usage: python bench/probe_host.py [problem ...]   (problems as in probe_tiles.py; default rn50-3x3-256)
For each problem, forces the tuner's first TMA, warp-specialized (Hopper) and pointer candidates and prints the host microseconds
per call (median over single calls, GPU synchronised between them) of every layer of a launch:
launch_conv2d, the plan, the kernel launch with its arguments ready, and the pieces the plan adds
(output allocation, the channels_last check, the input descriptor), next to F.conv2d.
Then a cProfile of launch_conv2d on the TMA and warp-specialized plans. do_bench counts the host time of a launch where the
host cannot queue the next launch while the GPU clears L2.
"""
import cProfile
import pstats
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_tiles import PROBLEMS, host_laps_us  # noqa: E402

from conv_backend import tuning  # noqa: E402
from conv_backend.dispatch import launch_conv2d  # noqa: E402
from conv_backend.layout import conv_output_hw  # noqa: E402
from conv_backend.kernels import common, implicit_gemm as ig, warp_specialized as ws  # noqa: E402


def host_us(fn, calls=300):
    laps = host_laps_us(fn, calls)
    return f"p50 {laps[calls // 2]:6.1f} p90 {laps[calls * 9 // 10]:6.1f}"


def forced(cand, make_plan):
    common.select = lambda key, sig, dev, cs, prep: cand
    try:
        return make_plan()
    finally:
        common.select = tuning.select


def main(names):
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    print("launch hooks set:", common._launch_hooks_set())
    for name in names:
        n, c, oc, h, w, kh, kw, s, p, d, g, dt = PROBLEMS[name]
        x = torch.randn(n, c, h, w, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
        wt = (torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt) / (c * kh * kw) ** 0.5).to(
            memory_format=torch.channels_last)
        prec = "tf32" if dt == torch.float32 else "ieee"
        print(f"== {name}: F.conv2d {host_us(lambda: F.conv2d(x, wt, None, s, p, d, g))}")
        out_h, out_w = conv_output_hw(h, w, kh, kw, s, p, d)
        for family in ("tma", "ws", "pointer"):
            if family == "ws":
                cands = ws.ws_candidates(c, oc, n, out_h, out_w, dt, sms=1)
            elif family == "tma":
                cands = ig.tma_candidates(c // g, oc // g, h, w, n, g, dt, strided=s != (1, 1))
            else:
                cands = ig.pointer_candidates(c // g, oc // g, dt)
            cand = cands[0]
            path = "pointer" if family == "pointer" else "tma"
            plan = forced(cand, lambda: ig.implicit_gemm_plan(x, wt, None, s, p, d, g, prec, path))
            y = plan(x, wt, None)
            launch = ig._launcher(cand, x, wt, None, y, s, p, d, g, prec)
            launch(x, wt, None, y)
            from conv_backend import dispatch
            dispatch._plans.clear()
            forced(cand, lambda: launch_conv2d(x, wt, None, s, p, d, g, prec, f"gemm_{path}"))
            print(f"  {family} {cand.describe()}")
            print(f"    launch_conv2d        {host_us(lambda: launch_conv2d(x, wt, None, s, p, d, g, prec, f'gemm_{path}'))}")
            print(f"    plan                 {host_us(lambda: plan(x, wt, None))}")
            print(f"    launch (y given)     {host_us(lambda: launch(x, wt, None, y))}")
            print(f"    empty_strided        {host_us(lambda: torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device))}")
            print(f"    x.contiguous(cl)     {host_us(lambda: x.contiguous(memory_format=torch.channels_last))}")
            if family != "pointer":
                from triton.tools.tensor_descriptor import TensorDescriptor
                print(f"    TensorDescriptor     {host_us(lambda: TensorDescriptor(x, [n, h, 1, w, c], [h * w * c, w * c, w * c, c, 1], [1, 8, 1, 8, 64]))}")
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(500):
                    launch_conv2d(x, wt, None, s, p, d, g, prec, "gemm_tma")
                torch.cuda.synchronize()
                pr.disable()
                pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("-")] or ["rn50-3x3-256"])
