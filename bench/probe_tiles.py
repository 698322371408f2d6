"""Tile sweep: time every kernel candidate the tuner would consider, one by one, against cuDNN (same run).

Usage on a GPU: python bench/probe_tiles.py [problem ...] [--variants] [--only=KERNEL[,KERNEL]] [--match=S[|S]]
                                            [--tuner | --tuner-only] [--cudnn-kernels] [--nchw] [--regcap]
  --variants  also time variants outside the tuner's set: TMA tiles with 1, 2, 4, 5, 6 and 8 pipeline
              stages (where they fit in 200 KiB of shared memory) and with 4 warps (tiles up to 128x128),
              halo tiles with 2 or 3 stages and 4 or 8 warps, and pointer tiles with 1 stage (plain loads,
              which go through L1, instead of cp.async.cg), NCHW tiles with 1, 2 or 4 stages and 256-row
              or 256-column tiles or capped at 80 or 96 registers a thread, depthwise tiles capped at 64,
              80 or 96 registers a thread, and warp-specialized tiles with two consumers taking turns or 256
              pixels for two consumer warpgroups (pixels as the MMA's M or N), tiles the tuner splits between
              two consumers (SPLIT_TILE) run by one, and patch-variant tiles with one stage more than the tuner
              allows or with a full 128-byte channel chunk.
  --only      time only the candidates of these kernels (e.g. --only=igemm_halo).
  --match     time only the candidates (and variants) whose description contains one of these
              '|'-separated strings (e.g. --match="BLOCK_N=128,BLOCK_W=8|BLOCK_W=256").
  --tuner     then run the real tuner (launch_conv2d, empty cache) and time its plan three ways:
              do_bench of launch_conv2d (three times), do_bench of the plan, CUDA-graph replay of the plan.
  --tuner-only  the --tuner check alone.
  --cudnn-kernels  name the kernels cuDNN runs for each layout (torch.profiler), with their GPU times.
  --nchw      our candidates take NCHW input and weight (default: channels_last), as a model in NCHW passes them.
  --regcap    also time every candidate capped at 96, 128 or 168 registers a thread (maxnreg).
The --tuner check also gives the profiler's GPU time of each kernel the plan launches (L2 cleared
before each call, as do_bench does) and the host time of one launch_conv2d call, to tell a slow
kernel from a slow launch.
Prints, per candidate, fastest first: GPU time (torch.profiler, L2 cleared before each call) and its ratio
to cuDNN's best GPU time, do_bench median, CUDA-graph replay time (warm L2), TFLOP/s, and the relative
error against a float64 reference. GPU times rank kernels even where a slow host makes do_bench count
the launch. Logs of runs:
bench/results/probes/.
"""
import ast
import logging
import math
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton

os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp())  # the --tuner check starts from an empty cache
from conv_backend import tuning  # noqa: E402
from conv_backend.dispatch import launch_conv2d  # noqa: E402
from conv_backend.kernels import common, depthwise as dw, implicit_gemm as ig, warp_specialized as ws  # noqa: E402

torch.backends.cudnn.benchmark = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cuda.matmul.allow_tf32 = True
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.backends.cudnn.version(), flush=True)

