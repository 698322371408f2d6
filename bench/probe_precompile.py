"""A first call's compiling: compile threads, Inductor's compile pool (the default) and worker processes of our own.

    python bench/probe_precompile.py [--processes inductor,0,2,16] [--level fast]

Times backend.make_plans, the work of a graph's first compile, for five ResNet-50
layers (bf16, channels_last, batch 32) on any machine, GPU or not: Triton's JIT
compiles for a Hopper target through a compile-only driver and launches nothing;
the tuner's clock is a stand-in. The tensors are on the CPU, so the candidates
are the pointer and NCHW kernels' (the TMA and Gluon kernels are offered for
CUDA tensors only). Each setting runs in a fresh process with empty Triton and
tuning caches; its values are TRITONCONV_COMPILE_PROCESSES's: "inductor" is
Inductor's compile pool (started, as a compile would, before the clock starts:
Inductor's own kernels need it anyway), 0 the compile threads alone, N > 0 N
processes of our own.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
# (input channels, output channels, kernel, stride, map side) of ResNet-50 layers
LAYERS = [(64, 64, 3, 1, 56), (256, 64, 1, 1, 56), (128, 128, 3, 2, 56), (512, 128, 1, 1, 28), (256, 256, 3, 1, 14)]


def compile_only_session() -> SimpleNamespace:
    """Make this process compile for Hopper without a GPU: Triton's JIT gets a compile-only driver (it compiles,
    never launches), CPU tensors pass the backend's support check, tuning compiles instead of launching, and
    its clock is a stand-in. Returns the lists it fills: `compiled_here` (each kernel this process compiled
    itself) and `timed` (each launch the tuner timed)."""
    import triton.compiler.compiler as compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class CompileOnlyDriver:  # what the JIT asks of a driver to compile
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(CompileOnlyDriver())
    from conv_backend import dispatch, tuning
    dispatch.unsupported_reason = lambda *args, **kwargs: None  # CPU tensors, as if on the GPU
    tuning.compiling_only.set(True)
    session = SimpleNamespace(compiled_here=[], timed=[])
    tuning._time_candidate = lambda launch: (launch(), session.timed.append(launch), 1.0)[2]
    make_ir = compiler.ASTSource.make_ir

    def counted(self, *args, **kwargs):
        session.compiled_here.append(self.fn.__name__)
        return make_ir(self, *args, **kwargs)
    compiler.ASTSource.make_ir = counted
    return session


def child(setting: str, level: str) -> None:
    import torch
    session = compile_only_session()
    from conv_backend import backend, precompile, tuning
    convs = []
    for c, oc, k, s, side in LAYERS:
        x = torch.empty(32, c, side, side, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.empty(oc, c, k, k, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        convs.append((f"{c}->{oc} {k}x{k}/{s}", [x, w, None, [s, s], [k // 2] * 2, [1, 1], 1]))
    processes = None if setting == "inductor" else int(setting)
    note = f"{tuning.compile_threads()} compile threads"
    if processes is None:
        from torch._inductor import async_compile
        start = time.perf_counter()
        pool = precompile.inductor_pool()
        getattr(async_compile.AsyncCompile, "wait_pool_ready", lambda: None)()
        note = f"Inductor's pool of {async_compile.get_compile_threads()} ready in {time.perf_counter() - start:.1f} s" \
            if pool is not None else "no Inductor pool here: threads"
    start = time.perf_counter()
    made = backend.make_plans(convs, level, processes)
    print(f"{setting:>9}: {time.perf_counter() - start:6.1f} s for {made} plans, "
          f"{len(session.compiled_here)} kernels compiled in the process itself; {note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="inductor,0,2",
                    help="comma-separated settings: inductor (Inductor's pool), 0 (threads only), N processes of our own")
    ap.add_argument("--level", default="fast", choices=("none", "fast", "exhaustive"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.level)
        return
    print(f"{len(LAYERS)} ResNet-50 layers, bf16 channels_last batch 32, level {args.level!r}, {os.cpu_count()} CPUs",
          flush=True)
    for setting in args.processes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env.update(TRITON_CACHE_DIR=f"{cache}/triton", XDG_CACHE_HOME=f"{cache}/xdg",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
            subprocess.run([sys.executable, __file__, "--child", setting, "--level", args.level], env=env,
                           check=True)


if __name__ == "__main__":
    main()
