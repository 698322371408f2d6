#!/usr/bin/env python3
"""Whole torchvision models: eager, torch.compile (Inductor) and torch.compile(backend="tritonconv").

Per model and config (dtype, batch, channels_last; random weights, eval mode, no_grad, 224x224 input):
every variant is compiled first (its first call timed in seconds: tracing, compiling, tuning), then all are
timed in interleaved rounds (triton.testing.do_bench median after a 250 ms warm-up of the variant itself;
each keeps its best round), the same for every variant. Relative errors (||y - ref|| / ||ref||) are taken
against a float64 copy of the model (the same weights) on the same input. The convolutions our backend
replaced and kept are counted over all the graphs Dynamo captured.

Results merge into one JSON per day and GPU (rows keyed by model, dtype, batch and channels_last, replaced
on rerun), from which the Markdown table and the bar chart are rewritten, so a long suite can be split into
runs of a few models each:

  python bench/model_bench.py --models resnet18,mobilenet_v2 --configs fp32-b32
  python bench/model_bench.py --modes reduce-overhead,max-autotune --options '{"input_precision": "ieee"}'
  python bench/model_bench.py --cold           # first-call seconds in fresh processes with empty caches
  python bench/model_bench.py --device cpu --models squeezenet1_1 --configs fp32-b1 --size 32   # interpreter
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

sys.path[1:1] = [str(bu.REPO), str(bu.REPO / "examples")]  # this checkout's conv_backend, the examples' helpers
from _common import check_options, choose_device  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_800mf",
          "densenet121", "vgg16_bn", "squeezenet1_1", "shufflenet_v2_x1_0", "convnext_tiny")
CONFIGS = ("fp32-b32", "fp32-b1", "bf16cl-b32")
MODES = ("reduce-overhead", "max-autotune", "no-cudagraphs")
# A tritonconv-only variant: options cudagraphs=False, kernel by kernel as torch.compile's default runs, so its
# host cost shows next to the default's CUDA graphs; compared with torch.compile's default.
OURS_ONLY = {"no-cudagraphs": {"cudagraphs": False}}
COMPILERS = ("compile", "tritonconv")
ROW_KEY = ("model", "dtype", "batch", "channels_last")
# Every row has these (None where a variant failed); modes add <compiler>_<mode>_ms and _first_s.
MEASURED = ("eager_ms", "compile_ms", "tritonconv_ms", "compile_first_s", "tritonconv_first_s", "eager_rel_err",
            "tritonconv_rel_err", "convs_replaced", "convs_kept")


def parse_config(name: str) -> dict:
    """'bf16cl-b32' -> dtype bf16, channels_last, batch 32."""
    m = re.fullmatch(r"(fp32|bf16|fp16)(cl)?-b(\d+)", name)
    if not m:
        raise ValueError(f"config {name!r}: expected <fp32|bf16|fp16>[cl]-b<batch>, e.g. {', '.join(CONFIGS)}")
    return {"dtype": m.group(1), "batch": int(m.group(3)), "channels_last": bool(m.group(2))}


def config_name(row: dict) -> str:
    return f"{row['dtype']}{'cl' if row['channels_last'] else ''}-b{row['batch']}"


def mode_key(compiler: str, mode: str | None) -> str:
    """compile / tritonconv, or e.g. compile_reduce_overhead for a mode other than the default."""
    return compiler if mode is None else f"{compiler}_{mode.replace('-', '_')}"


# ----------------------------------------------------------------------------------------------
# Measuring


def build_model(name: str, config: dict, device: str):
    """(model, float64 copy of the same weights, input, its float64 copy)."""
    import torch
    import torchvision
    torch.manual_seed(0)
    dtype = bu.torch_dtype(config["dtype"])
    fmt = torch.channels_last if config["channels_last"] else torch.contiguous_format
    model = getattr(torchvision.models, name)(weights=None).eval().to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(config["batch"], 3, config["size"], config["size"], device=device).to(dtype=dtype,
                                                                                          memory_format=fmt)
    return model, copy.deepcopy(model).double(), x, x.double()


def compile_variant(compiler: str, mode: str | None, model, options: dict, reports: list):
    import torch
    if compiler == "compile":
        return torch.compile(model, mode=mode)
    import conv_backend
    if mode in OURS_ONLY:
        options, mode = {**options, **OURS_ONLY[mode]}, None

    # What torch.compile(backend="tritonconv", options=..., mode=...) does, but torch.compile refuses mode and
    # options together, and this way the reports of every graph are collected.
    def tritonconv(gm, example_inputs):
        return conv_backend.tritonconv_backend(gm, example_inputs, options=options, mode=mode,
                                               report_sink=reports.append)
    return torch.compile(model, backend=tritonconv)


def first_call(fn, x, device: str):
    """(output, seconds of the first call)."""
    import torch
    start = time.perf_counter()
    with torch.no_grad():
        y = fn(x)
    bu.synchronize(device)
    return y, time.perf_counter() - start


def first_call_setting(args) -> str:
    return "cold: a fresh process per compiler, empty caches" if args.cold else "in the timing process, caches as found"


def measure_row(name: str, config: dict, args, device: str, timer) -> dict:
    import torch
    row = {"model": name, "dtype": config["dtype"], "batch": config["batch"],
           "channels_last": config["channels_last"], "size": config["size"], "options": args.options,
           "first_call": first_call_setting(args), **dict.fromkeys(MEASURED)}
    errors = {}
    torch._dynamo.reset()
    model, model64, x, x64 = build_model(name, config, device)
    with torch.no_grad():
        ref = model64(x64)
    del model64, x64
    ref_norm = bu.vector_norm(ref)

    def check(key, y):
        row[f"{key}_rel_err"] = bu.rel_err(y, ref, ref_norm)

    variants = {"eager": model}
    check("eager", first_call(model, x, device)[0])
    reports = []
    for mode in [None] + args.modes:
        for compiler in COMPILERS:
            key = mode_key(compiler, mode)
            if compiler == "compile" and mode in OURS_ONLY:
                continue
            try:
                fn = compile_variant(compiler, mode, model, args.options, reports if key == "tritonconv" else [])
                y, seconds = first_call(fn, x, device)
                check(key, y)
                del y
                variants[key] = fn
                if not args.cold:
                    row[f"{key}_first_s"] = seconds
            except bu.Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing variant is a result; the run goes on
                errors[key] = _short(exc)
    decisions = [d for report in reports for d in report.decisions]
    row["convs_replaced"] = sum(d.replaced for d in decisions)
    row["convs_kept"] = len(decisions) - row["convs_replaced"]

    best = {}
    for _ in range(args.rounds):  # interleaved: a slow patch of the GPU's clock does not decide a comparison
        for key, fn in list(variants.items()):
            try:
                with torch.no_grad():
                    best[key] = min(best.get(key, float("inf")), timer(lambda: fn(x)))
            except bu.Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001
                errors[key] = "while timing: " + _short(exc)
                del variants[key]
    for key, ms in best.items():
        row[f"{key}_ms"] = ms
    if errors:
        row["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
    del variants, model, x, ref
    return row


def cold_first_calls(name: str, config_spec: str, args) -> dict:
    """First-call seconds of each compiler, each in a fresh process with empty Inductor, Triton and tuning caches."""
    out = {}
    for compiler in COMPILERS:
        with tempfile.TemporaryDirectory(prefix="tritonconv-cold-") as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton",
                       XDG_CACHE_HOME=f"{tmp}/xdg")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bu.REPO), env.get("PYTHONPATH")]))
            cmd = [sys.executable, __file__, "--first-call-only", compiler, "--models", name, "--configs", config_spec,
                   "--size", str(args.size), "--device", args.device, "--options", json.dumps(args.options)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if args.cold_logs is not None:  # e.g. with TORCH_LOGS=+conv_backend: where the first call's time went
                args.cold_logs.mkdir(parents=True, exist_ok=True)
                (args.cold_logs / f"{name}-{config_spec}-{compiler}.log").write_text(proc.stderr)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                out[f"{compiler}_cold_error"] = f"exit {proc.returncode}: {tail[:200]}"
                continue
            out[f"{compiler}_first_s"] = json.loads(lines[-1])["first_s"]
    return out


def first_call_only(compiler: str, name: str, config: dict, args, device: str) -> None:
    """The --cold child: one compiler's first call, printed as JSON."""
    model, _, x, _ = build_model(name, config, device)
    _, seconds = first_call(compile_variant(compiler, None, model, args.options, []), x, device)
    print(json.dumps({"first_s": seconds}), flush=True)


