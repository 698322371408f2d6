"""The tuning cache file shared by users and processes over months, and the bounded in-process caches."""
from __future__ import annotations

import builtins
import concurrent.futures
import errno
import json
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest
import torch

import conv_backend.tuning as tuning
from conv_backend import dispatch
from conv_backend.lru import MAX_PLANS, LRUCache, max_plans, size_setting
from conv_backend.tuning import Candidate, TuningCache

from _util import read_tuning_file

A = Candidate.make("k", num_warps=4, num_stages=3, BLOCK=16)
B = Candidate.make("k", num_warps=8, num_stages=2, BLOCK=32)


def candidate(i: int, worker: int = 0) -> Candidate:
    return Candidate.make("k", num_warps=4, num_stages=worker + 1, BLOCK=i)


def temp_files(directory: Path) -> list:
    return [p.name for p in directory.iterdir() if p.name.startswith(".tuning-")]


def record_lines(keys) -> str:
    """One record of candidate A per key."""
    return "".join(json.dumps({"key": key, "kernel": "k", "meta": [["BLOCK", 16]], "num_warps": 4,
                               "num_stages": 3}) + "\n" for key in keys)


HEADER = json.dumps({"tritonconv_tuning_cache": tuning.CACHE_FORMAT}) + "\n"


# ---------------------------------------------------------------- bounded in-process caches

def test_lru_cache_evicts_the_least_recently_used():
    cache = LRUCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # now "b" is the oldest
    cache["c"] = 3
    assert list(cache) == ["a", "c"] and cache.get("b", "gone") == "gone"
    assert cache.setdefault("a", []) == 1  # a hit refreshes too: "c" goes next
    assert cache.setdefault("d", []) == [] and list(cache) == ["a", "d"]
    cache["a"] = 4
    assert list(cache.items()) == [("d", []), ("a", 4)] and isinstance(cache, dict)
    with pytest.raises(ValueError):
        LRUCache(0)


@pytest.mark.parametrize("setting,size", [("7", 7), (" 100 ", 100), (None, 4096), ("", 4096), ("0", 4096),
                                          ("-2", 4096), ("many", 4096)])
def test_size_settings(setting, size, monkeypatch, caplog):
    if setting is None:
        monkeypatch.delenv("TRITONCONV_MAX_PLANS", raising=False)
    else:
        monkeypatch.setenv("TRITONCONV_MAX_PLANS", setting)
    assert MAX_PLANS == 4096 and max_plans() == size == size_setting("TRITONCONV_MAX_PLANS", MAX_PLANS)
    bad = setting is not None and setting.strip() and size == 4096
    assert bool(bad) == any("ignoring TRITONCONV_MAX_PLANS" in r.getMessage() for r in caplog.records)


def test_launch_plans_are_bounded(monkeypatch):
    """One plan per input size (as dynamic shapes make them), but only the most recently used are kept."""
    assert isinstance(dispatch._plans, LRUCache) and dispatch._plans.maxsize == max_plans()
    monkeypatch.setattr(dispatch._plans, "maxsize", 3)
    built = []

    def make_plan(x, *args):
        built.append(x.shape[-1])
        return lambda x, weight, bias, epilogue_tensors: x.shape[-1]

    monkeypatch.setattr(dispatch, "_make_plan", make_plan)
    w = torch.randn(2, 2, 1, 1)
    for size in (4, 5, 6, 7, 8, 7, 4):
        assert dispatch.launch_conv2d(torch.randn(1, 2, 3, size), w, None, (1, 1), (0, 0), (1, 1), 1) == size
    assert built == [4, 5, 6, 7, 8, 4] and len(dispatch._plans) == 3  # 7 was still planned; 4 was evicted


