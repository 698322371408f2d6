"""Helpers shared by the examples: device choice, options, error metric, timing.

Nothing here imports triton or conv_backend at module level: Triton reads
TRITON_INTERPRET when our kernels are defined, so `choose_device` must run
(and set it for CPU runs) before the first import of either.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: the GPU if one is visible (and TRITON_INTERPRET is not set), else the CPU "
                             "through Triton's interpreter")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--channels-last", action="store_true", help="run the model and input in channels_last")
    parser.add_argument("--options", type=json.loads, default={},
                        help='backend options as JSON, e.g. \'{"input_precision": "ieee"}\'')
    parser.add_argument("--seed", type=int, default=0)


def choose_device(requested: str) -> str:
    """'cuda' or 'cpu'; for 'cpu' turns on Triton's interpreter (before triton is imported)."""
    import torch  # importing torch does not import triton

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() and not interpreter_requested() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no CUDA GPU")
        if interpreter_requested():
            sys.exit("error: TRITON_INTERPRET is set, which runs Triton kernels on CPU tensors only; "
                     "unset it to run on the GPU")
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    return requested


def setup_example(args):
    """Common start of an example: device (the interpreter for CPU, set before triton is imported),
    options checked, RNG seeded, environment printed. Returns (device, dtype, memory_format)."""
    import torch

    device = choose_device(args.device)
    check_options(args.options)
    torch.manual_seed(args.seed)
    print(describe_environment(device))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return device, getattr(torch, args.dtype), memory_format


def check_options(options) -> None:
    """Fail early, with the list of valid names, on a bad --options value."""
    from conv_backend import BackendOptions

    if not isinstance(options, dict):
        sys.exit(f"error: --options must be a JSON object, got {options!r}")
    try:
        BackendOptions.from_mapping(options)
    except (TypeError, ValueError) as exc:
        sys.exit(f"error: {exc}")


def fp32_math(options, device: str) -> str:
    """How the backend multiplies fp32 operands here: 'tf32', 'tf32x3' or 'ieee' ('auto' gives the loosest
    its layers may use: 'tf32' where cuDNN's setting allows TF32)."""
    from conv_backend.runtime import resolve_input_precision
    import torch

    if device == "cpu":
        return "ieee"  # the interpreter computes tl.dot in exact fp32 whatever the setting
    return resolve_input_precision(options.get("input_precision", "auto"), torch.float32)


def rel_err(y, ref) -> float:
    """||y - ref|| / ||ref|| (Frobenius norms) in float64, as the tests and the benchmark measure it.

    NaN or inf anywhere in y gives NaN or inf, which fails every tolerance check.
    """
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def describe_environment(device: str) -> str:
    import torch
    import triton

    where = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if device == "cuda"
             else "CPU, Triton interpreter (TRITON_INTERPRET=1)")
    return (f"device: {where}\n"
            f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")


def bench_ms(fn) -> float:
    """Median time of fn() in milliseconds (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def report_speed(compiled, model, x, what: str, baseline: str) -> None:
    """Time compiled(x) against model(x) under no_grad and print both and the ratio."""
    import torch

    with torch.no_grad():
        t_ours = bench_ms(lambda: compiled(x))
        t_eager = bench_ms(lambda: model(x))
    print(f"{what} (median, triton.testing.do_bench): tritonconv {t_ours:.3f} ms, {baseline} "
          f"{t_eager:.3f} ms -> speed-up {t_eager / t_ours:.2f}x")
