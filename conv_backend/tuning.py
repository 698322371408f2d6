"""Per-problem kernel/config selection, timed with triton.testing.do_bench and persisted on disk.

Triton's own autotuner picks configs of one kernel; we choose across kernels
(TMA and pointer implicit GEMM, depthwise) whose launch arguments differ, so
the choice is made here, keyed on the full problem (shapes, strides, dtype,
precision, GPU, torch and triton versions) and stored as JSON under
$XDG_CACHE_HOME/tritonconv (default ~/.cache/tritonconv). A corrupt or stale
file is ignored and rewritten; writers hold a lock and replace the file
atomically, so concurrent processes never leave a torn file. Before a cold
choice is timed, every candidate is compiled at once in a thread pool
(_compile_ahead): compiling, not timing, is most of a cold tuning run.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton

from .runtime import interpreter_enabled

log = logging.getLogger("conv_backend")
CACHE_FORMAT = 1


class NoKernelError(RuntimeError):
    """No candidate kernel could run this convolution; the caller falls back to ATen."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One kernel with one set of meta-parameters."""

    kernel: str
    meta: tuple  # sorted (name, value) pairs: the kernel's constexprs, and compile options such as maxnreg
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def make(cls, kernel: str, num_warps: int = 4, num_stages: int = 3, **meta) -> "Candidate":
        return cls(kernel, tuple(sorted(meta.items())), num_warps, num_stages)

    @property
    def params(self) -> dict:
        return dict(self.meta)

    def describe(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.meta)
        return f"{self.kernel}[{blocks},warps={self.num_warps},stages={self.num_stages}]"


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonconv" / f"tuning-v{CACHE_FORMAT}.json"


