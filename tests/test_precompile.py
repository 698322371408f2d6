"""Compiling candidates in worker processes (conv_backend.precompile), on CPU.

The round trip runs Triton's real JIT without a GPU: a stand-in driver gives it
a Hopper target, so it compiles (never launches) what a plan's launch would run
on an H100. Launches made while recording compile nothing; worker processes
compile the recorded kernels into Triton's cache; the same launches made again
must load those binaries instead of compiling.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conv_backend import precompile

ROOT = Path(__file__).resolve().parents[1]

ROUND_TRIP = textwrap.dedent('''
    import torch
    from triton.backends.compiler import GPUTarget

    from probe_precompile import compile_only_session


    def launch_plans():
        """A pointer-kernel and a depthwise plan made and launched (under compiling_only: compile only)."""
        from conv_backend.kernels import depthwise, implicit_gemm
        x = torch.randn(2, 16, 12, 12).to(memory_format=torch.channels_last)
        w = torch.randn(32, 16, 3, 3)
        implicit_gemm.implicit_gemm_plan(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "pointer")(x, w, None)
        xd, wd = torch.randn(2, 16, 12, 12), torch.randn(16, 1, 3, 3)
        depthwise.depthwise_plan(xd, wd, None, (1, 1), (1, 1), (1, 1))(xd, wd, None)


    def main():
        session = compile_only_session()
        from conv_backend import precompile, tuning
        tuning.autotune_level.set("none")  # one candidate a plan, untimed
        with precompile.recording() as jobs:
            launch_plans()
        assert session.compiled_here == [], f"compiled while recording: {session.compiled_here}"
        assert sorted(job.qualname for job in jobs) == ["depthwise_kernel", "igemm_pointer_kernel"], jobs
        assert precompile.compile_jobs(jobs, GPUTarget("cuda", 90, 32), workers=2) == 2
        launch_plans()  # the JIT must now find both binaries in the cache
        assert session.compiled_here == [], f"compiled in this process: {session.compiled_here}"
        print("round trip ok")


    if __name__ == "__main__":
        main()
''')

# backend.make_plans as prepare_plans runs it at the "fast" level: the collecting pass records every
# convolution's short list, the workers compile it, and the tuning pass (timed by a stand-in clock, since
# nothing can launch here) compiles nothing in-process.
TWO_PASSES = textwrap.dedent('''
    import torch

    from probe_precompile import compile_only_session


    def main():
        session = compile_only_session()
        from conv_backend import backend, tuning
        x = torch.randn(2, 16, 12, 12).to(memory_format=torch.channels_last)
        convs = [("conv", [x, torch.randn(32, 16, 3, 3), None, [1, 1], [1, 1], [1, 1], 1]),
                 ("depthwise", [torch.randn(2, 16, 12, 12), torch.randn(16, 1, 3, 3), None, [1, 1], [1, 1],
                                [1, 1], 16])]
        assert backend.make_plans(convs, "fast", processes=2) == 2
        assert session.compiled_here == [], f"compiled in this process: {session.compiled_here}"
        # several candidates a problem, each timed in every pass: the short lists, not single picks
        assert len(session.timed) > 2 * tuning.TIMING_PASSES, len(session.timed)
        print("two passes ok")


    if __name__ == "__main__":
        main()
''')


@pytest.mark.parametrize("script,says", [(ROUND_TRIP, "round trip ok"), (TWO_PASSES, "two passes ok")],
                         ids=["round_trip", "make_plans"])
def test_workers_compile_what_the_jit_then_loads_from_the_cache(script, says, tmp_path):
    path = tmp_path / "precompile_check.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real JIT, not the interpreter
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # the tuning cache
    done = subprocess.run([sys.executable, str(path)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert says in done.stdout


def _hook_call(module: str, name: str = "kernel"):
    return precompile._record_hook(key="k", repr="r", fn=SimpleNamespace(module=module, name=name),
                                   compile={"specialization_data": "{}"}, is_manual_warmup=True,
                                   already_compiled=False)


def test_hook_records_only_our_kernels_and_only_in_the_recording_thread(monkeypatch):
    """Anything else compiles as usual: another library's kernels, ours launched by another thread (a kernel
    skipped there would leave its output unwritten), ours outside recording(); an earlier hook still runs."""
    earlier = []
    precompile._install_hook()  # as recording() does: the hook found installed is the one to defer to
    monkeypatch.setattr(precompile, "_previous_hook", lambda **kw: earlier.append(kw["fn"].module))
    assert _hook_call("conv_backend.kernels.depthwise") is None
    with precompile.recording() as jobs:
        assert _hook_call("conv_backend.kernels.depthwise", "depthwise_kernel") is True
        assert _hook_call("torch._inductor.kernel") is None
        assert _hook_call("conv_backend.kernels.halo", "make.<locals>.kernel") is None  # not importable
        other = []
        thread = threading.Thread(target=lambda: other.append(_hook_call("conv_backend.kernels.halo")))
        thread.start()
        thread.join()
        assert other == [None]
    assert jobs == [precompile.Job("conv_backend.kernels.depthwise", "depthwise_kernel", "{}")]
    assert earlier == ["conv_backend.kernels.depthwise", "torch._inductor.kernel", "conv_backend.kernels.halo",
                       "conv_backend.kernels.halo"]


@pytest.mark.parametrize("setting,count", [("", 0), ("0", 0), ("6", 6), ("many", 0)])
def test_processes_setting(setting, count, monkeypatch):
    monkeypatch.setenv("TRITONCONV_COMPILE_PROCESSES", setting)
    assert precompile.processes() == count
