#!/usr/bin/env python3
"""The seed's KernelBench problem (level 1, #80) compiled with the tritonconv backend.

A standard 2D convolution with an asymmetric kernel, dilation and padding:
batch 8, 32 -> 64 channels, 512x512 input, kernel (5, 9), stride 1,
padding (2, 4), dilation (2, 3), no bias.

    python examples/kernelbench_conv.py                      # GPU if present, else CPU (interpreter)
    python examples/kernelbench_conv.py --dtype bfloat16 --channels-last
    python examples/kernelbench_conv.py --options '{"input_precision": "ieee"}'
    python examples/kernelbench_conv.py --options '{"algorithm": "seed"}'   # the seed kernel

The compiled model is checked against a float64 eager reference (relative
error = ||y - ref|| / ||ref||); on a GPU it is then timed against eager
(cuDNN) with triton.testing.do_bench (median). On a machine without a GPU it
runs on CPU through Triton's interpreter with a shrunken input (batch 1,
24x24; channels, kernel, stride, padding and dilation unchanged) and does not
time anything. Exits with status 1 when the check fails.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn

from _common import add_common_args, fp32_math, rel_err, report_speed, setup_example


class Model(nn.Module):
    """KernelBench level 1, #80: conv2d, square input, asymmetric kernel, dilated and padded."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple, stride: int = 1,
                 padding: tuple = (0, 0), dilation: tuple = (1, 1), bias: bool = False):
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(x)


# The problem, exactly as the seed states it.
batch_size = 8
in_channels = 32
out_channels = 64
kernel_size = (5, 9)
width = 512
height = 512
stride = 1
padding = (2, 4)
dilation = (2, 3)
bias = False

# What the CPU run uses instead: Triton's interpreter executes kernels in numpy.
CPU_BATCH, CPU_SIZE = 1, 24


def get_init_inputs():
    return [in_channels, out_channels, kernel_size, stride, padding, dilation, bias]


def get_inputs(batch: int = batch_size, h: int = height, w: int = width):
    return [torch.randn(batch, in_channels, h, w)]


# Allowed relative error vs float64, per math mode.
TOLERANCE = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2e-3, "tf32_round": 2e-3, "bfloat16": 1e-2, "float16": 1e-2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--batch", type=int, help=f"batch size (default {batch_size}; {CPU_BATCH} on CPU)")
    parser.add_argument("--size", type=int, help=f"input height and width (default {height}; {CPU_SIZE} on CPU)")
    args = parser.parse_args()

    device, dtype, memory_format = setup_example(args)  # sets TRITON_INTERPRET=1 for CPU, before triton is imported
    import conv_backend  # noqa: E402  (after setup_example, on purpose)

    full = (batch_size, height, width)
    batch = args.batch or (batch_size if device == "cuda" else CPU_BATCH)
    size = args.size or (height if device == "cuda" else CPU_SIZE)
    print(f"problem: KernelBench level 1 #80, input {batch}x{in_channels}x{size}x{size}, {in_channels}->"
          f"{out_channels} channels, kernel {kernel_size}, stride {stride}, padding {padding}, dilation {dilation}, "
          f"bias {bias}, {args.dtype}{', channels_last' if args.channels_last else ''}")
    if device == "cpu" and (batch, size, size) != full:
        print(f"NOTE: no GPU in use, so this runs on CPU through Triton's interpreter, with the input shrunk "
              f"from {full[0]}x{in_channels}x{full[1]}x{full[2]} to {batch}x{in_channels}x{size}x{size} "
              f"(the interpreter is slow); no timings on CPU.")

    model = Model(*get_init_inputs()).to(device=device, dtype=dtype, memory_format=memory_format).eval()
    x = get_inputs(batch, size, size)[0].to(device=device, dtype=dtype, memory_format=memory_format)
    reference_model = copy.deepcopy(model).double()
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # let eager cuDNN pick its fastest algorithm

    compiled = torch.compile(model, backend="tritonconv", options=args.options or None)
    with torch.no_grad():
        y = compiled(x)
        y_eager = model(x)
        ref = reference_model(x.double())
    report = conv_backend.last_report()
    print(report)

    math = args.dtype if dtype != torch.float32 else fp32_math(args.options, device)
    eager_err = rel_err(y_eager, ref)
    tol = max(TOLERANCE[math], 2 * eager_err)
    err = rel_err(y, ref)
    ok = y.shape == ref.shape and y.dtype == dtype and err <= tol
    print(f"check: output {tuple(y.shape)} {str(y.dtype).replace('torch.', '')}; relative error vs float64: "
          f"tritonconv {err:.2e}, eager {eager_err:.2e} (math: {math}; allowed {tol:.1e}) -> "
          f"{'PASS' if ok else 'FAIL'}")
    if not ok:
        return 1

    if device == "cuda":
        report_speed(compiled, model, x, "time", "eager (cuDNN)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