def test_tuning_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: True)  # choose without timing or disk
    for container in (tuning._memory, tuning._chosen):
        assert isinstance(container, LRUCache) and container.maxsize == max_plans()
        monkeypatch.setattr(container, "maxsize", 2)
    for i in range(5):
        assert tuning.select(f"problem{i}", (f"signature{i}",), torch.device("cpu"), [A, B], lambda c: None) == A
    assert len(tuning._memory) == len(tuning._chosen) == 2
    assert list(tuning._chosen) == [("signature3",), ("signature4",)]


# ---------------------------------------------------------------- where the file is, and exporting it

def test_cache_file_setting_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONCONV_CACHE_FILE", str(tmp_path / "shipped.jsonl"))
    assert tuning.cache_path() == tmp_path / "shipped.jsonl"
    tuning.tuning_cache().put("key", A)
    assert read_tuning_file(tmp_path / "shipped.jsonl")["entries"]["key"]["num_stages"] == 3
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TRITONCONV_CACHE_FILE", "~/model/tuning.jsonl")
    assert tuning.cache_path() == tmp_path / "model" / "tuning.jsonl"
    monkeypatch.setenv("TRITONCONV_CACHE_FILE", " ")
    assert tuning.cache_path().name == f"tuning-v{tuning.CACHE_FORMAT}.jsonl"


def test_export_writes_the_live_entries_for_another_process(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "cache.jsonl")
    for i in range(5):
        cache.put(f"key{i % 3}", candidate(i))
    shipped = tmp_path / "shipped.jsonl"
    assert cache.export(shipped) == 3
    assert len(shipped.read_text().splitlines()) == 1 + 3, "one record per live entry"
    assert not temp_files(tmp_path)
    monkeypatch.setenv("TRITONCONV_CACHE_FILE", str(shipped))
    tuning.reset_memory()  # a new process pointed at the shipped file
    assert tuning.tuning_cache().get("key0") == candidate(3) and tuning.tuning_cache().get("key2") == candidate(2)
    with pytest.raises(ValueError, match="onto itself"):
        cache.export(tmp_path / "." / "cache.jsonl")
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(OSError):  # the rename onto it fails
        cache.export(tmp_path / "a_directory")
    assert not temp_files(tmp_path)


# ---------------------------------------------------------------- sharing the file between users

@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_file_follows_the_umask(tmp_path, umask):
    """A group-writable cache directory is shared: the file must be as readable as the umask allows
    (a temp file renamed into place used to keep mode 0600)."""
    umask(0o002)
    path = tmp_path / "shared" / "cache.jsonl"
    cache = TuningCache(path)
    cache.put("key", A)
    assert mode(path) == 0o664
    for i in range(40):  # compacted: rewritten through a temp file
        cache.put("key", candidate(i))
    assert len(path.read_text().splitlines()) < 40 and mode(path) == 0o664
    umask(0o077)
    path.chmod(0o660)  # a rewrite keeps the file's own mode, as writing it in place would
    for i in range(40):
        cache.put("key", candidate(i))
    assert mode(path) == 0o660


def test_unreadable_cache_is_never_overwritten(tmp_path, monkeypatch, caplog):
    """Another user's file we may not read is left as it is (it used to be "rebuilt" with only our entry),
    and the process keeps its choices in memory, warning once."""
    path = tmp_path / "cache.jsonl"
    TuningCache(path).put("theirs", A)
    content = path.read_bytes()
    real_open = builtins.open

    def open_without_permission(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_without_permission)
    cache = TuningCache(path)
    with caplog.at_level("WARNING", logger="conv_backend"):
        assert cache.get("theirs") is None
        cache.put("mine", B)
        cache.put("more", A)
    assert cache.get("mine") == B and cache.get("more") == A
    monkeypatch.setattr(builtins, "open", real_open)
    assert path.read_bytes() == content
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Permission denied" in warnings[0] and "leaving it as it is" in warnings[0]


