"""Per-problem kernel/config selection, timed with triton.testing.do_bench and persisted on disk.

Triton's own autotuner picks configs of one kernel; we choose across kernels
(TMA and pointer implicit GEMM, depthwise) whose launch arguments differ, so
the choice is made here, keyed on the full problem (shapes, strides, dtype,
precision, GPU, torch and triton versions) and on the candidate set. How much
a cold problem is tuned is its autotune level (select): no timing, the short
list of ranking.rank_candidates, or every candidate. What is timed is first
compiled at once in a thread pool (_compile_ahead): compiling, not timing,
is most of a cold tuning run.

Choices persist in a cache file (TuningCache) that processes share, ranks of a
data-parallel job included: $XDG_CACHE_HOME/tritonconv/tuning-v2.jsonl (default
~/.cache/tritonconv), or the file TRITONCONV_CACHE_FILE names. It guarantees:
- a versioned format: a file of another format or a corrupt one is ignored and
  rebuilt; one that cannot be read (another user's) or written is never
  overwritten, and the process keeps its choices in memory;
- no torn file and no lost entry under concurrent writers: each choice is one
  line appended under a lock file, and rewrites replace the file atomically;
- new files follow the umask, so a group-writable directory can be shared;
- bounded size and cheap writes: a put appends one line at any size, and the
  journal is compacted to its latest entries, at most CACHE_MAX_ENTRIES
  (TRITONCONV_CACHE_MAX_ENTRIES), once it doubles its live entries.
In memory, choices are kept for the TRITONCONV_MAX_PLANS (lru.MAX_PLANS) most
recently used problems, like dispatch's plans.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import math
import os
import stat
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.compiler.errors
import triton.runtime.errors

from . import ranking
from .lru import LRUCache, max_plans, size_setting
from .runtime import interpreter_enabled

log = logging.getLogger("conv_backend")
CACHE_FORMAT = 2
CACHE_MAX_ENTRIES = 20_000  # entries a cache file keeps, unless TRITONCONV_CACHE_MAX_ENTRIES says otherwise


class NoKernelError(RuntimeError):
    """No candidate kernel could run this convolution; the caller falls back to ATen.

    `causes` maps each exception type met to (how many candidates failed with it, the first message);
    `transient` says whether one of them looks like it may pass later (out of memory, a busy device), so
    that the caller may build the plan again (RetryPolicy) rather than keep ATen for good.
    """

    def __init__(self, message: str, causes: Optional[dict] = None, transient: bool = False):
        self.causes = dict(causes or {})
        self.transient = transient
        if self.causes:
            message += ": " + "; ".join(f"{count}x {name}: {first}" for name, (count, first) in self.causes.items())
        super().__init__(message)


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
    """TRITONCONV_CACHE_FILE when set (a file of tuning results shipped with a model, say), else
    $XDG_CACHE_HOME/tritonconv/tuning-v<format>.jsonl (default ~/.cache/tritonconv)."""
    given = os.environ.get("TRITONCONV_CACHE_FILE", "").strip()
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonconv" / f"tuning-v{CACHE_FORMAT}.jsonl"


def environment_key(device: torch.device) -> str:
    """What makes a timing invalid when it changes: the GPU and the software stack."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{gpu}|torch {torch.__version__}|triton {triton.__version__}"