def _short(exc) -> str:
    """The innermost exception's type and first line (Dynamo wraps a backend's error in BackendCompilerFailed)."""
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# ----------------------------------------------------------------------------------------------
# Results: merged JSON, Markdown, chart


def merge_rows(old_rows: list, new_rows: list) -> list:
    """Rows of both, a new row replacing an old one with the same model, dtype, batch and channels_last;
    sorted by model (in MODELS order), then dtype, layout and batch (as CONFIGS)."""
    merged = {tuple(r[k] for k in ROW_KEY): r for r in old_rows}
    merged.update({tuple(r[k] for k in ROW_KEY): r for r in new_rows})
    order = {m: i for i, m in enumerate(MODELS)}
    dtypes = {d: i for i, d in enumerate(("fp32", "bf16", "fp16"))}
    return sorted(merged.values(), key=lambda r: (order.get(r["model"], len(MODELS)), r["model"],
                                                  dtypes[r["dtype"]], r["channels_last"], -r["batch"]))


def ratio(row: dict, num: str, den: str):
    a, b = row.get(num), row.get(den)
    return a / b if a and b else None


def mode_pairs(rows: list) -> list:
    """(compile key, tritonconv key) of every mode some row has, the default first; a tritonconv-only mode
    (OURS_ONLY) is paired with torch.compile's default."""
    pairs = [("compile", "tritonconv")]
    for mode in MODES:
        comp, ours = mode_key("compile", mode), mode_key("tritonconv", mode)
        if any(f"{comp}_ms" in r or f"{ours}_ms" in r for r in rows):
            pairs.append(("compile" if mode in OURS_ONLY else comp, ours))
    return pairs


