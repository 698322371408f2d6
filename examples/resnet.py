#!/usr/bin/env python3
"""A torchvision ResNet compiled with the tritonconv backend, checked against eager, with the report.

    python examples/resnet.py                              # ResNet-18; GPU if present, else CPU (interpreter)
    python examples/resnet.py --arch resnet50 --batch 32 --dtype bfloat16 --channels-last
    python examples/resnet.py --options '{"input_precision": "ieee"}'

The model has random weights (weights=None: nothing is downloaded) and runs in
eval mode under torch.no_grad(). Its output is compared with a float64 eager
run of the same model (relative error = ||y - ref|| / ||ref||), next to
the float32 eager run's own error. The backend's report then lists every
convolution: on Triton (with the kernel chosen) or kept on ATen, and why. On a
GPU both the compiled and the eager model are timed (triton.testing.do_bench,
median). Without a GPU the model runs on CPU through Triton's interpreter on a
1x3x32x32 input; that takes a few minutes for ResNet-18, almost all of it in
the interpreter. Exits with status 1 when the check fails.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from _common import add_common_args, fp32_math, rel_err, report_speed, setup_example

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
GPU_INPUT = (32, 224)  # batch, image size
CPU_INPUT = (1, 32)    # the interpreter's cost is per kernel tile: keep every feature map small
# Allowed relative error vs float64 for the whole network, per math mode.
TOLERANCE = {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 1e-2, "tf32_round": 1e-2, "bfloat16": 5e-2, "float16": 5e-2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHS, default="resnet18")
    add_common_args(parser)
    parser.add_argument("--batch", type=int, help=f"batch size (default {GPU_INPUT[0]}; {CPU_INPUT[0]} on CPU)")
    parser.add_argument("--size", type=int, help=f"image height and width (default {GPU_INPUT[1]}; "
                                                 f"{CPU_INPUT[1]} on CPU)")
    args = parser.parse_args()

    device, dtype, memory_format = setup_example(args)  # sets TRITON_INTERPRET=1 for CPU, before triton is imported
    import torchvision  # noqa: E402
    import conv_backend  # noqa: E402

    default_batch, default_size = GPU_INPUT if device == "cuda" else CPU_INPUT
    batch, size = args.batch or default_batch, args.size or default_size
    print(f"model: torchvision {args.arch} (random weights, eval mode), input {batch}x3x{size}x{size} "
          f"{args.dtype}{', channels_last' if args.channels_last else ''}, options {args.options or {}}")
    if device == "cpu":
        print("NOTE: no GPU in use, so this runs on CPU through Triton's interpreter, on a small input "
              f"({batch}x3x{size}x{size} instead of {GPU_INPUT[0]}x3x{GPU_INPUT[1]}x{GPU_INPUT[1]}); "
              "it checks correctness only, no timings.")

    model = getattr(torchvision.models, args.arch)(weights=None).eval()
    reference_model = copy.deepcopy(model).to(device=device, dtype=torch.float64)
    model = model.to(device=device, dtype=dtype, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device).to(dtype=dtype, memory_format=memory_format)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # let eager cuDNN pick its fastest algorithms

    compiled = torch.compile(model, backend="tritonconv", options=args.options or None)
    start = time.perf_counter()
    with torch.no_grad():
        y = compiled(x)
        if device == "cuda":
            torch.cuda.synchronize()
        first_call = time.perf_counter() - start
        y_eager = model(x)
        ref = reference_model(x.double())
    report = conv_backend.last_report()
    print(f"first compiled call (trace, compile{', tune' if device == 'cuda' else ''}, run): {first_call:.1f} s")
    print(report)

    math = args.dtype if dtype != torch.float32 else fp32_math(args.options, device)
    eager_err = rel_err(y_eager, ref)
    tol = max(TOLERANCE[math], 2 * eager_err)
    err = rel_err(y, ref)
    ok = y.shape == ref.shape and bool(torch.isfinite(y).all()) and err <= tol
    print(f"check: logits {tuple(y.shape)}; relative error vs float64: tritonconv {err:.2e}, eager {eager_err:.2e} "
          f"(math: {math}; allowed {tol:.1e}); max |tritonconv - eager| = "
          f"{(y.double() - y_eager.double()).abs().max().item():.2e} -> {'PASS' if ok else 'FAIL'}")
    if not ok:
        return 1
    opts = conv_backend.BackendOptions.from_mapping(args.options)
    if report is not None and opts.enabled and opts.algorithm == "auto" and not report.replaced:
        print("FAIL: the backend kept every convolution on ATen; ResNet's convolutions should run on Triton")
        return 1

    if device == "cuda":
        report_speed(compiled, model, x, "time per forward", "eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
