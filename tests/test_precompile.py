"""Compiling candidates in worker processes (conv_backend.precompile), on CPU.

The round trip runs Triton's real JIT without a GPU: a stand-in driver gives it
a Hopper target, so it compiles (never launches) what a plan's launch would run
on an H100. Launches made while recording compile nothing; worker processes
compile the recorded kernels into Triton's cache; the same launches made again
must load those binaries instead of compiling.
"""
from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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

# backend.make_plans as a graph's compile runs it at the "fast" level: the collecting pass records every
# convolution's short list, the workers (argv[1]: "inductor" for Inductor's compile pool, else a count of our
# own) compile it, and the tuning pass (timed by a stand-in clock, since nothing can launch here) compiles
# nothing in-process.
TWO_PASSES = textwrap.dedent('''
    import os
    import sys

    import torch

    from probe_precompile import compile_only_session


    def main():
        session = compile_only_session()
        from conv_backend import backend, precompile, tuning
        processes = None if sys.argv[1] == "inductor" else int(sys.argv[1])
        if processes is None:
            torch._inductor.config.compile_threads = 2  # a pool, whatever this machine's CPUs
            # Inductor's workers compile with another ptxas than this process (on GPU hosts, torch's own):
            # here a wrapper reporting another version, which gives other cache keys unless the workers
            # compile under this process's settings; they have asked it its version already.
            os.environ["TRITON_PTXAS_PATH"] = sys.argv[2]
            pool = precompile.inductor_pool()
            del os.environ["TRITON_PTXAS_PATH"]
            from triton.backends.nvidia.compiler import get_ptxas_version
            versions = {pool.submit(get_ptxas_version, 90).result(timeout=120) for _ in range(4)}
            assert versions == {get_ptxas_version(90) + "(wrapped)\\n"}, versions
        x = torch.randn(2, 16, 12, 12).to(memory_format=torch.channels_last)
        convs = [("conv", [x, torch.randn(32, 16, 3, 3), None, [1, 1], [1, 1], [1, 1], 1]),
                 ("depthwise", [torch.randn(2, 16, 12, 12), torch.randn(16, 1, 3, 3), None, [1, 1], [1, 1],
                                [1, 1], 16])]
        assert backend.make_plans(convs, "fast", processes) == 2
        assert session.compiled_here == [], f"compiled in this process: {session.compiled_here}"
        # several candidates a problem, each timed in every pass: the short lists, not single picks
        assert len(session.timed) > 2 * tuning.TIMING_PASSES, len(session.timed)
        print("two passes ok")


    if __name__ == "__main__":
        main()
''')


@pytest.mark.parametrize("script,argv,says", [(ROUND_TRIP, [], "round trip ok"),
                                              (TWO_PASSES, ["2"], "two passes ok"),
                                              (TWO_PASSES, ["inductor", "PTXAS_WRAPPER"], "two passes ok")],
                         ids=["round_trip", "make_plans_own_processes", "make_plans_inductor_pool"])