def geomeans(rows: list) -> dict:
    """{config: {"compile/tritonconv": g, "eager/tritonconv": g, per mode ...}} over the rows that have both."""
    out = {}
    for cfg in dict.fromkeys(config_name(r) for r in rows):
        sel = [r for r in rows if config_name(r) == cfg]
        stats = {}
        for comp, ours in mode_pairs(rows):
            stats[f"{comp}/{ours}"] = bu.geomean([ratio(r, f"{comp}_ms", f"{ours}_ms") for r in sel])
        stats["eager/tritonconv"] = bu.geomean([ratio(r, "eager_ms", "tritonconv_ms") for r in sel])
        out[cfg] = stats
    return out


def markdown(data: dict) -> str:
    rows = data["rows"]
    pairs = mode_pairs(rows)
    options = sorted({json.dumps(r.get("options") or {}, sort_keys=True) for r in rows})
    first = sorted({r.get("first_call", "?") for r in rows})
    environments = sorted({json.dumps(r.get("environment") or {}, sort_keys=True) for r in rows})
    md = [f"# tritonconv model benchmark: {data['gpu']}, {data['date']}", "",
          f"- torch {data['torch']}, triton {data['triton']}; torchvision models, random weights, eval mode, "
          "no_grad; cudnn.benchmark=True for every variant",
          f"- tritonconv options: {', '.join(f'`{o}`' for o in options)}",
          f"- TRITONCONV_* environment: {', '.join(f'`{e}`' for e in environments)}",
          f"- timing: {data.get('timing')}",
          f"- first call (seconds: trace, compile, tune, run): {'; '.join(first)}",
          "- rel err: ||y - ref|| / ||ref|| against a float64 copy of the model (same weights, same input)",
          "- `x` columns: time of the other / time of tritonconv (above 1: tritonconv faster)", ""]
    headers = ["model", "config", "eager ms", "compile ms", "tritonconv ms", "compile/ours", "eager/ours"]
    for comp, ours in pairs[1:]:
        mode = ours[len("tritonconv_"):].replace("_", "-")
        headers += ([] if comp == "compile" else [f"compile {mode} ms"]) + [f"tritonconv {mode} ms", f"x ({mode})"]
    headers += ["compile first s", "ours first s", "eager err", "ours err", "convs ours/ATen", "error"]
    table = []
    for r in rows:
        line = [r["model"], config_name(r), bu.fmt_ms(r.get("eager_ms")), bu.fmt_ms(r.get("compile_ms")),
                bu.fmt_ms(r.get("tritonconv_ms")), bu.fmt_x(ratio(r, "compile_ms", "tritonconv_ms")),
                bu.fmt_x(ratio(r, "eager_ms", "tritonconv_ms"))]
        for comp, ours in pairs[1:]:
            line += (([] if comp == "compile" else [bu.fmt_ms(r.get(f"{comp}_ms"))])
                     + [bu.fmt_ms(r.get(f"{ours}_ms")), bu.fmt_x(ratio(r, f"{comp}_ms", f"{ours}_ms"))])
        line += [_fmt_s(r.get("compile_first_s")), _fmt_s(r.get("tritonconv_first_s")),
                 bu.fmt_err(r.get("eager_rel_err")), bu.fmt_err(r.get("tritonconv_rel_err")),
                 f"{r.get('convs_replaced', 'n/a')}/{r.get('convs_kept', 'n/a')}", r.get("error", "")]
        table.append(line)
    md += [bu.md_table(headers, table), "", "## Geometric means per config", ""]
    for cfg, stats in geomeans(rows).items():
        md.append(f"- {cfg}: " + ", ".join(f"{k} {bu.fmt_x(v)}" for k, v in stats.items()))
    return "\n".join(md) + "\n"


