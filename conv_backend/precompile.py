"""Compiling tuning candidates in worker processes, for every convolution of a graph at once.

Threads (tuning._compile_ahead) stop scaling at a few: Triton's front end walks a
kernel's Python AST under the GIL. Processes share no GIL. So a graph's first
compile takes two passes (backend.start_plans, backend.finish_plans): the first
launches each convolution's short list of candidates with Triton's
`jit_cache_hook` answering "compiled" for our kernels, which records what each
launch would compile (Triton's specialization data, the form
`JITFunction.preload` reads) and compiles nothing; worker processes then compile
every recorded kernel into Triton's on-disk cache while Inductor compiles the
rest of the graph. The second pass tunes as before, and the JIT finds each
candidate's binary on disk instead of compiling it.

The workers are Inductor's own compile pool where this process has one (it has
torch imported already and outlives a graph compile), or processes of our own.
TRITONCONV_COMPILE_PROCESSES chooses (see processes()). A kernel that a worker
fails to compile, or that the cache does not serve, is compiled in-process as
before, so nothing depends on this but the time a first call takes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import triton

log = logging.getLogger("conv_backend")
_PACKAGE = __name__.rpartition(".")[0]


class Job(NamedTuple):
    """One kernel to compile: where its JITFunction lives and Triton's specialization data of the launch."""

    module: str
    qualname: str
    specialization: str


def processes() -> Optional[int]:
    """Who compiles a graph's candidates, from TRITONCONV_COMPILE_PROCESSES: unset (or "inductor") gives
    None, Inductor's compile worker pool (threads where there is none); "0" the compile threads alone;
    N > 0 that many worker processes of our own."""
    setting = os.environ.get("TRITONCONV_COMPILE_PROCESSES", "").strip().lower()
    if setting in ("", "inductor"):
        return None
    try:
        return max(0, int(setting))
    except ValueError:
        log.warning("tritonconv: ignoring TRITONCONV_COMPILE_PROCESSES=%r (not an integer or 'inductor')", setting)
        return None


def inductor_pool():
    """Inductor's pool of compile worker processes (started on first use, as Inductor starts it), or None where
    Inductor would not use one: one compile thread, a daemonic process, or a torch without it. Private torch
    API, pinned by tests/test_precompile.py."""
    try:
        from torch._inductor import async_compile
        if async_compile.get_compile_threads() <= 1:
            return None
        return async_compile.AsyncCompile.process_pool()
    except Exception as exc:  # noqa: BLE001 - no pool here: the threads compile instead
        log.debug("tritonconv: no Inductor compile pool: %s", exc)
        return None


# The jobs of the thread (context) that records; None elsewhere. The hook is process-wide, so a launch in any
# other thread must compile (and run) as usual: a kernel skipped there would leave its output unwritten.
_recorded: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("tritonconv_recorded_jobs",
                                                                          default=None)
_hook_lock = threading.Lock()
_previous_hook = None


def _record_hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    jobs = _recorded.get()
    module = str(fn.module)
    if jobs is not None and module.startswith(_PACKAGE) and "<locals>" not in fn.name:
        jobs.append(Job(module, fn.name, compile["specialization_data"]))
        return True  # Triton compiles nothing now; a worker does
    if _previous_hook is not None:
        return _previous_hook(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                              already_compiled=already_compiled)
    return None


def _install_hook() -> None:
    """Put _record_hook in front of whatever jit_cache_hook was set (it defers to it for every other launch)."""
    global _previous_hook
    with _hook_lock:
        current = triton.knobs.runtime.jit_cache_hook
        if current is not _record_hook:
            _previous_hook = current
            triton.knobs.runtime.jit_cache_hook = _record_hook


@contextlib.contextmanager
def recording():
    """Within it, launches of our kernels in this thread that would compile record a Job instead (and launch
    nothing: use it with tuning.compiling_only set). Yields the list of jobs."""
    _install_hook()
    jobs: list = []
    token = _recorded.set(jobs)
    try:
        yield jobs
    finally:
        _recorded.reset(token)


WORKER_TIMEOUT_S = 900  # a worker still compiling after this is given up on (its kernels compile in-process later)