def test_workers_compile_what_the_jit_then_loads_from_the_cache(script, argv, says, tmp_path):
    path = tmp_path / "precompile_check.py"
    path.write_text(script)
    if "PTXAS_WRAPPER" in argv:
        argv = [str(_ptxas_wrapper(tmp_path)) if arg == "PTXAS_WRAPPER" else arg for arg in argv]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real JIT, not the interpreter
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # the tuning cache
    done = subprocess.run([sys.executable, str(path), *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert says in done.stdout


def _ptxas_wrapper(folder: Path) -> Path:
    """Triton's ptxas behind a script whose --version says one more line: another ptxas, to Triton."""
    import triton
    real = triton.knobs.nvidia.ptxas.path
    wrapper = folder / "ptxas"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then "{real}" --version; echo "(wrapped)"; '
                       f'else exec "{real}" "$@"; fi\n')
    wrapper.chmod(0o755)
    return wrapper


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


@pytest.mark.parametrize("setting,count", [("", None), ("inductor", None), ("0", 0), ("6", 6), ("many", None)])
def test_processes_setting(setting, count, monkeypatch):
    monkeypatch.setenv("TRITONCONV_COMPILE_PROCESSES", setting)
    assert precompile.processes() == count


def test_candidates_compile_while_inductor_compiles_the_rest(monkeypatch):
    """A graph's plans start (their candidates go to the workers) before Inductor's compile_fx_inner and are
    tuned after it; where Inductor's compile fails, the workers' jobs are given up and nothing is tuned."""
    monkeypatch.delenv("TRITONCONV_COMPILE_PROCESSES", raising=False)
    from torch._inductor import compile_fx as compile_fx_mod

    from conv_backend import backend

    events = []
    compiling = SimpleNamespace(cancel=lambda: events.append("cancel"))
    monkeypatch.setattr(backend, "start_plans", lambda gm, autotune, processes: events.append(("start", processes)) or
                        backend.Planning([], None, autotune, compiling))
    monkeypatch.setattr(backend, "finish_plans", lambda planning: events.append("finish") or 0)
    real = compile_fx_mod.compile_fx_inner

    def inner(*args, **kwargs):
        events.append("inductor")
        if fail:
            raise RuntimeError("inductor failed")
        return real(*args, **kwargs)
    monkeypatch.setattr(compile_fx_mod, "compile_fx_inner", inner)
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 8, 8)

    fail = False
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(conv, backend="tritonconv")(x)
    assert events == [("start", None), "inductor", "finish"]  # None: Inductor's compile pool

    fail, events[:] = True, []
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="inductor failed"):
        torch.compile(conv, backend="tritonconv")(x)
    assert events == [("start", None), "inductor", "cancel"]
    torch._dynamo.reset()


def test_private_inductor_pool_apis():
    """What precompile and the backend use of Inductor's compile pool; an upgrade that moves one fails here."""
    from torch._inductor import async_compile

    assert callable(async_compile.maybe_warm_pool) and callable(async_compile.get_compile_threads)
    assert callable(async_compile.AsyncCompile.process_pool)
    from torch._inductor.compile_worker.subproc_pool import SubprocPool
    assert list(inspect.signature(SubprocPool.submit).parameters)[:2] == ["self", "job_fn"]


def test_a_worker_compiles_under_the_parents_triton_settings_and_restores_its_own(monkeypatch):
    seen = {}
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/worker/ptxas")
    before = precompile.triton_settings()
    monkeypatch.setattr(precompile, "compile_job",
                        lambda job, target: seen.update(precompile.triton_settings()) or "hash")
    assert precompile.try_compile_job(precompile.Job("m", "f", "{}"), ("cuda", 90, 32),
                                      {"TRITON_CACHE_DIR": "/parent/cache"}) is None
    assert seen == {"TRITON_CACHE_DIR": "/parent/cache"}
    assert precompile.triton_settings() == before


def test_a_pool_that_refuses_jobs_leaves_them_to_the_process(monkeypatch):
    """Jobs the pool did not take are not waited for (the tuning compiles them in-process); a failure a worker
    reports is counted out."""
    from concurrent.futures import Future

    class Pool:
        def __init__(self):
            self.taken = 0

        def submit(self, fn, job, target_fields, settings):
            if self.taken == 2:
                raise RuntimeError("pool shut down")
            self.taken += 1
            future = Future()
            future.set_result(None if job.qualname == "ok" else "compile error")
            return future
    monkeypatch.setattr(precompile, "inductor_pool", Pool)
    jobs = [precompile.Job("m", name, "{}") for name in ("ok", "bad", "ok2")]
    assert precompile.compile_jobs(jobs, SimpleNamespace(backend="cuda", arch=90, warp_size=32)) == 1


def test_tuning_logs_where_a_first_call_went(monkeypatch, caplog):
    """One INFO line per graph: the plans made, the seconds waiting for the compile workers and tuning."""
    from conv_backend import backend

    monkeypatch.setattr(backend, "_plan_for", lambda name, vals, autotune: name != "kept")
    waited = []
    compiling = SimpleNamespace(wait=lambda: waited.append(True))
    with caplog.at_level(logging.INFO, logger="conv_backend"):
        assert backend._tune([("a", []), ("b", []), ("kept", [])], "fast", compiling) == 2
    assert waited == [True]
    (line,) = [r.getMessage() for r in caplog.records if "plan(s) made" in r.getMessage()]
    assert line.startswith("tritonconv: 2 plan(s) made for 3 convolution(s):") and "waiting for the compile" in line