PROBLEMS = {  # name: (n, c, oc, h, w, kh, kw, stride, padding, dilation, groups, dtype)
    "kb80": (8, 32, 64, 512, 512, 5, 9, (1, 1), (2, 4), (2, 3), 1, torch.float32),
    "kb80bf16": (8, 32, 64, 512, 512, 5, 9, (1, 1), (2, 4), (2, 3), 1, torch.bfloat16),
    "kb55": (8, 64, 128, 512, 1024, 3, 3, (1, 1), (0, 0), (1, 1), 1, torch.float32),
    "kb56": (8, 64, 128, 512, 256, 5, 7, (1, 1), (0, 0), (1, 1), 1, torch.float32),
    "kb62": (8, 32, 64, 512, 512, 5, 9, (1, 1), (0, 0), (1, 1), 1, torch.float32),
    "kb63": (16, 16, 128, 1024, 1024, 3, 3, (1, 1), (0, 0), (1, 1), 1, torch.float32),
    "rn50-3x3-64": (32, 64, 64, 56, 56, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16),
    "kb87": (16, 64, 128, 1024, 1024, 1, 1, (1, 1), (0, 0), (1, 1), 1, torch.float32),
    "rn50-1x1-64-256": (32, 64, 256, 56, 56, 1, 1, (1, 1), (0, 0), (1, 1), 1, torch.bfloat16),
    "rn50-3x3s2-128": (32, 128, 128, 56, 56, 3, 3, (2, 2), (1, 1), (1, 1), 1, torch.bfloat16),
    "rn50-3x3-256": (32, 256, 256, 14, 14, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16),
    "rn50-3x3-512": (32, 512, 512, 7, 7, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16),
    "kb82": (16, 64, 64, 512, 512, 3, 3, (1, 1), (0, 0), (1, 1), 64, torch.float32),
    "kb84": (64, 128, 128, 256, 512, 3, 3, (1, 1), (0, 0), (1, 1), 128, torch.float32),
}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def gbench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def kernel_times(fn, calls=40):
    """{kernel name: median GPU time in ms} over `calls` calls of fn, each after clearing L2 (torch.profiler)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and "FillFunctor" not in event.name:
            times.setdefault(event.name, []).append(event.device_time / 1000)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def host_laps_us(fn, calls=200):
    """Host time of each of `calls` calls, in microseconds, sorted (the GPU drained before each, so no call
    waits on a full launch queue)."""
    import time
    laps = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        laps.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return sorted(laps)


def host_us(fn, calls=200):
    """Median host time of one call, in microseconds."""
    return host_laps_us(fn, calls)[calls // 2]


def relerr(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def make_plan(x, w, s, p, d, g, prec):
    """The plan launch_conv2d's "auto" would make (depthwise or implicit GEMM), through common.select."""
    if g > 1 and g == x.shape[1]:
        return dw.depthwise_plan(x, w, None, s, p, d)
    return ig.implicit_gemm_plan(x, w, None, s, p, d, g, prec, "auto")


def tuner_candidates(x, w, s, p, d, g, prec):
    """The candidates the plan hands the tuner for this problem."""
    seen = []

    def capture(key, sig, dev, cands, prepare):
        seen.extend(cands)
        return cands[0]
    real = common.select
    common.select = capture
    try:
        make_plan(x, w, s, p, d, g, prec)
    finally:
        common.select = real
    return seen