class Compiling:
    """Jobs being compiled in worker processes. wait() blocks until they are done (WORKER_TIMEOUT_S at most)
    and returns how many compiled; `waits` holds one callable per worker task, given the seconds left and
    returning (compiled count, failure lines)."""

    def __init__(self, count: int, workers: str, waits: list, stop: Callable[[], None],
                 cleanup: Optional[Callable[[], None]] = None):
        self.count, self.workers, self._waits, self._stop, self._cleanup = count, workers, waits, stop, cleanup
        self._start = time.perf_counter()

    def cancel(self) -> None:
        """Give the jobs up (the graph's compile failed): stop what has not started, or the workers."""
        self._stop()
        if self._cleanup is not None:
            self._cleanup()

    def wait(self) -> int:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        done = 0
        try:
            for wait_one in self._waits:
                try:
                    compiled, failed = wait_one(max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # noqa: BLE001 - a lost worker: its kernels compile in-process later
                    log.debug("tritonconv: compile worker gave no result: %s", exc)
                    continue
                done += compiled
                for failure in failed:
                    log.debug("tritonconv: worker did not compile %s", failure)
        finally:
            if self._cleanup is not None:
                self._cleanup()
        log.info("tritonconv: compiled %d of %d kernels in %s in %.1f s", done, self.count, self.workers,
                 time.perf_counter() - self._start)
        return done


def start_compiling(jobs, target, workers: Optional[int] = None) -> Optional[Compiling]:
    """Start compiling `jobs` for `target` (a triton GPUTarget) into Triton's cache: in Inductor's compile pool
    where `workers` is None, else in `workers` processes of our own. None where nothing was started (no jobs,
    no pool, no process could start)."""
    unique = list(dict.fromkeys(jobs))
    if not unique:
        return None
    target_fields = (target.backend, target.arch, target.warp_size)
    if workers is None:
        pool = inductor_pool()
        return None if pool is None else _in_pool(pool, unique, target_fields)
    return _in_own_processes(unique, target_fields, min(workers or 1, len(unique)))


def compile_jobs(jobs, target, workers: Optional[int] = None) -> int:
    """start_compiling and wait: how many of `jobs` compiled."""
    compiling = start_compiling(jobs, target, workers)
    return compiling.wait() if compiling is not None else 0


def _in_pool(pool, jobs: list, target_fields: tuple) -> Compiling:
    """One pool task per kernel, so that the pool balances them, each compiled under this process's Triton
    settings (see triton_settings)."""
    settings = triton_settings()
    futures = []
    try:
        for job in jobs:
            futures.append(pool.submit(try_compile_job, job, target_fields, settings))
    except Exception as exc:  # noqa: BLE001 - e.g. a pool shut down: what was not sent compiles in-process
        log.debug("tritonconv: Inductor's compile pool took %d of %d kernels: %s", len(futures), len(jobs), exc)
    return Compiling(len(jobs), "Inductor's compile pool", [functools.partial(_pool_result, f) for f in futures],
                     lambda: [f.cancel() for f in futures])


def _pool_result(future, timeout: float) -> tuple:
    error = future.result(timeout=timeout)
    return (0, [error]) if error else (1, [])


def triton_settings() -> dict:
    """This process's TRITON_* environment. Inductor's compile workers set their own (its workers point
    TRITON_PTXAS_PATH at the ptxas bundled with torch), and a kernel compiled under another ptxas or libdevice
    gets another cache key: this process's JIT would not find it and would compile it again."""
    return {k: v for k, v in os.environ.items() if k.startswith("TRITON_")}


@contextlib.contextmanager
def _triton_settings(settings: Optional[dict]):
    """Within it, the TRITON_* environment is `settings` (None: as it is), and the backend compilers' cached
    tool versions are computed afresh (Triton caches ptxas's version per process)."""
    if settings is None:
        yield
        return
    saved = triton_settings()
    _set_triton_environment(settings)
    try:
        yield
    finally:
        _set_triton_environment(saved)


def _set_triton_environment(settings: dict) -> None:
    for key in [k for k in os.environ if k.startswith("TRITON_") and k not in settings]:
        del os.environ[key]
    os.environ.update(settings)
    for backend in ("nvidia", "amd"):
        module = sys.modules.get(f"triton.backends.{backend}.compiler")
        for obj in vars(module).values() if module is not None else ():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()


def try_compile_job(job: Job, target_fields: tuple, settings: Optional[dict] = None) -> Optional[str]:
    """compile_job in a worker, under `settings` (the parent's triton_settings(); None: this process's own):
    None when it compiled, else the failure in one line (for the parent, which compiles that kernel itself
    later; a Triton compile error need not survive pickling)."""
    try:
        with _triton_settings(settings):
            compile_job(job, target_fields)
        return None
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which compiles it itself later
        return f"{job.module}.{job.qualname}: {type(exc).__name__}: {str(exc)[:300]}"


def _in_own_processes(jobs: list, target_fields: tuple, count: int) -> Optional[Compiling]:
    """Plain `python` processes running worker_main (not multiprocessing's, which would import the user's main
    script again in each), each given a file with its share of the jobs, so all of them start compiling at
    once. Each imports torch and this package first."""
    env = dict(os.environ)  # the same Triton settings (and cache directory) as this process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    folder = tempfile.TemporaryDirectory(prefix="tritonconv-compile-")
    running = []
    try:
        for i in range(count):
            share = Path(folder.name) / f"jobs-{i}.json"
            share.write_text(json.dumps({"target": list(target_fields), "jobs": [list(j) for j in jobs[i::count]]}))
            command = [sys.executable, "-c", f"from {__name__} import worker_main; worker_main()", str(share)]
            running.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, env=env))
    except OSError as exc:  # no (more) processes can be started here: the threads compile the rest
        log.debug("tritonconv: compiling in worker processes failed to start: %s", exc)
    if not running:
        folder.cleanup()
        return None

    def stop():
        for worker in running:
            worker.kill()
            worker.communicate()
    return Compiling(len(jobs), f"{len(running)} worker processes",
                     [functools.partial(_worker_result, w) for w in running], stop, folder.cleanup)