def test_file_we_may_not_write_is_not_replaced(tmp_path, monkeypatch, caplog):
    """Renaming a rewrite over a file we may only read (another user's, in a shared directory) would take
    it over: rebuilding or compacting first checks that it could be written in place."""
    path = tmp_path / "cache.jsonl"
    path.write_text("{their old format")
    real_os_open = os.open

    def read_only(file, flags, *args, **kwargs):
        if os.fspath(file) == str(path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    cache = TuningCache(path)
    with caplog.at_level("WARNING", logger="conv_backend"):
        cache.put("key", A)
    assert cache.get("key") == A and path.read_text() == "{their old format" and not temp_files(tmp_path)
    assert any("could not write tuning cache" in r.getMessage() for r in caplog.records)


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch, caplog):
    path = tmp_path / "cache.jsonl"
    path.write_text("{not a cache")  # rebuilt through a temp file renamed over it

    def fail_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", fail_replace)
    cache = TuningCache(path)
    with caplog.at_level("WARNING", logger="conv_backend"):
        cache.put("key", A)
    assert cache.get("key") == A
    assert not temp_files(tmp_path) and path.read_text() == "{not a cache"
    assert any("could not write tuning cache" in r.getMessage() for r in caplog.records)


def test_cache_path_that_is_a_directory_is_left_alone(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.mkdir()
    cache = TuningCache(path)
    cache.put("key", A)
    assert cache.get("key") == A and path.is_dir() and not temp_files(tmp_path) and not list(path.iterdir())


# ---------------------------------------------------------------- the journal

def test_put_stays_cheap_in_a_large_cache(tmp_path):
    """A put appends one line: at 20k entries it takes milliseconds (a whole-file rewrite took ~1 s)."""
    path = tmp_path / "cache.jsonl"
    path.write_text(HEADER + record_lines((f"key{i}" for i in range(20_000))))
    cache = TuningCache(path, max_entries=100_000)
    assert cache.get("key0") == A
    times = []
    for i in range(10):
        start = time.perf_counter()
        cache.put(f"new{i}", B)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.05, f"puts took {[round(t * 1e3, 1) for t in times]} ms"
    entries = read_tuning_file(path)["entries"]
    assert len(entries) == 20_010 and entries["key19999"]["num_warps"] == 4 and entries["new9"]["num_warps"] == 8


def test_cache_file_size_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITONCONV_CACHE_MAX_ENTRIES", raising=False)
    assert TuningCache(tmp_path / "c").max_entries == tuning.CACHE_MAX_ENTRIES == 20_000
    monkeypatch.setenv("TRITONCONV_CACHE_MAX_ENTRIES", "300")
    assert TuningCache(tmp_path / "c").max_entries == 300 and TuningCache(tmp_path / "c", 5).max_entries == 5
    with pytest.raises(ValueError):
        TuningCache(tmp_path / "c", 0)


def test_journal_is_compacted_keeping_the_latest_entries(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = TuningCache(path, max_entries=20)
    for i in range(200):
        cache.put(f"key{i % 3}", candidate(i))
    lines = path.read_text().splitlines()
    assert len(lines) <= 1 + 2 * 16, "rewritten once it doubles its live entries"
    assert {k: TuningCache(path).get(k) for k in ("key0", "key1", "key2")} == \
        {"key0": candidate(198), "key1": candidate(199), "key2": candidate(197)}
    for i in range(100):
        cache.put(f"many{i}", candidate(i))
    assert len(path.read_text().splitlines()) <= 1 + 2 * 20
    everything = TuningCache(path, max_entries=1000)
    assert everything.get("many99") == candidate(99) and everything.get("many0") is None, "oldest dropped"
    assert TuningCache(path, max_entries=20).get("many80") == candidate(80)
    assert not temp_files(tmp_path)


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path):
    """A writer that died mid-line leaves a line without its newline: readers skip it, and the next record
    starts on a line of its own."""
    path = tmp_path / "cache.jsonl"
    TuningCache(path).put("a", A)
    with open(path, "a") as f:
        f.write('{"key":"torn","kern')
    assert TuningCache(path).get("a") == A and TuningCache(path).get("torn") is None
    TuningCache(path).put("b", B)
    assert TuningCache(path).get("b") == B and TuningCache(path).get("a") == A
    lines = path.read_text().splitlines()
    assert lines[-2] == '{"key":"torn","kern' and json.loads(lines[-1])["key"] == "b"


def test_reader_follows_appends_and_rewrites_of_other_processes(tmp_path):
    path = tmp_path / "cache.jsonl"
    mine, theirs = TuningCache(path), TuningCache(path)
    assert mine.get("x") is None
    theirs.put("x", A)
    assert mine.get("x") == A, "a miss reads what another process appended"
    for i in range(60):  # their file is compacted, i.e. replaced, meanwhile
        theirs.put(f"y{i % 2}", candidate(i))
    theirs.put("x", B)
    assert mine.get("y1") == candidate(59) and mine.get("x") == B
    mine.put("z", A)
    assert set(read_tuning_file(path)["entries"]) == {"x", "y0", "y1", "z"}


def test_threads_sharing_one_cache_lose_nothing(tmp_path):
    """Threads of one process share tuning_cache(): its view of the file stays consistent."""
    path = tmp_path / "cache.jsonl"
    cache = TuningCache(path)

    def put_keys(worker: int) -> None:
        for i in range(30):
            cache.put(f"t{worker}-{i}", candidate(i, worker))
            cache.put("shared", candidate(i, worker))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(put_keys, range(4)))
    expected = {f"t{w}-{i}" for w in range(4) for i in range(30)} | {"shared"}
    assert set(read_tuning_file(path)["entries"]) == expected
    assert all(cache.get(key) is not None for key in expected) and TuningCache(path).get("t2-29") == candidate(29, 2)


