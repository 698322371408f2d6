"""Compiling tuning candidates in worker processes, for every convolution of a graph at once.

Threads (tuning._compile_ahead) stop scaling at a few: Triton's front end walks a
kernel's Python AST under the GIL. Processes share no GIL. So a graph's first
compile can take two passes (backend.make_plans): the first launches each
convolution's short list of candidates with Triton's `jit_cache_hook` answering
"compiled" for our kernels, which records what each launch would compile
(Triton's specialization data, the form `JITFunction.preload` reads) and
compiles nothing; worker processes then compile every recorded kernel into
Triton's on-disk cache. The second pass tunes as before, and the JIT finds each
candidate's binary on disk instead of compiling it.

Opt-in (TRITONCONV_COMPILE_PROCESSES, the number of worker processes; 0, the
default, leaves compiling to the threads). A kernel that a worker fails to
compile, or that the cache does not serve, is compiled in-process as before, so
nothing depends on this but the time a first call takes.
"""
from __future__ import annotations

import contextlib
import contextvars
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
from typing import NamedTuple, Optional

import triton

log = logging.getLogger("conv_backend")
_PACKAGE = __name__.rpartition(".")[0]


class Job(NamedTuple):
    """One kernel to compile: where its JITFunction lives and Triton's specialization data of the launch."""

    module: str
    qualname: str
    specialization: str


def processes() -> int:
    """Worker processes for compiling candidates: TRITONCONV_COMPILE_PROCESSES, 0 (off) where unset."""
    setting = os.environ.get("TRITONCONV_COMPILE_PROCESSES", "").strip()
    if not setting:
        return 0
    try:
        return max(0, int(setting))
    except ValueError:
        log.warning("tritonconv: ignoring TRITONCONV_COMPILE_PROCESSES=%r (not an integer)", setting)
        return 0


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


WORKER_TIMEOUT_S = 900  # a worker still compiling after this is stopped (its kernels compile in-process later)


def compile_jobs(jobs, target, workers: Optional[int] = None) -> int:
    """Compile `jobs` for `target` (a triton GPUTarget) in worker processes into Triton's cache; returns how
    many compiled. Failures are logged at DEBUG: the in-process compile meets them again and reports them.

    Workers are plain `python` processes running worker_main (not multiprocessing's, which would import the
    user's main script again in each), each given a file with its share of the jobs, so all of them start
    compiling at once."""
    unique = list(dict.fromkeys(jobs))
    if not unique:
        return 0
    count = min(workers or processes() or 1, len(unique))
    start = time.perf_counter()
    target_fields = [target.backend, target.arch, target.warp_size]
    env = dict(os.environ)  # the same Triton settings (and cache directory) as this process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    done = 0
    with tempfile.TemporaryDirectory(prefix="tritonconv-compile-") as folder:
        running = []
        try:
            for i in range(count):
                share = Path(folder) / f"jobs-{i}.json"
                share.write_text(json.dumps({"target": target_fields, "jobs": [list(j) for j in unique[i::count]]}))
                command = [sys.executable, "-c", f"from {__name__} import worker_main; worker_main()", str(share)]
                running.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                text=True, env=env))
        except OSError as exc:  # no (more) processes can be started here: the threads compile the rest
            log.debug("tritonconv: compiling in worker processes failed to start: %s", exc)
        for i, worker in enumerate(running):
            try:
                out, _ = worker.communicate(timeout=WORKER_TIMEOUT_S)
                result = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
                worker.kill()
                worker.communicate()
                log.debug("tritonconv: compile worker %d gave no result: %s", i, exc)
                continue
            done += result["done"]
            for failure in result["failed"]:
                log.debug("tritonconv: worker did not compile %s", failure)
    log.info("tritonconv: compiled %d of %d kernels in %d worker processes in %.1f s", done, len(unique),
             len(running), time.perf_counter() - start)
    return done


def worker_main() -> None:
    """A compile worker: compile the jobs of the file named by its argument, print {"done": n, "failed":
    [...]} as JSON."""
    share = json.loads(Path(sys.argv[1]).read_text())
    done, failed = 0, []
    for job in share["jobs"]:
        try:
            compile_job(Job(*job), tuple(share["target"]))
            done += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which compiles it itself later
            failed.append(f"{job[0]}.{job[1]}: {type(exc).__name__}: {str(exc)[:300]}")
    print(json.dumps({"done": done, "failed": failed}), flush=True)


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
