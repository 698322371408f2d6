"""Where do_bench's extra time goes for a small convolution (GPU only).

Usage: python bench/probe_gap.py [problem]   (a problem of probe_tiles.py; default rn50-3x3s2-128)
Times launch_conv2d and its plan with do_bench (each three times, alternating), then records a
do_bench-like loop (clear L2, launch) under torch.profiler with CPU and CUDA activity and prints, per
iteration: how long the GPU sat idle between the L2 clearing and our kernel, and how late the host
issued the launch relative to the end of the clearing. A late host means do_bench counts host time.
"""
import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_tiles import PROBLEMS  # noqa: E402

from conv_backend import dispatch  # noqa: E402
from conv_backend.dispatch import launch_conv2d  # noqa: E402


def main(name):
    n, c, oc, h, w, kh, kw, s, p, d, g, dt = PROBLEMS[name]
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    wt = (torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt) / (c * kh * kw) ** 0.5).to(
        memory_format=torch.channels_last)
    prec = "tf32" if dt == torch.float32 else "ieee"
    call = lambda: launch_conv2d(x, wt, None, s, p, d, g, prec)  # noqa: E731
    call()
    plan = list(dispatch._plans.values())[-1]
    direct = lambda: plan(x, wt, None)  # noqa: E731
    for _ in range(3):
        t1 = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")
        t2 = triton.testing.do_bench(direct, warmup=10, rep=50, return_mode="median")
        print(f"{name}: do_bench launch_conv2d {t1:.4f} ms, plan {t2:.4f} ms", flush=True)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for label, fn in (("launch_conv2d", call), ("plan", direct)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(30):
                cache.zero_()
                fn()
            torch.cuda.synchronize()
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
                    and e.name in ("cuLaunchKernel", "cudaLaunchKernel", "cuLaunchKernelEx")]
        idle, late = [], []
        for i in range(1, len(gpu)):
            if "FillFunctor" in gpu[i - 1].name and "FillFunctor" not in gpu[i].name:
                idle.append(gpu[i].time_range.start - gpu[i - 1].time_range.end)
                issued = [e.time_range.start for e in launches if e.time_range.start <= gpu[i].time_range.start]
                if issued:
                    late.append(issued[-1] - gpu[i - 1].time_range.end)
        idle.sort()
        late.sort()
        print(f"  {label}: GPU idle between clearing and kernel (us) p50 {idle[len(idle) // 2]:.1f} "
              f"max {idle[-1]:.1f}; host launch minus clearing end (us) p50 {late[len(late) // 2]:.1f} "
              f"(negative: the launch was queued before the clearing ended)", flush=True)
        names = {}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU:
                names.setdefault(e.name, []).append(e.cpu_time_total)
        top = sorted(((sum(v) / 30, k) for k, v in names.items()), reverse=True)[:8]
        print("   host time per iteration (us):", "; ".join(f"{k[:40]} {t:.1f}" for t, k in top), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rn50-3x3s2-128")