# ---------------------------------------------------------------- processes sharing one file

WRITERS, PUTS = 4, 50
_start_together = None


def _init_writer(barrier) -> None:
    global _start_together
    _start_together = barrier


def _put_keys(path: str, worker: int, keys: list) -> int:
    _start_together.wait(timeout=300)  # every writer in its own process, all writing at once
    cache = TuningCache(Path(path))
    for i, key in enumerate(keys):
        cache.put(key, candidate(i, worker))
    return os.getpid()


@pytest.fixture(scope="module")
def writer_pool():
    """WRITERS fresh interpreters (spawn, as ranks of a job start), shared by the tests below: starting them
    is most of these tests' time."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(WRITERS, initializer=_init_writer, initargs=(ctx.Barrier(WRITERS),)) as pool:
        yield pool


def run_writers(pool, path: Path, keys_of) -> None:
    jobs = pool.starmap_async(_put_keys, [(str(path), w, keys_of(w)) for w in range(WRITERS)], chunksize=1)
    assert len(set(jobs.get(timeout=600))) == WRITERS


def test_processes_writing_different_keys_lose_none(tmp_path, writer_pool):
    path = tmp_path / "tritonconv" / "cache.jsonl"
    run_writers(writer_pool, path, lambda w: [f"w{w}-key{i}" for i in range(PUTS)])
    entries = read_tuning_file(path)["entries"]  # every line whole
    assert set(entries) == {f"w{w}-key{i}" for w in range(WRITERS) for i in range(PUTS)}
    assert TuningCache(path).get("w3-key7") == candidate(7, 3)
    assert not temp_files(path.parent)


def test_processes_writing_the_same_keys_keep_a_whole_file(tmp_path, writer_pool):
    """Every put rewrites a key another process wrote, so the journal is compacted while others append."""
    path = tmp_path / "tritonconv" / "cache.jsonl"
    keys = [f"key{i % 10}" for i in range(PUTS)]
    run_writers(writer_pool, path, lambda w: keys)
    entries = read_tuning_file(path)["entries"]
    assert set(entries) == set(keys)
    fresh = TuningCache(path)
    for i in range(10):  # a key's last put, by one of the writers
        assert fresh.get(f"key{i}") in {candidate(PUTS - 10 + i, w) for w in range(WRITERS)}
    assert not temp_files(path.parent)