def variants(cands, elem):
    extra = []
    for cand in cands:
        if cand.kernel == "igemm_tma" and cand.num_stages == 3:
            p = cand.params
            stage = (p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"] + p["BLOCK_N"]) * p["BLOCK_K"] * elem
            extra += [tuning.Candidate(cand.kernel, cand.meta, cand.num_warps, s) for s in (1, 2, 4, 5, 6, 8)
                      if s * stage <= 200 * 1024]
            if cand.num_warps == 8 and p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"] * p["BLOCK_N"] <= 128 * 128:
                extra.append(tuning.Candidate(cand.kernel, cand.meta, 4, 3))
        if cand.kernel == "igemm_ws" and cand.num_warps == 4 and cand.params["CONSUMERS"] == 1:
            # The same tile with two consumers taking turns: one's epilogue under the other's MMAs.
            extra.append(tuning.Candidate.make(cand.kernel, 4, cand.num_stages, **{**cand.params, "CONSUMERS": 2}))
        if cand.kernel == "igemm_ws" and cand.num_warps == 8 and cand.params["CONSUMERS"] == 1:
            # 256-pixel tiles shared by the two consumer warpgroups: each weight tile feeds twice the pixels.
            p = cand.params
            if p["BLOCK_B"] * p["BLOCK_H"] * p["BLOCK_W"] == 128 and p["BLOCK_N"] <= 128:
                stages = min(8, ws.SMEM_BUDGET // ((256 + p["BLOCK_N"]) * p["BLOCK_K"] * elem))
                # PIXELS_AS_N: the MMA's N is the 256 pixels (m64n256 per warpgroup), so each weight row read
                # from shared memory feeds 256 pixels, not 128.
                for box in ((1, 1, 256), (1, 2, 128), (1, 8, 32), (1, 16, 16)):
                    for pixels_as_n in (False, True):
                        extra.append(tuning.Candidate.make(cand.kernel, 8, stages, **{
                            **p, "BLOCK_B": box[0], "BLOCK_H": box[1], "BLOCK_W": box[2], "PIXELS_AS_N": pixels_as_n}))
        if cand.kernel in ("igemm_ws", "igemm_ws_halo") and cand.params.get("SPLIT_TILE"):
            # The same tile with one consumer of two warpgroups, which meet at a barrier every K step.
            extra.append(tuning.Candidate.make(cand.kernel, cand.num_warps, cand.num_stages,
                                               **{**cand.params, "SPLIT_TILE": False}))
        if cand.kernel == "igemm_ws_halo":
            # One stage more than the tuner's 220 KiB budget allows (up to the 227 KiB an H100 block may take),
            # and the full 128-byte channel chunk where the tuner halved it for stages.
            extra.append(tuning.Candidate(cand.kernel, cand.meta, cand.num_warps, cand.num_stages + 1))
            if cand.params["BLOCK_K"] * elem == 64:
                extra += [tuning.Candidate.make(cand.kernel, cand.num_warps, s, **{
                    **cand.params, "BLOCK_K": 2 * cand.params["BLOCK_K"]}) for s in (2, 3)]
        if cand.kernel == "igemm_halo":  # fewer stages or warps: more programs per SM
            extra += [tuning.Candidate(cand.kernel, cand.meta, w, s) for w, s in ((8, 2), (4, 2), (4, 3))]
        if cand.kernel == "igemm_pointer" and cand.num_stages > 1 and "SPLIT_K" not in cand.params:
            extra.append(tuning.Candidate(cand.kernel, cand.meta, cand.num_warps, 1))
        if cand.kernel == "depthwise":  # a register cap: more programs per SM, more loads in flight
            extra += [tuning.Candidate.make(cand.kernel, cand.num_warps, cand.num_stages, maxnreg=r, **cand.params)
                      for r in (64, 80, 96)]
        if cand.kernel == "igemm_nchw":
            p = cand.params
            extra += [tuning.Candidate(cand.kernel, cand.meta, cand.num_warps, s) for s in (1, 2, 4)]
            extra += [tuning.Candidate.make(cand.kernel, cand.num_warps, s, maxnreg=r, **p) for s in (1, 3)
                      for r in (80, 96)]
            extra += [tuning.Candidate.make(cand.kernel, 8, s, **{**p, "BLOCK_M": m, "BLOCK_N": n})
                      for m, n in ((256, 128), (128, 256), (256, 64)) for s in (1, 2, 3)]
    return [c for c in dict.fromkeys(extra) if c not in cands]


def run_problem(name, args):
    n, c, oc, h, w, kh, kw, s, p, d, g, dt = PROBLEMS[name]
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    wt = (torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt) / math.sqrt(c // g * kh * kw)).to(
        memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), wt.double(), None, s, p, d, g)
    flops = 2 * n * oc * ref.shape[2] * ref.shape[3] * (c // g) * kh * kw
    # NCHW; clone, not contiguous(): a 1x1 channels_last weight counts as contiguous but keeps its strides,
    # and with it cuDNN (and eager's output format) would stay channels_last.
    xn, wn = x.contiguous(), wt.clone(memory_format=torch.contiguous_format)
    t_nchw = bench(lambda: F.conv2d(xn, wn, None, s, p, d, g))
    t_cl = bench(lambda: F.conv2d(x, wt, None, s, p, d, g))
    best = min(t_nchw, t_cl)
    print(f"== {name} {dt}: cuDNN NCHW {t_nchw:.4f} CL {t_cl:.4f} ms ({flops / best / 1e9:.0f} TFLOP/s)", flush=True)
    gpu_cudnn = {}
    for layout, (xi, wi) in (("NCHW", (xn, wn)), ("CL", (x, wt))):
        times = kernel_times(lambda: F.conv2d(xi, wi, None, s, p, d, g))
        gpu_cudnn[layout] = sum(times.values())
        if "--cudnn-kernels" in args:
            for kname, t in times.items():
                print(f"  cuDNN {layout}: {t:.4f} ms {kname[:160]}")
    best_gpu = min(gpu_cudnn.values())
    print(f"  cuDNN GPU time (profiler, L2 cleared): NCHW {gpu_cudnn['NCHW']:.4f} CL {gpu_cudnn['CL']:.4f} ms; "
          "candidates below ranked by their GPU time, x = cuDNN's best GPU time / theirs", flush=True)
    prec = "tf32" if dt == torch.float32 else "ieee"
    tol = 2e-3 if dt == torch.float32 else 1e-2
    if "--nchw" in args:
        x, wt = xn, wn
    if "--tuner-only" in args:
        check_tuner(x, wt, s, p, d, g, prec, best)
        return
    cands = tuner_candidates(x, wt, s, p, d, g, prec)
    only = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--only=")]
    if only:
        cands = [cand for cand in cands if cand.kernel in only[0]]
    extra = variants(cands, x.element_size()) if "--variants" in args else []
    if "--regcap" in args:  # every candidate capped at 96, 128 or 168 registers a thread
        extra += [tuning.Candidate.make(c.kernel, c.num_warps, c.num_stages, maxnreg=r, **c.params)
                  for c in cands if "maxnreg" not in c.params for r in (96, 128, 168)]
    match = [a.split("=", 1)[1].split("|") for a in args if a.startswith("--match=")]
    if match:
        cands, extra = ([cand for cand in group if any(m in cand.describe() for m in match[0])]
                        for group in (cands, extra))
    rows = []
    for cand in cands + extra:
        tag = "+" if cand in extra else " "
        try:
            common.select = lambda key, sig, dev, cs, prep, cand=cand: cand
            plan = make_plan(x, wt, s, p, d, g, prec)
            e = relerr(plan(x, wt, None), ref)
            t, tg = bench(lambda: plan(x, wt, None)), gbench(lambda: plan(x, wt, None))
            # GPU time alone, L2 cleared before each call: do_bench also counts a slow host's launch.
            tk = sum(kernel_times(lambda: plan(x, wt, None), calls=20).values())
            rows.append((tk, f" {tag}{cand.describe():86s} gpu {tk:.4f} ms (x{best_gpu / tk:.2f}) do_bench {t:.4f} "
                             f"graph {tg:.4f} {flops / tk / 1e9:4.0f} TFLOP/s err {e:.1e}{'' if e < tol else '  BAD'}"))
        except Exception as exc:
            rows.append((math.inf, f" {tag}{cand.describe()} FAILED {type(exc).__name__}: {str(exc)[:200]}"))
        finally:
            common.select = tuning.select
    for _, line in sorted(rows, key=lambda r: r[0]):
        print(line, flush=True)
    if "--tuner" in args:
        check_tuner(x, wt, s, p, d, g, prec, best)


def check_tuner(x, wt, s, p, d, g, prec, best):
    """The real tuner's choice, its own timing of it, and that plan's time as the benchmark takes it."""
    tuning.reset_memory()
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger("conv_backend")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        launch_conv2d(x, wt, None, s, p, d, g, prec)
    finally:
        log.removeHandler(handler)
    tuned = [r for r in records if r.startswith("tritonconv: tuned")]
    if tuned:
        # The tuner logs a dict literal; a failed candidate's time is inf, which 1e999 parses to.
        timings = ast.literal_eval(tuned[-1][len("tritonconv: tuned "):].replace("inf", "1e999"))
        top = sorted(timings.items(), key=lambda kv: kv[1])[:3]
        print("  tuner's top 3:", "; ".join(f"{k} {v:.4f}" for k, v in top))
    from conv_backend import dispatch
    plan = list(dispatch._plans.values())[-1]
    t_launch = [bench(lambda: launch_conv2d(x, wt, None, s, p, d, g, prec)) for _ in range(3)]
    t_plan = bench(lambda: plan(x, wt, None))
    t_graph = gbench(lambda: plan(x, wt, None))
    print(f"  tuner pick: launch_conv2d {', '.join(f'{t:.4f}' for t in t_launch)} ms (x{best / t_launch[-1]:.2f}), "
          f"plan {t_plan:.4f}, graph {t_graph:.4f}", flush=True)
    launch = lambda: launch_conv2d(x, wt, None, s, p, d, g, prec)  # noqa: E731
    gpu = ", ".join(f"{name[:40]} {t:.4f}" for name, t in kernel_times(launch).items())
    print(f"  profiler GPU time per kernel (ms): {gpu}; host per launch_conv2d call {host_us(launch):.1f} us",
          flush=True)


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or list(PROBLEMS)
    for problem in names:
        run_problem(problem, sys.argv[1:])