def environment_key(device: torch.device) -> str:
    """What makes a timing invalid when it changes: the GPU and the software stack."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{gpu}|torch {torch.__version__}|triton {triton.__version__}"


class TuningCache:
    """A JSON file of {key: candidate}, safe against corruption and concurrent writers."""

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path is not None else cache_path()
        self._entries: Optional[dict] = None

    def _read_disk(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(data.get("entries"), dict):
                return data["entries"]
            log.warning("tritonconv: ignoring tuning cache %s (unknown format); it will be rebuilt", self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("tritonconv: ignoring unreadable tuning cache %s (%s); it will be rebuilt", self.path, exc)
        return {}

    def get(self, key: str) -> Optional[Candidate]:
        if self._entries is None:
            self._entries = self._read_disk()
        entry = self._entries.get(key)
        try:
            return Candidate(entry["kernel"], tuple((k, v) for k, v in entry["meta"]), entry["num_warps"],
                             entry["num_stages"]) if entry else None
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, candidate: Candidate) -> None:
        entry = {"kernel": candidate.kernel, "meta": [list(kv) for kv in candidate.meta],
                 "num_warps": candidate.num_warps, "num_stages": candidate.num_stages}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(str(self.path) + ".lock", "w") as lock:
                _lock(lock)
                entries = self._read_disk()  # merge with what other processes wrote meanwhile
                entries[key] = entry
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            self._entries = entries
        except OSError as exc:  # a read-only home must not break convolutions
            log.warning("tritonconv: could not write tuning cache %s: %s", self.path, exc)
            if self._entries is not None:
                self._entries[key] = entry


def _lock(f) -> None:
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
    except ImportError:  # no flock (Windows): os.replace still keeps the file whole
        pass


_cache: Optional[TuningCache] = None
_memory: dict = {}
_chosen: dict = {}


def tuning_cache() -> TuningCache:
    global _cache
    if _cache is None or _cache.path != cache_path():
        _cache = TuningCache()
    return _cache


def reset_memory() -> None:
    """Forget in-process choices (tests use this to check the disk cache)."""
    global _cache
    _memory.clear()
    _chosen.clear()
    _cache = None


def problem_signature(x_shape, w_shape, stride, padding, dilation, groups, dtype) -> tuple:
    """Shape-level identity of a convolution, as the report knows it."""
    return tuple(str(v) for v in (tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation),
                                  groups, str(dtype).replace("torch.", "")))


def chosen_kernels(x_shape, w_shape, stride, padding, dilation, groups, dtype) -> list:
    if x_shape is None or w_shape is None:
        return []
    return _chosen.get(problem_signature(x_shape, w_shape, stride, padding, dilation, groups, dtype), [])


def select(problem_key: str, signature: tuple, device: torch.device, candidates: Sequence[Candidate],
           prepare: Callable[[Candidate], Callable[[], None]]) -> Candidate:
    """Pick the fastest candidate for `problem_key`, timing them only on a cold cache.

    `prepare(candidate)` builds that candidate's launch once and returns a
    callable that runs it, so the timing covers launches as a plan makes them.
    """
    if not candidates:
        raise NoKernelError("no kernel candidate for this convolution")
    key = f"{environment_key(device)}|{problem_key}|{candidate_set_id(candidates)}"
    choice = _memory.get(key)
    if choice not in candidates:
        choice = None
    if choice is None and (interpreter_enabled() or len(candidates) == 1):
        choice = candidates[0]  # nothing to time: the interpreter's speed says nothing about the GPU
    if choice is None:
        cached = tuning_cache().get(key)
        choice = cached if cached in candidates else None
    if choice is None:
        choice = _benchmark(candidates, prepare)
        tuning_cache().put(key, choice)
    _memory[key] = choice
    described = choice.describe()
    chosen = _chosen.setdefault(signature, [])
    if described not in chosen:
        chosen.append(described)
    return choice


def candidate_set_id(candidates: Sequence[Candidate]) -> str:
    """A short digest of the candidate set, in any order: a choice made among other candidates (an older
    release's tile list, say) is not reused, since a new candidate may beat it."""
    described = "\n".join(sorted(c.describe() for c in candidates))
    return "c" + hashlib.sha1(described.encode()).hexdigest()[:10]


def _time_candidate(fn: Callable[[], None]) -> float:
    """Median milliseconds per call of `fn`, by triton.testing.do_bench: the same clock as the benchmark.

    do_bench clears the L2 cache before each timed call, and that clearing usually
    keeps the GPU busy long enough for the host to queue the next launch, so the
    clock reads the kernel's GPU time. Not always: on some hosts whole runs of
    do_bench come out 1.5-2x high for kernels whose GPU time (profiler, L2 cleared)
    does not change (bench/NOTES.md, run 23), so _benchmark times each candidate twice.
    """
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


TIMING_PASSES = 2
# Set while the tuner compiles candidates ahead of timing them: kernel launchers then hand their kernel to
# Triton's compiler (KernelLauncher.__call__) and launch nothing.
compiling_only = contextvars.ContextVar("tritonconv_compiling_only", default=False)


def compile_threads() -> int:
    """Threads that compile tuning candidates at once: TRITONCONV_COMPILE_THREADS, else the CPUs this
    process may use (at most 32); 1 compiles each candidate as it is first timed."""
    setting = os.environ.get("TRITONCONV_COMPILE_THREADS", "")
    if setting.strip():
        try:
            return max(1, int(setting))
        except ValueError:
            log.warning("tritonconv: ignoring TRITONCONV_COMPILE_THREADS=%r (not an integer)", setting)
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return min(32, len(usable))


def _compile_ahead(candidates: Sequence[Candidate], prepare: Callable[[Candidate], Callable[[], None]]) -> dict:
    """Compile every candidate's kernels at once in a thread pool, through Triton's AsyncCompileMode (its
    compiler releases the GIL in its passes, and ptxas is a process of its own), so that timing them
    finds them compiled. Compiling, not timing, is most of a cold tuning run. A candidate that fails here
    fails again when timed, and is skipped there. Returns the launches it built, {candidate: launch}, for
    the timing to run (empty where it did not run)."""
    launches = {}
    async_mode = getattr(triton, "AsyncCompileMode", None)
    threads = min(compile_threads(), len(candidates))
    if async_mode is None or threads < 2 or interpreter_enabled():
        return launches
    try:
        with contextlib.ExitStack() as stack:  # unwound in reverse: flag off, wait for every compile, pool down
            pool = stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="tritonconv-compile"))
            stack.enter_context(async_mode(pool, ignore_errors=True))
            token = compiling_only.set(True)
            stack.callback(compiling_only.reset, token)
            for candidate in candidates:
                try:
                    launches[candidate] = prepare(candidate)
                    launches[candidate]()
                except Exception as exc:
                    log.debug("tritonconv: candidate %s did not compile: %s", candidate.describe(), exc)
    except Exception as exc:  # e.g. the caller already compiles asynchronously: compile while timing instead
        log.debug("tritonconv: compiling candidates ahead of timing failed: %s", exc)
    return launches


def _benchmark(candidates: Sequence[Candidate], prepare: Callable[[Candidate], Callable[[], None]]) -> Candidate:
    """The candidate with the lowest time, each timed in TIMING_PASSES passes over the whole list (its best
    pass counts): a host stall that inflates one pass does not reach the same candidate's other pass."""
    launches = _compile_ahead(candidates, prepare)
    timings = {}
    for candidate in candidates:
        try:
            if candidate not in launches:
                launches[candidate] = prepare(candidate)
            timings[candidate] = _time_candidate(launches[candidate])
        except Exception as exc:  # e.g. out of shared memory for this shape: skip the config
            log.debug("tritonconv: candidate %s failed: %s", candidate.describe(), exc)
            timings[candidate] = math.inf
    for _ in range(TIMING_PASSES - 1):
        for candidate in candidates:
            if not math.isinf(timings[candidate]):
                try:
                    timings[candidate] = min(timings[candidate], _time_candidate(launches[candidate]))
                except Exception as exc:  # it ran once: keep that time
                    log.debug("tritonconv: candidate %s failed when timed again: %s", candidate.describe(), exc)
    best = min(timings, key=timings.get)
    if math.isinf(timings[best]):
        raise NoKernelError("every kernel candidate failed to run for this convolution")
    log.debug("tritonconv: tuned %s", {c.describe(): round(t, 4) for c, t in timings.items()})
    return best