class TuningCache:
    """{key: candidate} in a JSON-lines journal that concurrent processes share.

    The file's first line names the format and, by a random id, this version of the file; each later line
    is one record, {"key": ..., candidate}, appended by one write under the lock file (so a put costs the
    same at any size), and the last record of a key wins. Readers replay only the lines added since their
    last read; a last line without its newline is still being written, or was torn by a writer that died,
    and is skipped. Once the journal holds twice as many records as live entries it is compacted:
    rewritten atomically (a temp file renamed over it) with the latest record of each key, at most
    `max_entries` of them (TRITONCONV_CACHE_MAX_ENTRIES), the oldest written dropped first.

    A file that is not a journal of this format is rebuilt. One that cannot be read (another user's, say)
    or written is left as it is, and the cache keeps its entries in memory from then on: a read-only home
    must not break convolutions.
    """

    def __init__(self, path: Optional[Path] = None, max_entries: Optional[int] = None):
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"TuningCache needs max_entries >= 1, got {max_entries}")
        self.path = Path(path) if path is not None else cache_path()
        self.max_entries = max_entries or size_setting("TRITONCONV_CACHE_MAX_ENTRIES", CACHE_MAX_ENTRIES)
        self._entries: dict = {}  # key -> entry, the oldest written first
        self._loaded = False
        self._on_disk = True  # False once the file could not be read or written
        self._warned_corrupt = False
        self._mutex = threading.RLock()  # threads of one process share the cache (the file lock is per open)
        self._forget_file()

    def get(self, key: str) -> Optional[Candidate]:
        with self._mutex:
            if not self._loaded or key not in self._entries:
                self._read()  # a miss may be what another process tuned meanwhile
            entry = self._entries.get(key)
        try:
            return Candidate(entry["kernel"], tuple((k, v) for k, v in entry["meta"]), entry["num_warps"],
                             entry["num_stages"]) if entry else None
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, candidate: Candidate) -> None:
        entry = {"kernel": candidate.kernel, "meta": [list(kv) for kv in candidate.meta],
                 "num_warps": candidate.num_warps, "num_stages": candidate.num_stages}
        with self._mutex:
            self._loaded = True
            if self._on_disk:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self._file_lock(exclusive=True):
                        if self._sync(final=True):  # merge with what other processes wrote meanwhile
                            self._remember(key, entry)
                            self._write(key)
                            return
                except OSError as exc:
                    self._leave_disk("write", exc)
            self._remember(key, entry)

    def export(self, path) -> int:
        """Write the live entries to `path` (another file than the cache's own) as a compact cache file,
        which other processes use through TRITONCONV_CACHE_FILE, and return how many it holds. `path` is
        replaced atomically; an error writing it is raised."""
        path = Path(path)
        if path.exists() and path.resolve() == self.path.resolve():
            raise ValueError(f"cannot export the tuning cache {self.path} onto itself")
        with self._mutex:
            self._read()
            entries = dict(self._entries)
        _replace_file(path, _header_line() + b"".join(_record_line(k, e) for k, e in entries.items()))
        return len(entries)

    def _read(self) -> None:
        self._loaded = True
        if not self._on_disk:
            return
        try:
            with self._file_lock(exclusive=False) as locked:
                self._sync(final=locked)
        except OSError as exc:  # the lock itself failed
            self._leave_disk("read", exc)

    @contextlib.contextmanager
    def _file_lock(self, exclusive: bool):
        """Hold the lock file: exclusively to write, shared to read. Yields whether it is held: a reader
        that cannot take it (a read-only directory of shipped results, say) reads without it."""
        try:
            lock = open(f"{self.path}.lock", "a")
        except OSError:
            if exclusive:
                raise
            lock = None
        if lock is None:
            yield False
            return
        with lock:
            try:
                locked = _lock(lock, exclusive)
            except OSError:  # e.g. a filesystem without locks
                if exclusive:
                    raise
                locked = False
            yield locked

    def _forget_file(self) -> None:
        """Replay the file from its start on the next read."""
        self._entries.clear()
        self._head = None  # the header line read, which names this version of the file
        self._offset = 0  # bytes of the file replayed: whole lines
        self._records = 0  # record lines among them
        self._corrupt = False  # the file is not a journal of this format
        self._torn = False  # it ends in a line without its newline

    def _sync(self, final: bool) -> bool:
        """Replay what the file gained since the last read, from its start if it was replaced or shrank.
        `final`: the lock is held, so no writer is mid-line and a last line without its newline is torn.
        Returns False if the file cannot be read: then it is left alone for good."""
        try:
            with open(self.path, "rb") as f:
                head = f.readline()
                if head != self._head or os.fstat(f.fileno()).st_size < self._offset:
                    self._forget_file()
                f.seek(self._offset)
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            self._forget_file()
            return True
        except OSError as exc:  # e.g. another user's file without read permission: never overwrite it
            self._leave_disk("read", exc)
            return False
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        if final and end < len(data):
            lines.append(data[end:])
            end = len(data)
            self._torn = True
        elif data:
            self._torn = False
        for line in lines:
            if self._head is None:
                if not self._read_header(line):
                    return True
            else:
                self._replay(line)
        self._offset += end
        return True

    def _read_header(self, line: bytes) -> bool:
        try:
            header = json.loads(line)
            known = isinstance(header, dict) and header.get(_FORMAT_FIELD) == CACHE_FORMAT
        except ValueError:
            known = False
        if not known:
            if not self._warned_corrupt:
                self._warned_corrupt = True
                log.warning("tritonconv: ignoring tuning cache %s (not a tuning cache of format %d); it will "
                            "be rebuilt", self.path, CACHE_FORMAT)
            self._forget_file()
            self._corrupt = True
            return False
        self._head = line + b"\n"
        return True

    def _replay(self, line: bytes) -> None:
        self._records += 1
        try:
            record = json.loads(line)
            key = record.pop("key")
        except (ValueError, AttributeError, KeyError, TypeError):
            return  # a garbled line, e.g. a torn write that a later record followed
        if isinstance(key, str):
            self._remember(key, record)

    def _remember(self, key: str, entry) -> None:
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def _write(self, key: str) -> None:
        """Append `key`'s record to the file, or rewrite the file when it is no journal of this format or
        has grown to twice its live entries. Under the lock, after _sync(final=True)."""
        if self._corrupt or self._records + 1 > 2 * max(len(self._entries), _COMPACT_MIN_RECORDS):
            with contextlib.suppress(FileNotFoundError):
                # A file we may not write in place (another user's) is not taken over by renaming ours over it.
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
            head = _header_line()
            body = b"".join(_record_line(k, e) for k, e in self._entries.items())
            _replace_file(self.path, head + body)
            self._mark_rewritten(head, len(head) + len(body))
            return
        line = _record_line(key, self._entries[key])
        head = self._head
        if head is None:  # a new (or empty) file
            head = _header_line()
            line = head + line
        elif self._torn:
            line = b"\n" + line
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # a new file follows the umask
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")
        self._head = head
        self._offset += len(line)
        self._records += 1
        self._torn = False

    def _mark_rewritten(self, head: bytes, size: int) -> None:
        """What is known of the file once it has been rewritten with exactly the live entries."""
        self._head, self._offset, self._records = head, size, len(self._entries)
        self._corrupt = self._torn = False

    def _leave_disk(self, doing: str, exc: OSError) -> None:
        if self._on_disk:
            log.warning("tritonconv: could not %s tuning cache %s (%s); leaving it as it is, and keeping tuning "
                        "results in this process's memory", doing, self.path, exc)
        self._on_disk = False


