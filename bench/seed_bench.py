#!/usr/bin/env python3
"""The seed kernel on the seed problem: every config timed alone, the seed's micro-tuning rule, cuDNN.

Issue 2's "Done means": the seed problem (KernelBench level 1 #80: batch 8, 32->64
channels, 512x512, kernel 5x9, padding (2,4), dilation (2,3); fp32 with TF32 on
unless --ieee) timed with the seed's ORIGINAL configs, with the tuned set
(original + NEARBY_CONFIGS), and with cuDNN on NCHW and channels_last input;
every result checked against float64 ATen first.

Each config is launched alone through the raw `seed_conv2d_kernel` (arguments
built by name the way `seed_conv2d` builds them), checked (its output buffer
starts as NaN, so an unwritten element fails), then timed with do_bench in
`--rounds` interleaved rounds (the config's time is the best round's median).
Also timed: the autotuned `seed_conv2d(configs="original" / "tuned")` as the
backend runs it. The seed's rule: a nearby variant is kept only if it gains
>= 2% over its original config (same block sizes), and the tuned set is worth
having only if its best nearby config beats the best original by >= 2%.

Writes <out>/<date>-<gpu>-seed.json and .md.

  python bench/seed_bench.py                  # results in bench/results/
  python bench/seed_bench.py --smoke          # tiny shape; CPU through TRITON_INTERPRET=1 without a GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
from conv_bench import SUITE, smoke_version  # noqa: E402  (no torch import at module level)

KEEP_GAIN = 0.02  # the seed's rule: revert a variant gaining under 2%


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default bench/results; /tmp/tritonconv_bench_smoke with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape; CPU through the Triton interpreter without a GPU")
    ap.add_argument("--ieee", action="store_true", help="exact fp32 (TF32 off for cuDNN and the seed kernel)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms (default 25)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench measuring time, ms (default 100)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per config (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed")
    return ap.parse_args(argv)


def config_name(cfg) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{blocks},warps={cfg.num_warps},stages={cfg.num_stages}"


def raw_launcher(cfg, x, w, b, stride, padding, dilation, precision):
    """fn() -> y running seed_conv2d_kernel with one config, its arguments built as the backend builds them."""
    import torch
    from conv_backend.epilogue import NO_TENSORS
    from conv_backend.kernels.epilogue_tl import IDENTITY_ARGS
    from conv_backend.kernels.seed import seed_conv2d_kernel, seed_launch_args
    from conv_backend.layout import conv_output_hw

    n, _, ih, iw = x.shape
    oc, _, kh, kw = w.shape
    oh, ow = conv_output_hw(ih, iw, kh, kw, stride, padding, dilation)
    y = torch.full((n, oc, oh, ow), float("nan"), dtype=x.dtype, device=x.device)  # unwritten -> NaN -> FAIL
    scalars, flags, grid_of = seed_launch_args(x, w, b, y, stride, padding, dilation, precision)
    grid = grid_of(cfg.kwargs)

    def run():
        seed_conv2d_kernel[grid](x, w, b if b is not None else y, y, *IDENTITY_ARGS.pointers(NO_TENSORS, y),
                                 *scalars, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y
    return run


def check(fn, ref, ref_norm, thr, device):
    """(rel_err, status) of one call of fn."""
    try:
        out = fn()
        bu.synchronize(device)
        err = bu.rel_err(out, ref, ref_norm)
    except bu.Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001
        lines = str(exc).strip().splitlines()
        return None, f"error: {type(exc).__name__}: {lines[0][:200] if lines else ''}"
    return err, ("ok" if err <= thr else "FAIL")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bu.init_runtime(args.smoke)
    bu.install_sigterm_handler()
    import torch
    import torch.nn.functional as F
    from conv_backend.kernels import seed as seed_mod

    precision_policy = bu.set_fp32_precision(args.ieee)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    base = next(p for p in SUITE if p.id == "kb80")
    prob = smoke_version(base) if args.smoke else base
    info = bu.versions(device)
    out_dir = args.out or bu.default_out(args.smoke)
    stem = bu.result_stem(info, args.smoke, suffix="-seed" + ("" if args.dtype == "fp32" else f"-{args.dtype}"))
    dt = bu.torch_dtype(args.dtype)
    precision = bu.kernel_precision(dt, device)
    thr = bu.threshold(args.dtype, precision_policy)
    timer = bu.make_timer(device, args.warmup, args.rep)
    flops = prob.flops()
    stride, padding, dilation = prob.stride, prob.padding, prob.dilation
    print(f"# {info['gpu']}: torch {info['torch']}, triton {info['triton']}, cuDNN {info['cudnn_version']}; "
          f"seed problem {prob.desc()} {args.dtype}, fp32 math {precision_policy}, kernel input_precision "
          f"{precision}; {flops / 1e9:.1f} GFLOP", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    x = torch.randn(prob.n, prob.ic, prob.h, prob.w, device=device).to(dt)
    w = bu.conv_weight(prob.oc, prob.ic, prob.kh, prob.kw, dt, device)
    ref = bu.reference_conv(x, w, None, stride, padding, dilation, 1)
    ref_norm = bu.vector_norm(ref)
    print(f"float64 reference: {time.perf_counter() - t0:.1f}s", flush=True)

    def tflops(ms):
        return flops / (ms * 1e-3) / 1e12 if ms else None

    configs = [("original", c) for c in seed_mod.ORIGINAL_CONFIGS] + [("nearby", c) for c in seed_mod.NEARBY_CONFIGS]
    entries, interrupted = [], None
    try:
        # 1. every config alone: check first
        for set_name, cfg in configs:
            e = {"set": set_name, "config": config_name(cfg), "kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps,
                 "num_stages": cfg.num_stages, "ms": None, "ms_rounds": [], "rel_err": None}
            try:
                e["fn"] = raw_launcher(cfg, x, w, None, stride, padding, dilation, precision)
                e["rel_err"], e["status"] = check(e["fn"], ref, ref_norm, thr, device)
            except bu.Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001
                e["status"] = f"error: {type(exc).__name__}: {str(exc).strip()[:200]}"
            print(f"  check {set_name:8s} {e['config']:50s} rel_err {bu.fmt_err(e['rel_err'])} {e['status']}",
                  flush=True)
            entries.append(e)
        # 2. timing, in interleaved rounds (drift hits every config alike)
        for _ in range(args.rounds):
            for e in entries:
                if e["status"] == "ok":
                    e["ms_rounds"].append(timer(e["fn"]))
    except (bu.Interrupted, KeyboardInterrupt) as exc:
        interrupted = f"interrupted ({exc or 'keyboard'})"
        print("!! " + interrupted, flush=True)
    for e in entries:
        if e["ms_rounds"]:
            e["ms"] = min(e["ms_rounds"])
        e.pop("fn", None)
        print(f"  {e['set']:8s} {e['config']:50s} {bu.fmt_ms(e['ms'])} ms  "
              f"rounds {[round(v, 4) for v in e['ms_rounds']]}", flush=True)

    # 3. the seed kernel as the backend runs it (Triton's autotuner over each set), and cuDNN
    others = {}
    if not interrupted:
        try:
            for set_name in ("original", "tuned"):
                def fn(set_name=set_name):
                    return seed_mod.seed_conv2d(x, w, None, stride, padding, dilation, precision, configs=set_name)
                err, status = check(fn, ref, ref_norm, thr, device)
                tuner = {"original": seed_mod.seed_conv2d_original, "tuned": seed_mod.seed_conv2d_tuned}[set_name]
                cfg = getattr(tuner, "best_config", None) if device == "cuda" else None
                ms = timer(fn) if status == "ok" else None
                others[f"autotuned_{set_name}"] = {"ms": ms, "rel_err": err, "status": status,
                                                   "config": config_name(cfg) if cfg is not None else
                                                   ("interpreter (one fixed config)" if device != "cuda" else None)}
            cl = torch.channels_last
            for lay, (xi, wi) in {"nchw": (x, w), "channels_last": (x.contiguous(memory_format=cl),
                                                                     w.contiguous(memory_format=cl))}.items():
                def fn(xi=xi, wi=wi):
                    return F.conv2d(xi, wi, None, stride, padding, dilation, 1)
                err, status = check(fn, ref, ref_norm, thr, device)
                others[f"cudnn_{lay}"] = {"ms": timer(fn) if status == "ok" else None, "rel_err": err, "status": status}
        except (bu.Interrupted, KeyboardInterrupt) as exc:
            interrupted = f"interrupted ({exc or 'keyboard'})"
            print("!! " + interrupted, flush=True)
    for k, v in others.items():
        print(f"  {k:22s} {bu.fmt_ms(v['ms'])} ms  rel_err {bu.fmt_err(v['rel_err'])} {v['status']}"
              + (f"  config {v['config']}" if v.get("config") else ""), flush=True)

    # 4. the seed's micro-tuning rule
    def best(items):
        items = [e for e in items if e["ms"] is not None]
        return min(items, key=lambda e: e["ms"]) if items else None
    originals = [e for e in entries if e["set"] == "original"]
    nearby = [e for e in entries if e["set"] == "nearby"]
    for e in nearby:
        parent = next((o for o in originals if o["kwargs"] == e["kwargs"]), None)
        e["parent"] = parent["config"] if parent else None
        if parent and parent["ms"] and e["ms"]:
            e["gain_vs_parent"] = parent["ms"] / e["ms"] - 1
            e["verdict"] = "keep" if e["gain_vs_parent"] >= KEEP_GAIN else "revert (gain < 2%)"
        else:
            e["gain_vs_parent"], e["verdict"] = None, "n/a"
    b_orig, b_near, b_all = best(originals), best(nearby), best(entries)
    gain = b_orig["ms"] / b_near["ms"] - 1 if b_orig and b_near else None
    cud = [v["ms"] for k, v in others.items() if k.startswith("cudnn") and v["ms"]]
    cudnn_best = min(cud) if cud else None
    summary = {
        "best_original": _brief(b_orig, tflops), "best_nearby": _brief(b_near, tflops),
        "best_tuned": _brief(b_all, tflops),
        "nearby_gain_vs_best_original": gain,
        "nearby_gain_at_least_2pct": None if gain is None else gain >= KEEP_GAIN,
        "kept_nearby_variants": [e["config"] for e in nearby if e.get("verdict") == "keep"],
        "cudnn_ms": others.get("cudnn_nchw", {}).get("ms"),
        "cudnn_cl_ms": others.get("cudnn_channels_last", {}).get("ms"),
        "cudnn_best_ms": cudnn_best,
        "best_original_vs_cudnn": cudnn_best / b_orig["ms"] if cudnn_best and b_orig else None,
        "best_tuned_vs_cudnn": cudnn_best / b_all["ms"] if cudnn_best and b_all else None,
    }
    lines = []
    if b_orig:
        lines.append(f"best original config: {b_orig['config']}: {bu.fmt_ms(b_orig['ms'])} ms "
                     f"({tflops(b_orig['ms']):.1f} TFLOP/s)")
    if b_all:
        lines.append(f"best of the tuned set (original + nearby): {b_all['config']} ({b_all['set']}): "
                     f"{bu.fmt_ms(b_all['ms'])} ms ({tflops(b_all['ms']):.1f} TFLOP/s)")
    if gain is not None:
        lines.append(f"best nearby variant {b_near['config']} vs best original: {gain * 100:+.1f}% -> "
                     + ("keep the nearby configs (gain >= 2%)" if gain >= KEEP_GAIN
                        else "revert to the original configs (gain < 2%, the seed's rule)"))
    if nearby:
        lines.append("nearby variants vs their original config: " + "; ".join(
            f"{e['config']}: {_pct(e['gain_vs_parent'])} {e['verdict']}" for e in nearby))
    if cudnn_best:
        lines.append(f"cuDNN: NCHW {bu.fmt_ms(summary['cudnn_ms'])} ms, channels_last "
                     f"{bu.fmt_ms(summary['cudnn_cl_ms'])} ms (best {tflops(cudnn_best):.1f} TFLOP/s); "
                     f"seed best original is {bu.fmt_x(summary['best_original_vs_cudnn'])} cuDNN, "
                     f"best tuned {bu.fmt_x(summary['best_tuned_vs_cudnn'])}")
    fails = [f"{e['set']} {e['config']}: {e['status']}" for e in entries if e["status"] != "ok"]
    fails += [f"{k}: {v['status']}" for k, v in others.items() if v["status"] != "ok"]
    lines.append("correctness: every output within its limit" if not fails else "NOT OK: " + "; ".join(fails))
    if interrupted:
        lines.append("!! " + interrupted)

    meta = dict(info, problem="kb80", desc=prob.desc(), shape=prob.shape_dict(), dtype=args.dtype,
                precision=precision_policy, input_precision=precision, flops=flops, threshold=thr,
                timing=(f"triton.testing.do_bench median, warmup {args.warmup:g} ms, rep {args.rep:g} ms, "
                        f"best of {args.rounds} interleaved rounds; cudnn.benchmark=True" if device == "cuda"
                        else "time.perf_counter (CPU smoke run, interpreter)"),
                smoke=args.smoke, command="python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                complete=interrupted is None, wall_s=time.perf_counter() - t0)
    for e in entries:
        e["tflops"] = tflops(e["ms"])
    data = dict(meta, configs=entries, **others, summary=summary)
    bu.write_json(out_dir / f"{stem}.json", bu.clean_json(data))

    headers = ["set", "config", "ms", "TFLOP/s", "rel_err", "vs its original", "verdict", "rounds ms"]
    trows = [[e["set"], e["config"], bu.fmt_ms(e["ms"]), "n/a" if e["ms"] is None else f"{tflops(e['ms']):.1f}",
              bu.fmt_err(e["rel_err"]) + ("" if e["status"] == "ok" else f" {e['status']}"),
              "" if e["set"] == "original" else _pct(e.get("gain_vs_parent")),
              e.get("verdict", ""), ", ".join(f"{v:.4f}" for v in e["ms_rounds"])] for e in entries]
    for k, v in others.items():
        trows.append([k, v.get("config") or "", bu.fmt_ms(v["ms"]), "n/a" if v["ms"] is None else f"{tflops(v['ms']):.1f}",
                      bu.fmt_err(v["rel_err"]) + ("" if v["status"] == "ok" else f" {v['status']}"), "", "", ""])
    md = [f"# Seed kernel on the seed problem: {info['gpu']}, {info['date']}", "",
          f"- problem: KernelBench level 1 #80, {prob.desc()}, {args.dtype}, {flops / 1e9:.1f} GFLOP",
          f"- torch {info['torch']}, triton {info['triton']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn_version')}",
          f"- fp32 math: {precision_policy} (kernel input_precision {precision}); limit rel_err <= {thr:g} vs float64 ATen",
          f"- timing: {meta['timing']}",
          "- each config launched alone through the raw `seed_conv2d_kernel`; `autotuned_*` = `seed_conv2d(configs=...)`"
          " (Triton's autotuner picks within the set, as the backend runs it)",
          f"- command: `{meta['command']}`", "",
          bu.md_table(headers, trows), "", "## Summary", ""] + [f"- {ln}" for ln in lines]
    bu.write_text(out_dir / f"{stem}.md", "\n".join(md) + "\n")
    print()
    print(bu.text_table(headers, trows))
    print()
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')}",
          flush=True)
    return 1 if interrupted else 0


def _pct(v):
    return "n/a" if v is None else f"{v * 100:+.1f}%"


def _brief(e, tflops):
    if not e:
        return None
    return {"set": e["set"], "config": e["config"], "ms": e["ms"], "tflops": tflops(e["ms"])}


if __name__ == "__main__":
    sys.exit(main())