def _fmt_s(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def write_chart(data: dict, path: Path):
    """Bars of compile_ms / tritonconv_ms per model, one per config; None (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"no bar chart ({type(exc).__name__}: {exc}); matplotlib is needed for the PNG", flush=True)
        return None
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    configs = list(dict.fromkeys(config_name(r) for r in rows))
    by_key = {(r["model"], config_name(r)): ratio(r, "compile_ms", "tritonconv_ms") for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(models) + 2), 5))
    width = 0.8 / max(1, len(configs))
    for i, cfg in enumerate(configs):
        pos = [m - 0.4 + width * (i + 0.5) for m in range(len(models))]
        ax.bar(pos, [by_key.get((m, cfg)) or float("nan") for m in models], width, label=cfg)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("torch.compile time / tritonconv time (higher: tritonconv faster)")
    ax.set_title(f"tritonconv vs torch.compile: {data['gpu']}, torch {data['torch']}, triton {data['triton']}, "
                 f"{data['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(path: Path, meta: dict, rows: list, chart: bool) -> list:
    """Merge `rows` into the JSON at `path` (if any), then rewrite it, its .md and (with `chart`) its .png."""
    old = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    data = dict(meta, rows=merge_rows(old, rows))
    bu.write_json(path, bu.clean_json(data))
    bu.write_text(path.with_suffix(".md"), markdown(data))
    written = [path, path.with_suffix(".md")]
    if chart and data["rows"]:
        png = write_chart(data, path.with_suffix(".png"))
        written += [png] if png else []
    return written


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="models: " + ", ".join(MODELS))
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names (default: all)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated <dtype>[cl]-b<batch> (default {','.join(CONFIGS)}; cl = channels_last)")
    ap.add_argument("--options", type=json.loads, default={}, help="tritonconv options as JSON")
    ap.add_argument("--modes", default="",
                    help=f"also these torch.compile modes, for both compilers ({','.join(MODES)}; "
                         "no-cudagraphs: only tritonconv, with options cudagraphs=False)")
    ap.add_argument("--cold", action="store_true",
                    help="first-call seconds from a fresh process per model, config and compiler, with empty "
                         "TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and XDG_CACHE_HOME (our tuning cache)")
    ap.add_argument("--cold-logs", type=Path, default=None, metavar="DIR",
                    help="with --cold: write each fresh process's stderr to DIR/<model>-<config>-<compiler>.log "
                         "(set TORCH_LOGS=+conv_backend for the tuning's per-problem lines)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON to merge into, or a directory for <date>-<gpu>-models.json (default "
                         "bench/results; /tmp/tritonconv_bench_smoke on CPU)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="cpu: Triton's interpreter, for checking the script on tiny inputs")
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    # Each variant first runs alone this long, so it is timed at the clock it sustains (as conv_bench.py does).
    ap.add_argument("--warmup", type=float, default=250.0, help="do_bench warm-up, ms (default 250)")
    ap.add_argument("--rep", type=float, default=200.0,
                    help="do_bench measuring time, ms (default 200: a forward pass can take tens of ms)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 3; 1 on CPU); 0 with --cold: first calls only")
    ap.add_argument("--skip-done", action="store_true",
                    help="skip the models and configs that already have a row in the result JSON")
    ap.add_argument("--stop-after", type=float, default=None, metavar="S",
                    help="start no new model and config after S seconds (a run that must end within a time limit "
                         "keeps every row it finished)")
    ap.add_argument("--first-call-only", choices=COMPILERS, help=argparse.SUPPRESS)  # the --cold child
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    try:
        args.config_specs = [c for c in args.configs.split(",") if c]
        args.configs = [dict(parse_config(c), size=args.size) for c in args.config_specs]
    except ValueError as exc:
        ap.error(str(exc))
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES):
        ap.error(f"--modes takes {', '.join(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = choose_device(args.device)  # sets TRITON_INTERPRET=1 for CPU, before conv_backend is imported
    check_options(args.options)
    import torch
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    # every variant of a row compiles the same forward: room for all of them and for their modes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if args.first_call_only:
        first_call_only(args.first_call_only, args.models[0], args.configs[0], args, device)
        return 0
    bu.install_sigterm_handler()
    if args.rounds is None:
        args.rounds = 3 if device == "cuda" else 1
    info = bu.versions(device)
    smoke = device == "cpu"
    out = args.out or bu.default_out(smoke)
    if out.is_dir() or not out.suffix:
        out = out / f"{bu.result_stem(info, smoke, '-models')}.json"
    timing = (f"triton.testing.do_bench median, warm-up {args.warmup:g} ms, rep {args.rep:g} ms, best of "
              f"{args.rounds} interleaved rounds" if device == "cuda" else "CPU smoke run (interpreter): one call")
    meta = {"gpu": info["gpu"], "torch": info["torch"], "triton": info["triton"], "date": info["date"],
            "options": args.options, "timing": timing}
    timer = bu.make_timer(device, args.warmup, args.rep, cpu_reps=1)
    print(f"# {info['gpu']}: torch {info['torch']}, triton {info['triton']}; {len(args.models)} models x "
          f"{len(args.configs)} configs; results -> {out}", flush=True)
    done = set()
    if args.skip_done and out.exists():
        done = {tuple(r[k] for k in ROW_KEY) for r in json.loads(out.read_text()).get("rows", [])}
    rows, status, t0 = [], 0, time.perf_counter()
    try:
        for name in args.models:
            for spec, config in zip(args.config_specs, args.configs):
                if (name, config["dtype"], config["batch"], config["channels_last"]) in done:
                    print(f"{name} {spec}: in {out} already (--skip-done)", flush=True)
                    continue
                if args.stop_after is not None and time.perf_counter() - t0 >= args.stop_after:
                    print(f"{name} {spec}: not started, --stop-after {args.stop_after:g} s reached", flush=True)
                    continue
                start = time.perf_counter()
                print(f"{name} {spec} ...", flush=True)
                try:
                    row = (dict(dict.fromkeys(MEASURED), model=name, dtype=config["dtype"], batch=config["batch"],
                                channels_last=config["channels_last"], first_call=first_call_setting(args))
                           if args.cold and args.rounds == 0
                           else measure_row(name, config, args, device, timer))
                except (bu.Interrupted, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the reference
                    row = dict(dict.fromkeys(MEASURED), model=name, dtype=config["dtype"], batch=config["batch"],
                               channels_last=config["channels_last"], error=_short(exc))
                if args.cold:
                    row.update(cold_first_calls(name, spec, args))
                # settings that change what a row measures (e.g. TRITONCONV_COMPILE_PROCESSES for first calls)
                row["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TRITONCONV_")}
                rows.append(row)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(f"  eager {bu.fmt_ms(row.get('eager_ms'))} ms, compile {bu.fmt_ms(row.get('compile_ms'))} ms, "
                      f"tritonconv {bu.fmt_ms(row.get('tritonconv_ms'))} ms "
                      f"(compile/ours {bu.fmt_x(ratio(row, 'compile_ms', 'tritonconv_ms'))}); first call "
                      f"{_fmt_s(row.get('compile_first_s'))} / {_fmt_s(row.get('tritonconv_first_s'))} s; rel err "
                      f"eager {bu.fmt_err(row.get('eager_rel_err'))}, ours {bu.fmt_err(row.get('tritonconv_rel_err'))}; "
                      f"convs {row.get('convs_replaced')}/{row.get('convs_kept')}; {time.perf_counter() - start:.0f}s"
                      + (f"\n  error: {row['error']}" if row.get("error") else ""), flush=True)
                save(out, meta, rows, chart=False)
    except (bu.Interrupted, KeyboardInterrupt) as exc:
        print(f"!! interrupted ({exc or 'keyboard'}) after {len(rows)} rows", flush=True)
        status = 1
    written = save(out, meta, rows, chart=True)
    print(markdown(json.loads(out.read_text())))
    print("wrote " + ", ".join(map(str, written)), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