_FORMAT_FIELD = "tritonconv_tuning_cache"
# A journal is compacted once it holds more than twice its live entries, and more records than this.
_COMPACT_MIN_RECORDS = 16


def _header_line() -> bytes:
    """The first line of a cache file: its format, and an id that changes whenever the file is rewritten,
    so that a reader notices a replaced file even where the new one is no shorter."""
    return json.dumps({_FORMAT_FIELD: CACHE_FORMAT, "id": uuid.uuid4().hex}).encode() + b"\n"


def _record_line(key: str, entry: dict) -> bytes:
    return json.dumps({"key": key, **entry}, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file renamed over it: readers see the old file or the new
    one, never a torn one. A new file follows the umask, as open(path, "w") makes it, and a replaced one
    keeps its permission bits; the temp file never outlives a failure."""
    tmp = path.with_name(f".tuning-{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(FileNotFoundError):
                mode = os.stat(path).st_mode
                if stat.S_ISREG(mode) and hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), stat.S_IMODE(mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lock(f, exclusive: bool) -> bool:
    """Lock the open file `f`; returns whether it is locked."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): whole-line appends and atomic rewrites still keep the file readable
        return False
    fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    return True


_cache: Optional[TuningCache] = None
# In-process choices, {key: candidate}, and what the report lists, {signature: [described choices]}: one
# per problem met, so bounded like dispatch's plans (TRITONCONV_MAX_PLANS).
_memory = LRUCache(max_plans())
_chosen = LRUCache(max_plans())


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


AUTOTUNE_LEVELS = ("none", "fast", "exhaustive")
# The level select() tunes at: set by the backend from options={"autotune": ...} (and by the pre-tuning CLI);
# None means TRITONCONV_AUTOTUNE from the environment, else "fast".
autotune_level = contextvars.ContextVar("tritonconv_autotune_level", default=None)
FAST_CANDIDATES = 4  # what the "fast" level times at most (ranking.short_list)
FAST_FAMILIES = 3


def validate_autotune_level(level) -> str:
    """`level` if it names an autotune level, else a ValueError that lists them."""
    if level not in AUTOTUNE_LEVELS:
        raise ValueError(f"tritonconv: unknown autotune level {level!r}; valid levels: {', '.join(AUTOTUNE_LEVELS)}")
    return level


def current_autotune_level() -> str:
    """The level in effect: autotune_level if set, else TRITONCONV_AUTOTUNE, else "fast"."""
    level = autotune_level.get()
    if level is None:
        level = os.environ.get("TRITONCONV_AUTOTUNE", "").strip() or "fast"
    return validate_autotune_level(level)


@contextlib.contextmanager
def autotune_level_set(level: str):
    """Tune at `level` inside the block (in this thread or task), whatever the environment says."""
    token = autotune_level.set(validate_autotune_level(level))
    try:
        yield
    finally:
        autotune_level.reset(token)


# One tuning per problem at a time: a thread that meets a problem another thread is tuning waits for its
# choice ({key: [lock, holders]}, entries dropped when no thread holds or waits on them); and one timing at a
# time per process, so that no candidate is timed while another problem's candidates run.
_problem_locks: dict = {}
_problem_locks_guard = threading.Lock()
_timing_lock = threading.Lock()


@contextlib.contextmanager
def _problem_lock(key: str):
    with _problem_locks_guard:
        entry = _problem_locks.setdefault(key, [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _problem_locks_guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _problem_locks[key]


def select(problem_key: str, signature: tuple, device: torch.device, candidates: Sequence[Candidate],
           prepare: Callable[[Candidate], Callable[[], None]], *, level: Optional[str] = None) -> Candidate:
    """Pick the candidate for `problem_key` at the autotune level in effect (`level`, else
    current_autotune_level()), timing only on a cold cache:

    - "none": no timing; the first of ranking.rank_candidates (a timed choice already known is used).
    - "fast": time the short list of the ranking (at most FAST_CANDIDATES), compiling only those; a choice
      made for the same layer at another batch size or resolution is reused untimed where it is a candidate.
    - "exhaustive": compile and time every candidate.

    `prepare(candidate)` builds that candidate's launch once and returns a
    callable that runs it, so the timing covers launches as a plan makes them.
    Under the interpreter, or with one candidate, nothing is timed: the first candidate runs.
    """
    if not candidates:
        raise NoKernelError("no kernel candidate for this convolution")
    level = validate_autotune_level(level) if level is not None else current_autotune_level()
    key = f"{environment_key(device)}|{problem_key}|{candidate_set_id(candidates)}"
    choice = _recall(key, level, candidates, disk=False)
    if choice is None:
        with _problem_lock(key):  # a thread that tuned it meanwhile left its choice in memory
            choice = _recall(key, level, candidates, disk=True)
            if choice is None:
                choice = _choose(key, problem_key, signature, device, candidates, prepare, level)
    described = choice.describe()
    chosen = _chosen.setdefault(signature, [])
    if described not in chosen:
        chosen.append(described)
    return choice


def _keys_for(key: str, level: str) -> list:
    """Where a choice that serves `level` may be stored: an exhaustive tuning serves every level, a fast one
    "fast" and "none", an untimed pick (key|none, in memory only) "none" alone."""
    return {"exhaustive": [key], "fast": [key, key + "|fast"], "none": [key, key + "|fast", key + "|none"]}[level]


def _recall(key: str, level: str, candidates: Sequence[Candidate], disk: bool) -> Optional[Candidate]:
    for stored in _keys_for(key, level):
        choice = _memory.get(stored)
        if choice is None and disk and not stored.endswith("|none"):
            choice = tuning_cache().get(stored)
        if choice in candidates:
            _memory[stored] = choice
            return choice
    return None


def _choose(key, problem_key, signature, device, candidates, prepare, level) -> Candidate:
    if interpreter_enabled() or len(candidates) == 1:
        # Nothing to time: the interpreter's speed says nothing about the GPU.
        _memory[key if len(candidates) == 1 else key + "|none"] = candidates[0]
        return candidates[0]
    shape = ranking.ConvShape.from_signature(signature)
    ranked = ranking.rank_candidates(candidates, shape) if shape is not None else list(candidates)
    if level == "none":
        _memory[key + "|none"] = ranked[0]
        log.debug("tritonconv: %s: picked %s untimed (autotune level 'none')", _shown(signature), ranked[0].describe())
        return ranked[0]
    layer = layer_key(problem_key)
    layer = layer and f"{environment_key(device)}|layer|{layer}"
    if level == "fast" and layer:
        choice = _memory.get(layer) or tuning_cache().get(layer)
        if choice in candidates:
            _memory[key + "|fast"] = choice
            log.info("tritonconv: %s: reusing %s, chosen for the same layer at another batch size or resolution",
                     _shown(signature), choice.describe())
            return choice
    timed = ranked if level == "exhaustive" else ranking.short_list(ranked, FAST_CANDIDATES, FAST_FAMILIES)
    if collecting.get():
        _launch_to_compile(timed, prepare)
        raise CandidatesCollected(f"{len(timed)} candidates of {_shown(signature)} launched to be compiled")
    with _tuning_under_way(signature, level, lambda: len(timed), lambda: choice):
        try:
            choice = _benchmark(timed, prepare)
        except NoKernelError as exc:
            if len(timed) == len(candidates) or exc.transient:
                raise
            # The short list failed for good (e.g. its kernels do not compile here): the others get their turn.
            log.debug("tritonconv: %s: every short-listed candidate failed (%s); timing the rest", _shown(signature),
                      exc)
            timed = [c for c in ranked if c not in timed]
            try:
                choice = _benchmark(timed, prepare)
            except NoKernelError as again:
                causes = dict(exc.causes)
                for name, (count, first) in again.causes.items():  # counts add up, the first message stays
                    earlier = causes.get(name)
                    causes[name] = (earlier[0] + count, earlier[1]) if earlier else (count, first)
                raise NoKernelError(f"every kernel candidate ({len(candidates)} tried) failed for this convolution",
                                    causes, again.transient) from None
    # Having timed every candidate, a fast tuning is an exhaustive one.
    stored = key if len(timed) == len(candidates) else key + "|fast"
    _memory[stored] = choice
    tuning_cache().put(stored, choice)
    if layer:
        _memory[layer] = choice
        tuning_cache().put(layer, choice)
    return choice


def layer_key(problem_key: str) -> Optional[str]:
    """`problem_key` (kernels.common.tuned_plan's format) without the batch size and the maps' sizes: the
    input's and output's shape and strides become their channel count and whether channels are innermost.
    None where the key has no such fields (then no choice is shared across sizes)."""
    parts = problem_key.split("|")
    fields = {part[0] for part in parts if part[:2] in ("x(", "y(")}
    if fields != {"x", "y"}:
        return None
    out = []
    for part in parts:
        if part[:2] in ("x(", "y("):
            try:
                dims = ast.literal_eval(part[1:].replace(")(", "),(", 1))
            except (ValueError, SyntaxError):
                return None
            if part[0] == "x":
                shape, strides = dims
                part = f"x[C={shape[1]},{'channels_last' if strides[1] == 1 < shape[1] else 'planes'}]"
            else:
                part = f"y[{'channels_last' if dims[1] == 1 else 'planes'}]"
        out.append(part)
    return "|".join(out)


def _shown(signature: tuple) -> str:
    if len(signature) != 7:
        return f"problem {signature}"
    x_shape, w_shape, stride, padding, dilation, groups, dtype = signature
    return f"conv in {x_shape} w {w_shape} s{stride} p{padding} d{dilation} g{groups} {dtype}"


TUNING_NOTICE_SECONDS = 2.0  # tuning time in a process after which the user is told once what is going on
_tuning_seconds = 0.0  # spent in finished tunings
_tuning_noticed = False


def _tuning_notice(level: str, seconds: float) -> None:
    """The process's one WARNING that tuning is under way (from the timer of _tuning_under_way, or after a
    tuning that crossed the threshold, whichever comes first)."""
    global _tuning_noticed
    with _problem_locks_guard:
        if _tuning_noticed:
            return
        _tuning_noticed = True
    log.warning("tritonconv: tuning kernels for new convolution shapes (%.0f s so far; autotune level %r). Each "
                "shape is tuned once and cached on disk. To see per-shape progress set TORCH_LOGS=\"+conv_backend\" "
                "(or log 'conv_backend' at INFO); to tune ahead run `python -m conv_backend.tune`; for a faster "
                "first call use options={\"autotune\": \"none\"} or TRITONCONV_AUTOTUNE=none.", seconds, level)


@contextlib.contextmanager
def _tuning_under_way(signature, level: str, timed: Callable[[], int], choice: Callable[[], Candidate]):
    """Time one tuning: a timer gives the WARNING while it runs once the process's tuning time crosses
    TUNING_NOTICE_SECONDS; at the end, one INFO line (the problem, the candidates timed, the seconds, the choice)."""
    global _tuning_seconds
    started = time.monotonic()
    with _problem_locks_guard:
        spent, noticed = _tuning_seconds, _tuning_noticed
    timer = None
    if not noticed:
        timer = threading.Timer(max(0.0, TUNING_NOTICE_SECONDS - spent), lambda: _tuning_notice(
            level, spent + time.monotonic() - started))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        seconds = time.monotonic() - started
        with _problem_locks_guard:
            _tuning_seconds += seconds
            total = _tuning_seconds
        if total > TUNING_NOTICE_SECONDS:
            _tuning_notice(level, total)
    log.info("tritonconv: tuned %s: %d candidate(s) timed in %.1f s (autotune level %r), chose %s",
             _shown(signature), timed(), seconds, level, choice().describe())


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


# Set for a pass that only collects what tuning would compile (backend._collect_and_compile, with
# precompile.recording): select() launches a cold problem's candidates under compiling_only and raises
# CandidatesCollected instead of timing them.
collecting = contextvars.ContextVar("tritonconv_collecting", default=False)


@contextlib.contextmanager
def collecting_candidates():
    """A collecting pass (see `collecting`) in this context."""
    token = collecting.set(True)
    try:
        yield
    finally:
        collecting.reset(token)


class CandidatesCollected(Exception):
    """select() in a collecting pass: the candidates it would time were launched to be compiled, none timed."""


def _launch_to_compile(candidates: Sequence[Candidate], prepare: Callable[[Candidate], Callable[[], None]]) -> None:
    token = compiling_only.set(True)
    try:
        for candidate in candidates:
            try:
                prepare(candidate)()
            except Exception as exc:  # it fails again when timed, and is reported there
                log.debug("tritonconv: candidate %s not collected: %s", candidate.describe(), exc)
    finally:
        compiling_only.reset(token)


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


# Failures that skip a candidate quietly: it needs more resources than this GPU gives it, or does not compile
# here. Anything else is logged at WARNING, once per exception type and kernel.
_EXPECTED_FAILURES = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError,
                      torch.OutOfMemoryError)
_EXPECTED_MESSAGES = ("out of memory", "out of resource", "shared memory", "ptxas", "too many resources",
                      "compil")
# Failures that may not happen again later: memory another tensor (or process) held, a busy device.
_TRANSIENT_MESSAGES = ("out of memory", "busy or unavailable")
_warned_failures: set = set()


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` looks like a failure that may pass on a later try (out of memory, a busy device)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _TRANSIENT_MESSAGES))


def failure_summary(exc: BaseException) -> str:
    """One line that says what went wrong. A Triton compile error's text starts with the source position,
    and one raised at a call site holds the callee's as its __cause__: the innermost one's message is the
    reason (e.g. "input_precision must be one of ..."), not the first line "at 58:14:"."""
    inner = exc
    while isinstance(inner, triton.compiler.errors.CompilationError) and inner.__cause__ is not None:
        inner = inner.__cause__
    text = getattr(inner, "error_message", None) or str(inner)
    return (text.strip().splitlines() or [""])[0][:200]


def _candidate_failed(candidate: Candidate, exc: Exception, failures: dict) -> None:
    """Note `exc` in `failures` ({type name: [count, first message, transient]}) and log it."""
    name = type(exc).__name__
    first_line = failure_summary(exc)
    entry = failures.setdefault(name, [0, first_line, False])
    entry[0] += 1
    entry[2] = entry[2] or is_transient(exc)
    expected = isinstance(exc, _EXPECTED_FAILURES) or (
        isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _EXPECTED_MESSAGES))
    if expected or (name, candidate.kernel) in _warned_failures:
        log.debug("tritonconv: candidate %s failed: %s: %s", candidate.describe(), name, exc)
    else:
        _warned_failures.add((name, candidate.kernel))
        log.warning("tritonconv: candidate %s failed unexpectedly (skipped): %s: %s", candidate.describe(), name,
                    exc)


def _benchmark(candidates: Sequence[Candidate], prepare: Callable[[Candidate], Callable[[], None]]) -> Candidate:
    """The candidate with the lowest time, each timed in TIMING_PASSES passes over the whole list (its best
    pass counts): a host stall that inflates one pass does not reach the same candidate's other pass.
    Candidates are compiled ahead outside the process-wide timing lock, and timed inside it."""
    launches = _compile_ahead(candidates, prepare)
    timings, failures = {}, {}
    with _timing_lock:
        for candidate in candidates:
            try:
                if candidate not in launches:
                    launches[candidate] = prepare(candidate)
                timings[candidate] = _time_candidate(launches[candidate])
            except Exception as exc:  # classified (and logged) by _candidate_failed; the config is skipped
                _candidate_failed(candidate, exc, failures)
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
        raise NoKernelError(f"every kernel candidate ({len(candidates)} tried) failed for this convolution",
                            causes={name: (count, first) for name, (count, first, _) in failures.items()},
                            transient=any(transient for _, _, transient in failures.values()))
    log.debug("tritonconv: tuned %s", {c.describe(): round(t, 4) for c, t in timings.items()})
    return best


class RetryPolicy:
    """When to build again a plan whose tuning failed (NoKernelError): only for a transient cause, at most
    `max_attempts` tries in all, each retry `growth` times as long after the last failure as the one before
    (`first_interval` seconds at first). The dispatcher notes each failure with failed(key, error) and asks
    should_rebuild(key) before it runs a plan that fell back to ATen; succeeded(key) forgets the key."""

    def __init__(self, max_attempts: int = 3, first_interval: float = 1.0, growth: float = 4.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_attempts, self.first_interval, self.growth, self.clock = max_attempts, first_interval, growth, clock
        self._failures: dict = {}  # key: (failed attempts, time of the last, transient)
        self._lock = threading.Lock()

    def failed(self, key, error: BaseException) -> None:
        transient = error.transient if isinstance(error, NoKernelError) else is_transient(error)
        with self._lock:
            attempts = self._failures.get(key, (0, 0.0, True))[0] + 1
            self._failures[key] = (attempts, self.clock(), transient)

    def should_rebuild(self, key) -> bool:
        """Whether the plan for `key` should be built again now (False for a key that never failed)."""
        with self._lock:
            state = self._failures.get(key)
            if state is None:
                return False
            attempts, last, transient = state
            if not transient or attempts >= self.max_attempts:
                return False
            return self.clock() - last >= self.first_interval * self.growth ** (attempts - 1)

    def succeeded(self, key) -> None:
        with self._lock:
            self._failures.pop(key, None)
