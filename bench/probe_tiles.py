"""Tile sweep: time every kernel candidate the tuner would consider, one by one, against cuDNN (same run).

Usage on a GPU: python bench/probe_tiles.py [problem ...] [--variants] [--only=KERNEL[,KERNEL]] [--tuner | --tuner-only]
  --variants  also time variants outside the tuner's set: TMA tiles with 4 pipeline stages, and
              pointer tiles with 1 stage (plain loads, which go through L1, instead of cp.async.cg).
  --only      time only the candidates of these kernels (e.g. --only=igemm_halo).
  --tuner     then run the real tuner (launch_conv2d, empty cache) and time its plan three ways:
              do_bench of launch_conv2d (three times), do_bench of the plan, CUDA-graph replay of the plan.
  --tuner-only  the --tuner check alone.
Prints, per candidate: do_bench median, CUDA-graph replay time (GPU time alone), TFLOP/s, ratio to
the better cuDNN layout, and the relative error against a float64 reference. Logs of runs:
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
from conv_backend.kernels import common, implicit_gemm as ig  # noqa: E402

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
    "rn50-3x3s2-128": (32, 128, 128, 56, 56, 3, 3, (2, 2), (1, 1), (1, 1), 1, torch.bfloat16),
    "rn50-3x3-256": (32, 256, 256, 14, 14, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16),
    "rn50-3x3-512": (32, 512, 512, 7, 7, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.bfloat16),
}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def gbench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def relerr(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def tuner_candidates(x, w, s, p, d, g, prec):
    """The candidates implicit_gemm_plan hands the tuner for this problem."""
    seen = []

    def capture(key, sig, dev, cands, prepare):
        seen.extend(cands)
        return cands[0]
    real = common.select
    common.select = capture
    try:
        ig.implicit_gemm_plan(x, w, None, s, p, d, g, prec, "auto")
    finally:
        common.select = real
    return seen


def variants(cands):
    extra = []
    for cand in cands:
        if cand.kernel == "igemm_tma" and cand.num_stages == 3:
            extra.append(tuning.Candidate(cand.kernel, cand.meta, cand.num_warps, 4))
        if cand.kernel == "igemm_pointer" and cand.num_stages > 1 and "SPLIT_K" not in cand.params:
            extra.append(tuning.Candidate(cand.kernel, cand.meta, cand.num_warps, 1))
    return extra


def run_problem(name, args):
    n, c, oc, h, w, kh, kw, s, p, d, g, dt = PROBLEMS[name]
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    wt = (torch.randn(oc, c // g, kh, kw, device="cuda", dtype=dt) / math.sqrt(c // g * kh * kw)).to(
        memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), wt.double(), None, s, p, d, g)
    flops = 2 * n * oc * ref.shape[2] * ref.shape[3] * (c // g) * kh * kw
    xn, wn = x.contiguous(), wt.contiguous()
    t_nchw = bench(lambda: F.conv2d(xn, wn, None, s, p, d, g))
    t_cl = bench(lambda: F.conv2d(x, wt, None, s, p, d, g))
    best = min(t_nchw, t_cl)
    print(f"== {name} {dt}: cuDNN NCHW {t_nchw:.4f} CL {t_cl:.4f} ms ({flops / best / 1e9:.0f} TFLOP/s)", flush=True)
    prec = "tf32" if dt == torch.float32 else "ieee"
    tol = 2e-3 if dt == torch.float32 else 1e-2
    if "--tuner-only" in args:
        check_tuner(x, wt, s, p, d, g, prec, best)
        return
    cands = tuner_candidates(x, wt, s, p, d, g, prec)
    only = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--only=")]
    if only:
        cands = [cand for cand in cands if cand.kernel in only[0]]
    extra = variants(cands) if "--variants" in args else []
    rows = []
    for cand in cands + extra:
        tag = "+" if cand in extra else " "
        try:
            common.select = lambda key, sig, dev, cs, prep, cand=cand: cand
            plan = ig.implicit_gemm_plan(x, wt, None, s, p, d, g, prec, "auto")
            e = relerr(plan(x, wt, None), ref)
            t, tg = bench(lambda: plan(x, wt, None)), gbench(lambda: plan(x, wt, None))
            rows.append((t, f" {tag}{cand.describe():86s} {t:.4f} ms graph {tg:.4f} {flops / t / 1e9:4.0f} TFLOP/s "
                            f"x{best / t:.2f} err {e:.1e}{'' if e < tol else '  BAD'}"))
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


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or list(PROBLEMS)
    for problem in names:
        run_problem(problem, sys.argv[1:])
