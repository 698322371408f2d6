"""Host-side cost of one convolution launch, piece by piece (GPU only).

Usage: python bench/probe_host.py   (prints microseconds per call and a cProfile of launch_conv2d)
"""
import cProfile
import pstats
import sys
from pathlib import Path

import torch
import triton

from conv_backend import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import host_us  # noqa: E402


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    x = torch.randn(32, 256, 14, 14, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, device="cuda", dtype=torch.bfloat16) / 48).to(memory_format=torch.channels_last)
    args = ((1, 1), (1, 1), (1, 1), 1)
    for algo in ("gemm_pointer", "gemm_tma"):
        f = lambda: dispatch.launch_conv2d(x, w, None, *args, algorithm=algo)
        print(f"{algo}: launch_conv2d {host_us(f, 2000):.1f} us")
        f = lambda: torch.ops.tritonconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, "auto", algo)
        print(f"{algo}: torch.ops.tritonconv.conv2d {host_us(f, 2000):.1f} us")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            dispatch.launch_conv2d(x, w, None, *args, algorithm=algo)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    f = lambda: torch.nn.functional.conv2d(x, w, None, *args)
    print(f"F.conv2d {host_us(f, 2000):.1f} us")
    print(f"torch.empty {host_us(lambda: torch.empty(100, device='cuda')):.1f} us")
    print(f"x.contiguous(cl) {host_us(lambda: x.contiguous(memory_format=torch.channels_last)):.1f} us")


if __name__ == "__main__":
    main()
