#!/usr/bin/env python3
"""tritonconv against cuDNN, the seed kernel and (optionally) Inductor on issue 3's conv2d suite.

For every problem: random inputs (fresh per row), weights scaled like nn.Conv2d's
init; the float64 ATen reference first; then every variant is run once, checked
against the reference (relative error ||out - ref|| / ||ref||; TF32 2e-3, exact
fp32 1e-5, bf16/fp16 1e-2) and only then timed (triton.testing.do_bench, median,
the checking call keeps tuning and compilation out of the timing; a 250 ms warm-up
of the variant itself first, so that each is timed at the clock it sustains under the
GPU's power limit). A variant that fails the check is reported as FAIL and not timed.
On a GPU every timed variant of a row is timed again in two more rounds, interleaved,
and keeps its best median (--rounds), the same for cuDNN and for us.

Variants per problem:
  cudnn_nchw, cudnn_cl      F.conv2d on NCHW / channels_last input (cudnn.benchmark=True)
  tritonconv_nchw, _cl      conv_backend.dispatch.launch_conv2d(..., algorithm="auto")
  tritonconv_ptr            algorithm="gemm_pointer" (no TMA: what Ampere/Ada users get),
                            in the layout of the better cuDNN
  seed                      the seed kernel (NCHW input; groups == 1 only)
  inductor                  torch.compile(F.conv2d, mode="max-autotune"), behind --inductor

tritonconv_ms is ours in the layout where cuDNN was faster; speedup_vs_cudnn =
best cuDNN / tritonconv_ms (issue 3's "same-run ratio to the better cuDNN layout").

Writes <out>/<date>-<gpu>.json (issue 3's shape plus extra keys), .md and a bar chart .png;
the JSON and Markdown are rewritten after every row, so a run cut short keeps its rows.

  python bench/conv_bench.py                       # whole suite, results in bench/results/
  python bench/conv_bench.py --problems kb80,depthwise --out /tmp/x
  python bench/conv_bench.py --smoke               # tiny shapes; CPU through TRITON_INTERPRET=1 without a GPU
  python bench/conv_bench.py --merge a.json b.json # combine split runs into one table (no GPU needed)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str          # unique, what --problems takes
    problem: str     # the JSON row's "problem"
    n: int
    ic: int
    oc: int
    h: int
    w: int
    kh: int
    kw: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    dtype: str = "fp32"
    layout: str = "nchw"     # the layout the problem comes in (both are measured)
    tags: tuple = ()

    def out_hw(self):
        oh = (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        ow = (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    def flops(self) -> int:
        oh, ow = self.out_hw()
        return 2 * self.n * self.oc * oh * ow * (self.ic // self.groups) * self.kh * self.kw

    def desc(self) -> str:
        s = f"{self.n}x{self.ic}x{self.h}x{self.w}->{self.oc} k{self.kh}x{self.kw}"
        if self.stride != (1, 1):
            s += f" s{_pair(self.stride)}"
        if self.padding != (0, 0):
            s += f" p{_pair(self.padding)}"
        if self.dilation != (1, 1):
            s += f" d{_pair(self.dilation)}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s

    def shape_dict(self) -> dict:
        return {"n": self.n, "in_channels": self.ic, "out_channels": self.oc, "h": self.h, "w": self.w,
                "kernel": [self.kh, self.kw], "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}


def _pair(t):
    return str(t[0]) if t[0] == t[1] else f"({t[0]},{t[1]})"


def _kb(id, n, ic, oc, h, w, kh, kw, **kw_):
    tags = ("kernelbench", "kb", kw_.pop("dtype", "fp32")) + kw_.pop("extra_tags", ())
    return Problem(id, id.split("-")[0], n, ic, oc, h, w, kh, kw, dtype=tags[2], layout="nchw", tags=tags, **kw_)


def _rn(id, ic, oc, hw, k, stride=1, padding=0):
    return Problem(id, id, 32, ic, oc, hw, hw, k, k, (stride, stride), (padding, padding), dtype="bf16",
                   layout="channels_last", tags=("resnet", "rn50", "bf16"))


# Issue 3 item 6. KernelBench level 1 defaults: stride 1, padding 0, dilation 1, no bias.
# Run (and listed) in this order: the rows issue 3's targets name first, so a run cut short keeps them.
SUITE = [
    _kb("kb80", 8, 32, 64, 512, 512, 5, 9, padding=(2, 4), dilation=(2, 3), extra_tags=("seed",)),
    _kb("kb82", 16, 64, 64, 512, 512, 3, 3, groups=64, extra_tags=("depthwise",)),
    _kb("kb84", 64, 128, 128, 256, 512, 3, 3, groups=128, extra_tags=("depthwise",)),
    _kb("kb55", 8, 64, 128, 512, 1024, 3, 3),
    _kb("kb56", 8, 64, 128, 512, 256, 5, 7),
    _kb("kb62", 8, 32, 64, 512, 512, 5, 9),
    _kb("kb63", 16, 16, 128, 1024, 1024, 3, 3),
    _kb("kb87", 16, 64, 128, 1024, 1024, 1, 1),
    _kb("kb80-bf16", 8, 32, 64, 512, 512, 5, 9, padding=(2, 4), dilation=(2, 3), dtype="bf16",
        extra_tags=("seed",)),
    _rn("rn50-stem", 3, 64, 224, 7, stride=2, padding=3),
    _rn("rn50-3x3-64", 64, 64, 56, 3, padding=1),
    _rn("rn50-1x1-64-256", 64, 256, 56, 1),
    _rn("rn50-3x3s2-128", 128, 128, 56, 3, stride=2, padding=1),
    _rn("rn50-3x3-256", 256, 256, 14, 3, padding=1),
    _rn("rn50-3x3-512", 512, 512, 7, 3, padding=1),
]
ORDER = {p.id: i for i, p in enumerate(SUITE)}
LAYOUTS = ("nchw", "channels_last")


def smoke_version(p: Problem) -> Problem:
    """Same kernel, stride, padding, dilation and group structure; tiny batch, channels and image."""
    if p.groups > 1:
        mult = p.oc // p.ic
        ic, oc, groups = 8, 8 * mult, 8
    else:
        ic, oc, groups = min(p.ic, 8), min(p.oc, 16), 1

    def size(k, s, pad, d, full, extra):
        return min(full, max(d * (k - 1) + 1 - 2 * pad, 1) + s * 5 + extra)  # about 6 outputs
    h = size(p.kh, p.stride[0], p.padding[0], p.dilation[0], p.h, 0)
    w = size(p.kw, p.stride[1], p.padding[1], p.dilation[1], p.w, 1)
    return dataclasses.replace(p, n=min(p.n, 2), ic=ic, oc=oc, h=h, w=w, groups=groups)


def select_problems(spec: str):
    if not spec or spec == "all":
        return list(SUITE)
    tags = {t for p in SUITE for t in p.tags} | {"all"}
    chosen = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok == "all":
            matches = list(SUITE)
        else:
            matches = [p for p in SUITE if p.id == tok or tok in p.tags]
        if not matches:
            sys.exit(f"unknown problem {tok!r}; ids: {', '.join(p.id for p in SUITE)}; groups: {', '.join(sorted(tags))}")
        chosen += [p for p in matches if p not in chosen]
    return sorted(chosen, key=lambda p: ORDER[p.id])


# ----------------------------------------------------------------------------------------------
# Measuring


class Context:
    def __init__(self, args, device):
        import torch
        self.args = args
        self.device = device
        self.timer = bu.make_timer(device, args.warmup, args.rep)
        self.logcap = bu.LogCapture()
        self.torch = torch
        self.kernel_memo = {}
        self.precision = "tf32"
        self.timed = []  # (record, fn) of the row being measured: later rounds time them again


def measure(ctx, fn, ref, ref_norm, thr, skip_reason=None, describe=None, reset_tuning=False, graph=True):
    """Run fn once, check it against the float64 reference, then time it. Returns a record dict."""
    rec = {"ms": None, "rel_err": None, "status": "n/a", "kernel": None}
    if skip_reason:
        rec["status"] = f"n/a: {skip_reason}"
        return rec
    ctx.logcap.clear()
    if reset_tuning:  # so that chosen_kernels() afterwards names this call's choice only
        from conv_backend import tuning
        tuning.reset_memory()
    try:
        out = fn()
        bu.synchronize(ctx.device)
        rec["rel_err"] = bu.rel_err(out, ref, ref_norm)
        del out
    except bu.Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
        rec["status"] = "error: " + _short(exc)
        _free(ctx)
        return rec
    if describe is not None:
        try:
            rec["kernel"] = describe()
        except Exception as exc:  # noqa: BLE001
            rec["kernel"] = f"? ({_short(exc)})"
    if ctx.logcap.messages:
        rec["status"] = "fallback: " + ctx.logcap.messages[0][:200]
        return rec
    if not rec["rel_err"] <= thr:
        rec["status"] = "FAIL"
        return rec
    try:
        rec["ms"] = ctx.timer(fn)
        rec["status"] = "ok"
        ctx.timed.append((rec, fn))
    except bu.Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001
        rec["status"] = "error while timing: " + _short(exc)
        _free(ctx)
        return rec
    if graph and ctx.args.graphs and ctx.device == "cuda":
        # GPU time without host overhead: the calls replayed from a CUDA graph (no L2 flush between calls)
        import triton.testing
        try:
            rec["graph_ms"] = float(triton.testing.do_bench_cudagraph(fn, rep=ctx.args.rep, return_mode="median"))
        except bu.Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001
            rec["graph_status"] = "error: " + _short(exc)
            _free(ctx)
    return rec


def _short(exc) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _free(ctx):
    gc.collect()
    if ctx.device == "cuda":
        ctx.torch.cuda.empty_cache()


def run_problem(ctx, p: Problem, index: int) -> dict:
    import torch
    import torch.nn.functional as F
    from conv_backend.dispatch import launch_conv2d
    from conv_backend.support import depthwise_like, unsupported_reason
    from conv_backend.tuning import chosen_kernels

    args = ctx.args
    t_start = time.perf_counter()
    dev = ctx.device
    dt = bu.torch_dtype(p.dtype)
    torch.manual_seed(args.seed + 1000 * index + 1)
    stride, padding, dilation, groups = p.stride, p.padding, p.dilation, p.groups

    x = torch.randn(p.n, p.ic, p.h, p.w, device=dev).to(dt)
    w = bu.conv_weight(p.oc, p.ic // groups, p.kh, p.kw, dt, dev)
    b = (torch.rand(p.oc, device=dev) - 0.5).to(dt) if args.bias else None
    ref = bu.reference_conv(x, w, b, stride, padding, dilation, groups)
    ref_norm = bu.vector_norm(ref)
    x_shape, w_shape = tuple(x.shape), tuple(w.shape)
    t_ref = time.perf_counter() - t_start
    cl = torch.channels_last
    inputs = {"nchw": (x, w), "channels_last": (x.contiguous(memory_format=cl), w.contiguous(memory_format=cl))}
    layouts = LAYOUTS if args.layouts == "both" else (p.layout,)
    thr = bu.threshold(p.dtype, ctx.precision)
    recs = {}

    def rec_of(key):
        return recs.get(key) or {"ms": None, "rel_err": None, "status": "n/a: not measured", "kernel": None}

    def chosen_for(lay, algorithm):
        memo_key = (x_shape, w_shape, stride, padding, dilation, groups, p.dtype, lay, algorithm, args.bias)

        def describe():
            got = "; ".join(chosen_kernels(x_shape, w_shape, stride, padding, dilation, groups, dt))
            if got:
                ctx.kernel_memo[memo_key] = got
                return got
            # launch_conv2d keeps a per-problem plan: a problem seen before (same shapes) selects nothing anew
            return ctx.kernel_memo.get(memo_key)
        return describe

    # cuDNN (ATen on CPU in smoke runs), both layouts
    for lay in layouts:
        xi, wi = inputs[lay]
        recs[f"cudnn_{lay}"] = measure(ctx, lambda xi=xi, wi=wi: F.conv2d(xi, wi, b, stride, padding, dilation, groups),
                                       ref, ref_norm, thr)
    cud = {lay: recs[f"cudnn_{lay}"]["ms"] for lay in layouts}
    timed = {lay: v for lay, v in cud.items() if v is not None}
    cmp_layout = min(timed, key=timed.get) if timed else p.layout

    # tritonconv, algorithm auto, both layouts
    for lay in layouts:
        xi, wi = inputs[lay]
        why = unsupported_reason(xi, wi, b, stride, padding, dilation, groups=groups, algorithm="auto")
        recs[f"tritonconv_{lay}"] = measure(
            ctx, lambda xi=xi, wi=wi: launch_conv2d(xi, wi, b, stride, padding, dilation, groups, "auto", "auto"),
            ref, ref_norm, thr, skip_reason=why and f"unsupported ({why})", describe=chosen_for(lay, "auto"),
            reset_tuning=True)

    # the pointer-load path, in the compared layout
    xi, wi = inputs[cmp_layout]
    if depthwise_like(p.ic, p.oc, groups):
        main = recs.get(f"tritonconv_{cmp_layout}", {})
        recs["tritonconv_ptr"] = dict(main, status=(main.get("status", "n/a") + " (= auto: the depthwise kernel "
                                                    "uses no TMA, so non-Hopper GPUs run the same)"))
    else:
        why = unsupported_reason(xi, wi, b, stride, padding, dilation, groups=groups, algorithm="gemm_pointer")
        recs["tritonconv_ptr"] = measure(
            ctx, lambda xi=xi, wi=wi: launch_conv2d(xi, wi, b, stride, padding, dilation, groups, "auto", "gemm_pointer"),
            ref, ref_norm, thr, skip_reason=why and f"unsupported ({why})",
            describe=chosen_for(cmp_layout, "gemm_pointer"), reset_tuning=True)

    # the seed kernel, NCHW (its native layout)
    if not args.no_seed:
        xi, wi = inputs["nchw"]
        why = unsupported_reason(xi, wi, b, stride, padding, dilation, groups=groups, algorithm="seed")
        from conv_backend.kernels import seed as seed_mod
        precision = bu.kernel_precision(dt, dev)

        def seed_fn():
            return seed_mod.seed_conv2d(xi, wi, b, stride, padding, dilation, precision, configs=args.seed_configs)

        def seed_cfg():
            if dev != "cuda":
                return "interpreter: " + ",".join(f"{k}={v}" for k, v in seed_mod.INTERPRETER_META.items())
            tuner = {"original": seed_mod.seed_conv2d_original, "tuned": seed_mod.seed_conv2d_tuned}[args.seed_configs]
            cfg = getattr(tuner, "best_config", None)
            return describe_config(cfg) if cfg is not None else None
        recs["seed"] = measure(ctx, seed_fn, ref, ref_norm, thr, skip_reason=why, describe=seed_cfg)

    # Inductor max-autotune, in the compared layout
    if args.inductor:
        if dev != "cuda":
            recs["inductor"] = {"ms": None, "rel_err": None, "status": "n/a: CPU smoke run", "kernel": None}
        else:
            xi, wi = inputs[cmp_layout]
            try:
                torch._dynamo.reset()
                compiled = torch.compile(lambda a, c: F.conv2d(a, c, b, stride, padding, dilation, groups),
                                         mode="max-autotune", dynamic=False)
                recs["inductor"] = measure(ctx, lambda xi=xi, wi=wi: compiled(xi, wi), ref, ref_norm, thr, graph=False)
            except bu.Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001
                recs["inductor"] = {"ms": None, "rel_err": None, "status": "error: " + _short(exc), "kernel": None}

    # Further rounds over every timed variant, interleaved; each keeps its best round. A variant is timed
    # right after its own tuning, when the GPU has run hot for seconds, and some hosts stall whole do_bench
    # runs (bench/NOTES.md, run 23): more rounds keep either from deciding a comparison.
    for _ in range(args.rounds - 1):
        for rec, fn in ctx.timed:
            rec["ms"] = min(rec["ms"], ctx.timer(fn))
    ctx.timed.clear()
    del ref, inputs, x, w
    _free(ctx)
    return make_row(p, ctx, recs, cmp_layout, thr, rec_of, time.perf_counter() - t_start, t_ref)


def describe_config(cfg) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"seed[{blocks},warps={cfg.num_warps},stages={cfg.num_stages}]"


def make_row(p, ctx, recs, cmp_layout, thr, rec_of, wall_s, ref_s) -> dict:
    def ms(key):
        return rec_of(key)["ms"]
    trit = rec_of(f"tritonconv_{cmp_layout}")
    cudnn_best = min([v for v in (ms("cudnn_nchw"), ms("cudnn_channels_last")) if v is not None], default=None)
    cudnn_graph = min([v for v in (rec_of("cudnn_nchw").get("graph_ms"), rec_of("cudnn_channels_last").get("graph_ms"))
                       if v is not None], default=None)
    trit_best = min([v for v in (ms("tritonconv_nchw"), ms("tritonconv_channels_last")) if v is not None], default=None)
    flops = p.flops()

    def ratio(a, b_):
        return a / b_ if a is not None and b_ is not None and b_ > 0 else None

    def tflops(t):
        return flops / (t * 1e-3) / 1e12 if t else None
    problems_seen = [f"{k}: {r['status']}" for k, r in recs.items()
                     if r["status"].startswith(("FAIL", "error", "fallback"))]
    row = {
        "problem": p.problem,
        "dtype": p.dtype,
        "layout": cmp_layout,
        "tritonconv_ms": trit["ms"],
        "cudnn_ms": ms("cudnn_nchw"),
        "cudnn_cl_ms": ms("cudnn_channels_last"),
        "seed_ms": ms("seed"),
        "rel_err": trit["rel_err"],
        "tflops": tflops(trit["ms"]),
        # extra keys
        "id": p.id,
        "shape": p.shape_dict(),
        "desc": p.desc(),
        "problem_layout": p.layout,
        "flops": flops,
        "tritonconv_nchw_ms": ms("tritonconv_nchw"),
        "tritonconv_cl_ms": ms("tritonconv_channels_last"),
        "tritonconv_ptr_ms": ms("tritonconv_ptr"),
        "inductor_ms": ms("inductor") if ctx.args.inductor else None,
        "graph_ms": ({k: r.get("graph_ms") for k, r in recs.items() if "graph_ms" in r or "graph_status" in r}
                     if ctx.args.graphs else None),
        "cudnn_graph_ms": cudnn_graph,
        "tritonconv_graph_ms": trit.get("graph_ms"),
        "speedup_graph_vs_cudnn": ratio(cudnn_graph, trit.get("graph_ms")),
        "cudnn_best_ms": cudnn_best,
        "tflops_cudnn": tflops(cudnn_best),
        "speedup_vs_cudnn": ratio(cudnn_best, trit["ms"]),
        "speedup_best_layouts": ratio(cudnn_best, trit_best),
        "speedup_ptr_vs_cudnn": ratio(cudnn_best, ms("tritonconv_ptr")),
        "speedup_vs_seed": ratio(ms("seed"), trit["ms"]),
        "speedup_inductor_vs_cudnn": ratio(cudnn_best, ms("inductor")),
        "kernel": trit["kernel"],
        "kernel_nchw": rec_of("tritonconv_nchw")["kernel"],
        "kernel_cl": rec_of("tritonconv_channels_last")["kernel"],
        "kernel_ptr": rec_of("tritonconv_ptr")["kernel"],
        "seed_config": rec_of("seed")["kernel"],
        "rel_errs": {k: r["rel_err"] for k, r in recs.items()},
        "status": {k: r["status"] for k, r in recs.items()},
        "threshold": thr,
        "ok": not problems_seen,
        "problems_seen": problems_seen,
        "wall_s": wall_s,
        "reference_s": ref_s,
    }
    return row


# ----------------------------------------------------------------------------------------------
# Output


def summarize(rows) -> tuple:
    """(summary dict, lines of text)."""
    sp = [(r["speedup_vs_cudnn"], r) for r in rows if r.get("speedup_vs_cudnn")]
    lines = []
    s = {"rows": len(rows), "rows_with_speedup": len(sp)}
    gm = bu.geomean([v for v, _ in sp])
    s["geomean_speedup_vs_cudnn"] = gm
    if sp:
        lo, lo_row = min(sp, key=lambda t: t[0])
        s["min_speedup_vs_cudnn"] = lo
        s["min_speedup_problem"] = f"{lo_row['problem']} {lo_row['dtype']}"
        lines.append(f"geomean speedup vs best cuDNN over {len(sp)} rows: {gm:.2f}x "
                     f"(target >= 1.1x: {'met' if gm >= 1.1 else 'NOT met'})")
        lines.append(f"min speedup vs best cuDNN: {lo:.2f}x on {s['min_speedup_problem']} "
                     f"(target >= 0.9x: {'met' if lo >= 0.9 else 'NOT met'})")
    else:
        lines.append("no row has both a tritonconv and a cuDNN time")
    gmb = bu.geomean([r.get("speedup_best_layouts") for r in rows])
    s["geomean_speedup_best_layouts"] = gmb
    if gmb:
        lines.append(f"geomean, best tritonconv layout vs best cuDNN layout: {gmb:.2f}x")
    gmp = bu.geomean([r.get("speedup_ptr_vs_cudnn") for r in rows])
    s["geomean_speedup_ptr_vs_cudnn"] = gmp
    if gmp:
        lines.append(f"geomean speedup of the pointer path (no TMA, as on Ampere/Ada) vs best cuDNN: {gmp:.2f}x")
    gmg = bu.geomean([r.get("speedup_graph_vs_cudnn") for r in rows])
    if gmg:
        s["geomean_graph_speedup_vs_cudnn"] = gmg
        lines.append(f"geomean speedup vs best cuDNN, both replayed from CUDA graphs (GPU time only): {gmg:.2f}x")
    gmi = bu.geomean([r.get("speedup_inductor_vs_cudnn") for r in rows])
    if gmi:
        s["geomean_inductor_vs_cudnn"] = gmi
        lines.append(f"geomean Inductor max-autotune vs best cuDNN: {gmi:.2f}x")
    for r in rows:
        if r["problem"] == "kb80" and r["dtype"] == "fp32":
            c, sd = r.get("speedup_vs_cudnn"), r.get("speedup_vs_seed")
            s["seed_problem_fp32_vs_cudnn"], s["seed_problem_fp32_vs_seed"] = c, sd
            lines.append(f"seed problem (kb80) fp32: {bu.fmt_x(c)} cuDNN (target >= 1.3x: "
                         f"{_met(c, 1.3)}), {bu.fmt_x(sd)} the seed kernel (target >= 8x: {_met(sd, 8)})")
        if r["problem"] == "kb80" and r["dtype"] == "bf16":
            s["seed_problem_bf16_vs_cudnn"] = r.get("speedup_vs_cudnn")
            lines.append(f"seed problem (kb80) bf16: {bu.fmt_x(r.get('speedup_vs_cudnn'))} cuDNN, "
                         f"{bu.fmt_x(r.get('speedup_vs_seed'))} the seed kernel")
    dw = [r for r in rows if r["shape"]["groups"] > 1]
    if dw:
        s["depthwise_vs_cudnn"] = {f"{r['problem']} {r['dtype']}": r.get("speedup_vs_cudnn") for r in dw}
        lines.append("depthwise vs best cuDNN: " + ", ".join(
            f"{r['problem']} {bu.fmt_x(r.get('speedup_vs_cudnn'))} ({_met(r.get('speedup_vs_cudnn'), 2.0)})"
            for r in dw) + " (target >= 2x)")
    bad = [f"{r['problem']} {r['dtype']}: " + "; ".join(r["problems_seen"]) for r in rows if not r.get("ok", True)]
    s["failures"] = bad
    lines.append("correctness: every measured output within its limit" if not bad
                 else f"correctness / errors in {len(bad)} rows:")
    lines += ["  " + b for b in bad]
    return s, lines


def _met(v, target):
    return "n/a" if v is None else ("met" if v >= target else "NOT met")


def _kernel_short(k):
    if not k:
        return "n/a"
    return k.replace("igemm_", "").replace("BLOCK_", "").replace("warps=", "w").replace("stages=", "s")


def table_rows(rows, inductor: bool, md: bool, graphs: bool = False):
    out = []
    for r in rows:
        line = [r["problem"], r["desc"] if md else r["desc"].split(" ")[0], r["dtype"],
                "CL" if r["layout"] == "channels_last" else "NCHW",
                bu.fmt_ms(r["tritonconv_ms"]), "n/a" if r["tflops"] is None else f"{r['tflops']:.0f}",
                bu.fmt_x(r["speedup_vs_cudnn"]),
                bu.fmt_ms(r["tritonconv_nchw_ms"]), bu.fmt_ms(r["tritonconv_cl_ms"]),
                bu.fmt_ms(r["tritonconv_ptr_ms"]), bu.fmt_x(r["speedup_ptr_vs_cudnn"]),
                bu.fmt_ms(r["cudnn_ms"]), bu.fmt_ms(r["cudnn_cl_ms"]),
                "n/a" if r["tflops_cudnn"] is None else f"{r['tflops_cudnn']:.0f}",
                bu.fmt_ms(r["seed_ms"]), bu.fmt_x(r["speedup_vs_seed"])]
        if inductor:
            line += [bu.fmt_ms(r.get("inductor_ms"))]
        if graphs:
            line += [bu.fmt_ms(r.get("tritonconv_graph_ms")), bu.fmt_ms(r.get("cudnn_graph_ms")),
                     bu.fmt_x(r.get("speedup_graph_vs_cudnn"))]
        line += [bu.fmt_err(r["rel_err"]) + ("" if r.get("ok", True) else " !"), _kernel_short(r["kernel"])]
        out.append(line)
    headers = ["problem", "shape", "dtype", "layout", "ours ms", "TFLOP/s", "x cuDNN", "ours NCHW", "ours CL",
               "ptr ms", "ptr x cuDNN", "cuDNN NCHW", "cuDNN CL", "cuDNN TFLOP/s", "seed ms", "x seed"]
    if inductor:
        headers += ["Inductor ms"]
    if graphs:
        headers += ["ours graph ms", "cuDNN graph ms", "x cuDNN graph"]
    headers += ["rel_err", "kernel"]
    return headers, out


def render(meta: dict, rows: list, out_dir: Path, stem: str, complete: bool, chart: bool = True) -> dict:
    rows = sorted(rows, key=lambda r: (ORDER.get(r.get("id"), 999), r.get("id", "")))
    summary, lines = summarize(rows)
    inductor = any(r.get("inductor_ms") is not None or "inductor" in r.get("status", {}) for r in rows)
    graphs = any(r.get("graph_ms") for r in rows)
    data = dict(meta)
    data["complete"] = complete
    data["summary"] = summary
    data["rows"] = rows
    json_path = out_dir / f"{stem}.json"
    bu.write_json(json_path, bu.clean_json(data))

    headers, trows = table_rows(rows, inductor, md=True, graphs=graphs)
    md = [f"# tritonconv conv2d benchmark: {meta['gpu']}, {meta['date']}", "",
          f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn_version')}",
          f"- fp32 math: {meta.get('precision')} (cuDNN and tritonconv alike); bf16 accumulates in fp32",
          f"- timing: {meta.get('timing')}",
          "- every output checked against float64 ATen first (relative error; limits TF32 2e-3, exact fp32 1e-5, "
          "bf16 1e-2); a failing variant is not timed",
          "- `ours` = tritonconv (`launch_conv2d`, algorithm auto) with input in the layout where cuDNN was faster "
          "(`layout`); `x cuDNN` = best cuDNN layout / ours; `ptr` = forced pointer-load path (no TMA, what "
          "Ampere/Ada GPUs run); `seed` = the seed kernel on NCHW input "
          f"({meta.get('seed_configs', 'original')} configs)",
          f"- command: `{meta.get('command', '')}`", ""]
    if not complete:
        md += ["**Incomplete run** (interrupted or still running): rows so far only.", ""]
    md += [bu.md_table(headers, trows), "", "## Summary", ""]
    md += [f"- {ln}" if not ln.startswith("  ") else f"  - {ln.strip()}" for ln in lines]
    notes = [(r, k, v) for r in rows for k, v in r.get("status", {}).items() if not v.startswith("ok")]
    if notes:
        md += ["", "## Variants not timed", ""]
        md += [f"- {r['problem']} {r['dtype']} {k}: {v}" for r, k, v in notes]
    md += ["", "## Kernels chosen", ""]
    md += [f"- {r['problem']} {r['dtype']}: NCHW {r.get('kernel_nchw')}; CL {r.get('kernel_cl')}; "
           f"ptr {r.get('kernel_ptr')}; seed {r.get('seed_config')}" for r in rows]
    bu.write_text(out_dir / f"{stem}.md", "\n".join(md) + "\n")
    written = [json_path, out_dir / f"{stem}.md"]
    if chart and rows:
        png = write_chart(meta, rows, out_dir / f"{stem}.png", inductor)
        if png:
            written.append(png)
    return {"summary_lines": lines, "written": written, "rows": rows}


def write_chart(meta, rows, path: Path, inductor: bool):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"warning: no bar chart ({type(exc).__name__}: {exc}); matplotlib is needed for the PNG")
        return None
    series = [("tritonconv", "speedup_vs_cudnn"), ("tritonconv pointer path (no TMA)", "speedup_ptr_vs_cudnn")]
    seed_vals = [r["cudnn_best_ms"] / r["seed_ms"] if r.get("seed_ms") and r.get("cudnn_best_ms") else None
                 for r in rows]
    labels = [f"{r['problem']}\n{r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows) + 2), 5))
    n_series = len(series) + 1 + (1 if inductor else 0)
    width = 0.8 / n_series
    xs = list(range(len(rows)))

    def bars(i, vals, label, annotate=False):
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        heights = [v if v else float("nan") for v in vals]
        ax.bar(pos, heights, width, label=label)
        if annotate:
            for x_, v in zip(pos, vals):
                if v:
                    ax.annotate(f"{v:.2f}", (x_, v), ha="center", va="bottom", fontsize=6)
    for i, (label, key) in enumerate(series):
        bars(i, [r.get(key) for r in rows], label, annotate=(i == 0))
    bars(len(series), seed_vals, "seed kernel")
    if inductor:
        bars(len(series) + 1, [r.get("speedup_inductor_vs_cudnn") for r in rows], "Inductor max-autotune")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("speedup vs best cuDNN layout (higher is better)")
    ax.set_title(f"tritonconv vs cuDNN: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(rows, inductor):
    headers, trows = table_rows(rows, inductor, md=False, graphs=any(r.get("graph_ms") for r in rows))
    print(bu.text_table(headers, trows), flush=True)


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="problem ids: " + ", ".join(p.id for p in SUITE)
                                 + "; groups: kernelbench (kb), depthwise, resnet (rn50), seed, fp32, bf16, all")
    ap.add_argument("--problems", default="all", help="comma-separated ids or groups (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default bench/results; /tmp/tritonconv_bench_smoke with --smoke)")
    ap.add_argument("--inductor", action="store_true", help="also time torch.compile(mode='max-autotune')")
    ap.add_argument("--ieee", action="store_true", help="exact fp32 everywhere (TF32 off for cuDNN and us)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time cuDNN / tritonconv / pointer path replayed from a CUDA graph "
                         "(triton.testing.do_bench_cudagraph: GPU time without host overhead)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; on a machine without a GPU, through the Triton interpreter on CPU")
    ap.add_argument("--layouts", choices=("both", "native"), default="both",
                    help="measure NCHW and channels_last (default), or only the problem's own layout")
    ap.add_argument("--seed-configs", choices=("original", "tuned"), default="original",
                    help="config set of the seed kernel column (default: the seed's original configs)")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed kernel column")
    ap.add_argument("--bias", action="store_true", help="convolutions with bias (the suite has none)")
    # A long warm-up: under a power cap the SM clock falls within a fraction of a second of sustained load
    # (an H200 on #55: 1980 -> ~1450 MHz at 700 W), so a variant timed on an idle GPU reads up to 15% faster
    # than one timed after another's load (bench/NOTES.md, entry 54). Each variant first runs alone this long.
    ap.add_argument("--warmup", type=float, default=250.0,
                    help="do_bench warm-up, ms (default 250: each variant is timed at its own sustained clock)")
    ap.add_argument("--rep", type=float, default=50.0, help="do_bench measuring time, ms (default 50)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing rounds over a row's variants, interleaved; each keeps its best "
                         "(default 3 on a GPU, 1 in CPU smoke runs)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (each row gets its own stream)")
    ap.add_argument("--resume", type=Path, metavar="JSON",
                    help="keep the rows of an earlier (cut short) result JSON of this GPU, measure only the rest, "
                         "and write everything together")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="no measuring: combine result JSONs of split runs into one JSON/MD/PNG in --out")
    ap.add_argument("--list", action="store_true", help="print the suite and exit")
    ap.add_argument("--tuner-log", action="store_true",
                    help="print the tuner's timing of every candidate (conv_backend's debug log) to stderr")
    return ap.parse_args(argv)


def resume_rows(path: Path, info: dict, problems, smoke: bool) -> list:
    with open(path) as f:
        data = json.load(f)
    if data.get("gpu") != info["gpu"] or bool(data.get("smoke")) != smoke:
        sys.exit(f"--resume: {path} is from {data.get('gpu')!r} (smoke={data.get('smoke')}), "
                 f"this run is on {info['gpu']!r} (smoke={smoke})")
    wanted = {p.id for p in problems}
    return [r for r in data.get("rows", []) if r.get("id") in wanted]


def merge(args) -> int:
    rows, metas = {}, []
    for path in args.merge:
        with open(path) as f:
            data = json.load(f)
        metas.append(data)
        for r in data["rows"]:
            rows[(r.get("id") or r["problem"], r["dtype"])] = r  # later files win
    meta = {k: v for k, v in metas[0].items() if k not in ("rows", "summary", "complete")}
    gpus = {m.get("gpu") for m in metas}
    if len(gpus) > 1:
        print(f"warning: merging results of different GPUs: {sorted(map(str, gpus))}")
    meta["merged_from"] = [str(p) for p in args.merge]
    meta["command"] = " / ".join(str(m.get("command", "")) for m in metas)
    out = args.out or bu.RESULTS_DIR
    slug = "cpu-smoke" if str(meta["gpu"]).startswith("cpu") else bu.gpu_slug(meta["gpu"])
    res = render(meta, list(rows.values()), out, f"{meta['date']}-{slug}", complete=all(m.get("complete") for m in metas))
    print_table(res["rows"], any(r.get("inductor_ms") is not None for r in res["rows"]))
    print("\n".join(res["summary_lines"]))
    print("wrote " + ", ".join(map(str, res["written"])))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for p in SUITE:
            print(f"{p.id:18s} {p.dtype:5s} {p.layout:14s} {p.desc():45s} {p.flops() / 1e9:9.1f} GFLOP  "
                  f"[{', '.join(p.tags)}]")
        return 0
    if args.merge:
        return merge(args)
    problems = select_problems(args.problems)
    device = bu.init_runtime(args.smoke)  # before conv_backend / triton kernels are imported
    args.rounds = args.rounds or (3 if device == "cuda" else 1)
    bu.install_sigterm_handler()
    import torch
    import conv_backend  # noqa: F401
    if args.tuner_log:
        import logging
        logging.basicConfig(format="%(message)s")
        logging.getLogger("conv_backend").setLevel(logging.DEBUG)

    precision = bu.set_fp32_precision(args.ieee)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.smoke:
        problems = [smoke_version(p) for p in problems]
    info = bu.versions(device)
    out_dir = args.out or bu.default_out(args.smoke)
    stem = bu.result_stem(info, args.smoke)
    ctx = Context(args, device)
    ctx.precision = precision
    timing = (f"triton.testing.do_bench median, warmup {args.warmup:g} ms, rep {args.rep:g} ms, the best of "
              f"{args.rounds} rounds over a row's variants (interleaved); cudnn.benchmark=True"
              if device == "cuda" else "time.perf_counter median of 2 calls (CPU smoke run, interpreter)")
    meta = dict(info, precision=precision, timing=timing, seed_configs=args.seed_configs, smoke=args.smoke,
                layouts=args.layouts, bias=args.bias, command="python " + " ".join([sys.argv[0]] + sys.argv[1:]))
    print(f"# {info['gpu']}: torch {info['torch']}, triton {info['triton']}, cuDNN {info['cudnn_version']}, "
          f"fp32 math {precision}; {len(problems)} problems; results -> {out_dir}/{stem}.*", flush=True)

    rows, interrupted, t0 = [], None, time.perf_counter()
    if args.resume:
        rows = resume_rows(args.resume, info, problems, args.smoke)
        done = {r["id"] for r in rows}
        print(f"resuming from {args.resume}: keeping {len(rows)} rows ({', '.join(sorted(done)) or 'none'})")
        problems = [p for p in problems if p.id not in done]
        meta["resumed_from"] = str(args.resume)
    try:
        for i, p in enumerate(problems):
            print(f"[{i + 1}/{len(problems)}] {p.id} {p.dtype} {p.desc()} ...", flush=True)
            row = run_problem(ctx, p, ORDER[p.id])
            rows.append(row)
            print(f"    ours {bu.fmt_ms(row['tritonconv_ms'])} ms ({row['layout']}), cuDNN NCHW "
                  f"{bu.fmt_ms(row['cudnn_ms'])} / CL {bu.fmt_ms(row['cudnn_cl_ms'])}, ptr "
                  f"{bu.fmt_ms(row['tritonconv_ptr_ms'])}, seed {bu.fmt_ms(row['seed_ms'])}; "
                  f"x cuDNN {bu.fmt_x(row['speedup_vs_cudnn'])}; rel_err {bu.fmt_err(row['rel_err'])}; "
                  f"{row['wall_s']:.1f}s" + ("" if row["ok"] else "  !! " + "; ".join(row["problems_seen"])),
                  flush=True)
            render(meta, rows, out_dir, stem, complete=False, chart=False)
    except (bu.Interrupted, KeyboardInterrupt) as exc:
        interrupted = f"interrupted ({exc or 'keyboard'}) after {len(rows)} of {len(problems)} problems"
        print("!! " + interrupted, flush=True)
    meta["wall_s"] = time.perf_counter() - t0
    if interrupted:
        meta["interrupted"] = interrupted
    res = render(meta, rows, out_dir, stem, complete=interrupted is None)
    print()
    print_table(res["rows"], args.inductor)
    print()
    print("\n".join(res["summary_lines"]))
    print(f"total {meta['wall_s']:.0f}s; wrote " + ", ".join(map(str, res["written"])), flush=True)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