def _worker_result(worker: subprocess.Popen, timeout: float) -> tuple:
    try:
        out, _ = worker.communicate(timeout=timeout)
        result = json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        worker.kill()
        worker.communicate()
        raise
    return result["done"], result["failed"]


def worker_main() -> None:
    """A compile worker: compile the jobs of the file named by its argument, print {"done": n, "failed":
    [...]} as JSON."""
    share = json.loads(Path(sys.argv[1]).read_text())
    errors = [try_compile_job(Job(*job), tuple(share["target"])) for job in share["jobs"]]
    failed = [error for error in errors if error]
    print(json.dumps({"done": len(errors) - len(failed), "failed": failed}), flush=True)


def _jit_function(job: Job):
    obj = importlib.import_module(job.module)
    for part in job.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def compile_job(job: Job, target_fields: tuple) -> str:
    """Compile one recorded launch into Triton's cache, in a worker; returns the kernel's hash. The
    specialization data is read as JITFunction.preload reads it, without a device."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    fn = _jit_function(job)
    data = json.loads(job.specialization)
    constexprs = {tuple(key): tl.dtype(value) if tl.dtype.is_dtype(value) else
                  tl.constexpr(value["constexpr"]) if isinstance(value, dict) and "constexpr" in value else value
                  for key, value in zip(data["constant_keys"], data["constant_vals"])}
    attrs = dict(zip(map(tuple, data["attrs_keys"]), data["attrs_vals"]))
    signature = {name: _tuples(value) for name, value in data["signature"].items()}
    target = GPUTarget(*target_fields)
    options = make_backend(target).parse_options(
        {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()})
    kernel = triton.compile(_source_class(fn)(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    return kernel.hash


def _source_class(fn):
    """The ASTSource class the JIT builds for `fn` (JITFunction.create_binder sets it, and needs a device)."""
    if fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource
        return GluonASTSource
    from triton.compiler import ASTSource
    return ASTSource


def _tuples(value):
    """JSON turned a signature's tuples into lists; Triton's signatures hold no lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
