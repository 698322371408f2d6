"""conv_backend.tuning: choosing among candidates, and the on-disk cache that makes warm processes re-tune nothing."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing

import conv_backend.tuning as tuning
from conv_backend.tuning import Candidate, NoKernelError, TuningCache

from _util import read_tuning_file

CPU = torch.device("cpu")
A = Candidate.make("k", num_warps=4, num_stages=3, BLOCK=16)
B = Candidate.make("k", num_warps=8, num_stages=2, BLOCK=32)
C = Candidate.make("other", num_warps=4, num_stages=4, BLOCK=64, GROUP=8)
SIGNATURE = ("problem",)


class PreparedRun:
    """What select()'s `prepare` returns in these tests: a launch that knows its candidate."""

    def __init__(self, candidate: Candidate):
        self.candidate = candidate
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class FakeBench:
    """Stands in for triton.testing.do_bench: a fake clock per candidate (an exception: the candidate fails).

    The candidate still runs once, as under the real do_bench.
    """

    def __init__(self, times: dict):
        self.times = times
        self.timed = []
        self.prepared = []

    def prepare(self, candidate: Candidate) -> PreparedRun:
        self.prepared.append(PreparedRun(candidate))
        return self.prepared[-1]

    def __call__(self, fn, *args, **kwargs):
        assert isinstance(fn, _Tagged), "do_bench must time what prepare() returned"
        candidate = fn.candidate
        outcome = self.times[candidate]
        if isinstance(outcome, list):  # one time per timing pass
            outcome = outcome[self.timed.count(candidate)]
        if isinstance(outcome, Exception):
            raise outcome
        fn()
        self.timed.append(candidate)
        return outcome


class _Tagged:
    """A prepared launch labelled with its candidate, so the fake clock knows what it times."""

    def __init__(self, candidate: Candidate, fn):
        self.candidate, self.fn = candidate, fn

    def __call__(self) -> None:
        self.fn()


@pytest.fixture
def gpu_like(monkeypatch):
    """select() as on a GPU: tune for real (but with a fake clock). Candidates are not compiled ahead
    (tested on its own below), so each prepared launch runs only when timed."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", "1")
    real_benchmark = tuning._benchmark
    monkeypatch.setattr(tuning, "_benchmark",
                        lambda cands, prepare: real_benchmark(cands, lambda c: _Tagged(c, prepare(c))))

    def install(times: dict) -> FakeBench:
        bench = FakeBench(times)
        monkeypatch.setattr(triton.testing, "do_bench", bench)
        return bench

    return install


def no_benchmark(*args, **kwargs):
    raise AssertionError("a warm cache must not benchmark")


def read_cache() -> dict:
    return read_tuning_file(tuning.cache_path())


def header_line(format_: int = tuning.CACHE_FORMAT) -> str:
    return json.dumps({"tritonconv_tuning_cache": format_}) + "\n"


def select(key="prob", candidates=(A, B, C), bench: FakeBench | None = None):
    prepare = bench.prepare if bench is not None else PreparedRun
    return tuning.select(key, SIGNATURE, CPU, list(candidates), prepare)


# ---------------------------------------------------------------- where the cache lives

def test_cache_path_respects_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tuning.cache_path()
    assert path.parent == tmp_path / "tritonconv"
    assert path.suffix == ".jsonl"


def test_cache_path_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tuning.cache_path().parent == tmp_path / ".cache" / "tritonconv"


# ---------------------------------------------------------------- choosing and remembering

def test_select_picks_fastest_and_writes_cache(gpu_like):
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B
    assert sorted(map(str, bench.timed)) == sorted(map(str, [A, B, C] * tuning.TIMING_PASSES)), \
        "every candidate is timed once per pass"
    data = read_cache()
    assert data["format"] == tuning.CACHE_FORMAT
    (key,) = data["entries"]
    assert key.endswith(f"|prob|{tuning.candidate_set_id([A, B, C])}")
    assert f"triton {triton.__version__}" in key and f"torch {torch.__version__}" in key
    entry = data["entries"][key]
    assert entry["kernel"] == "k" and entry["num_warps"] == 8 and entry["num_stages"] == 2
    assert dict(map(tuple, entry["meta"])) == {"BLOCK": 32}


def test_chosen_kernels_records_the_choice(gpu_like):
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    signature = tuning.problem_signature((1, 4, 6, 6), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32)
    tuning.select("prob", signature, CPU, [A, B, C], bench.prepare)
    assert tuning.chosen_kernels((1, 4, 6, 6), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, "float32") == [B.describe()]


def test_in_process_memory_needs_no_disk(gpu_like, monkeypatch):
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B
    tuning.cache_path().unlink()
    monkeypatch.setattr(triton.testing, "do_bench", no_benchmark)
    assert select() == B


def test_warm_process_reuses_cache_without_benchmarking(gpu_like, monkeypatch):
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B
    tuning.reset_memory()  # a new process: only the file remains
    monkeypatch.setattr(triton.testing, "do_bench", no_benchmark)
    monkeypatch.setattr(tuning, "_benchmark", no_benchmark)
    assert select(candidates=(C, A, B)) == B  # the same candidates in another order


def test_distinct_problems_get_distinct_entries(gpu_like):
    select("p1", bench=gpu_like({A: 1.0, B: 2.0, C: 3.0}))
    select("p2", bench=gpu_like({A: 3.0, B: 2.0, C: 1.0}))
    entries = read_cache()["entries"]
    assert len(entries) == 2
    tuning.reset_memory()
    gpu_like({})  # any benchmark would fail with KeyError
    assert select("p1") == A and select("p2") == C


def test_stale_entry_not_among_candidates_is_retuned(gpu_like):
    select(bench=gpu_like({A: 3.0, B: 1.0, C: 2.0}))
    tuning.reset_memory()
    bench = gpu_like({A: 3.0, C: 2.0})
    assert select(candidates=(A, C), bench=bench) == C
    assert bench.timed, "the cached choice is not a candidate any more: tune again"


def test_choice_made_among_other_candidates_is_retuned(gpu_like):
    """A new candidate (say, a tile added in a later release) gets its chance on a warm cache."""
    assert select(candidates=(A, B), bench=gpu_like({A: 3.0, B: 2.0})) == B
    tuning.reset_memory()
    bench = gpu_like({A: 3.0, B: 2.0, C: 1.0})
    assert select(candidates=(A, B, C), bench=bench) == C and bench.timed
    assert tuning.candidate_set_id([A, B]) != tuning.candidate_set_id([A, B, C])
    assert tuning.candidate_set_id([B, A]) == tuning.candidate_set_id([A, B])


def test_in_process_choice_not_among_candidates_is_not_used(gpu_like):
    """Regression: select() returned the in-process choice even when it was not a candidate any more."""
    assert select(bench=gpu_like({A: 3.0, B: 1.0, C: 2.0})) == B
    bench = gpu_like({A: 3.0, C: 2.0})
    assert select(candidates=(A, C), bench=bench) in (A, C)


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    "\x00\xff\xfe garbage",
    json.dumps([1, 2, 3]) + "\n",
    header_line(999),
    json.dumps({"format": 1, "entries": {}}, indent=0),
    json.dumps({"entries": {}}) + "\n",
], ids=["truncated", "empty", "binary", "list", "future_format", "format_1_file", "no_format"])
def test_corrupt_or_foreign_cache_is_ignored_and_rebuilt(content, gpu_like, caplog):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B
    assert bench.timed
    data = read_cache()
    assert data["format"] == tuning.CACHE_FORMAT and len(data["entries"]) == 1


def test_wrong_format_entries_are_not_used(gpu_like):
    """A cache of another format is not trusted, even when it names a candidate for this very key."""
    select(bench=gpu_like({A: 3.0, B: 1.0, C: 2.0}))
    (key,) = read_cache()["entries"]
    record_of_a = {"key": key, "kernel": "k", "meta": [["BLOCK", 16]], "num_warps": 4, "num_stages": 3}
    tuning.cache_path().write_text(header_line(tuning.CACHE_FORMAT + 1) + json.dumps(record_of_a) + "\n")
    tuning.reset_memory()
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B and bench.timed
    assert read_cache()["format"] == tuning.CACHE_FORMAT


def test_format_1_file_is_left_alone(gpu_like):
    """The previous format's file, even naming a candidate for this very key, is neither used nor touched."""
    key = f"{tuning.environment_key(CPU)}|prob|{tuning.candidate_set_id([A, B, C])}"
    old = tuning.cache_path().with_name("tuning-v1.json")
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"format": 1, "entries": {key: {"kernel": "k", "meta": [["BLOCK", 16]],
                                                              "num_warps": 4, "num_stages": 3}}}))  # = A
    content = old.read_bytes()
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B and bench.timed
    assert old.read_bytes() == content and key in read_cache()["entries"]


@pytest.mark.parametrize("entry", [{"kernel": "k"}, "B", None, {"kernel": "k", "meta": 5, "num_warps": 8,
                                                                "num_stages": 2}])
def test_malformed_entry_is_retuned(entry, gpu_like):
    select(bench=gpu_like({A: 3.0, B: 1.0, C: 2.0}))
    (key,) = read_cache()["entries"]
    record = {"key": key, **entry} if isinstance(entry, dict) else entry  # not even a record: a garbled line
    tuning.cache_path().write_text(header_line() + json.dumps(record) + "\n")
    tuning.reset_memory()
    bench = gpu_like({A: 1.0, B: 3.0, C: 2.0})
    assert select(bench=bench) == A and bench.timed


def test_writer_merges_with_entries_written_by_another_process(tmp_path):
    path = tmp_path / "cache.json"
    mine, theirs = TuningCache(path), TuningCache(path)
    assert mine.get("nothing") is None  # loads (empty) state before the other process writes
    theirs.put("theirs", A)
    mine.put("mine", B)
    assert set(read_tuning_file(path)["entries"]) == {"theirs", "mine"}


def test_unwritable_cache_does_not_break_selection(gpu_like, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # $XDG_CACHE_HOME/tritonconv cannot be created
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    with caplog.at_level("WARNING", logger="conv_backend"):
        assert select(bench=bench) == B
    assert any("could not write tuning cache" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- failing candidates

def test_failing_candidates_are_skipped(gpu_like):
    bench = gpu_like({A: RuntimeError("out of shared memory"), B: ValueError("bad config"), C: 5.0})
    assert select(bench=bench) == C
    assert next(iter(read_cache()["entries"].values()))["kernel"] == "other"


def test_all_candidates_failing_raises_no_kernel_error(gpu_like):
    bench = gpu_like({A: RuntimeError("a"), B: RuntimeError("b"), C: RuntimeError("c")})
    with pytest.raises(NoKernelError):
        select(bench=bench)
    assert not tuning.cache_path().exists(), "a failure must not be cached as a choice"


def test_no_candidates_raises_no_kernel_error():
    with pytest.raises(NoKernelError):
        select(candidates=())


def test_no_kernel_error_is_a_runtime_error():
    assert issubclass(NoKernelError, RuntimeError)


def test_single_candidate_is_not_timed(gpu_like):
    bench = gpu_like({})
    assert select(candidates=(C,), bench=bench) == C
    assert not bench.timed


def test_interpreter_takes_first_candidate_without_timing(monkeypatch):
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", no_benchmark)
    assert select(candidates=(C, B, A)) == C
    assert not tuning.cache_path().exists(), "interpreter timings must never reach the GPU cache"


# ---------------------------------------------------------------- through launch_conv2d

@pytest.mark.interpreter
def test_launch_falls_back_to_aten_when_every_candidate_fails(gpu_like, kernel_launches, caplog):
    from conv_backend.dispatch import launch_conv2d
    gpu_like(_AlwaysFails())
    x, w, b = torch.randn(1, 8, 6, 6), torch.randn(8, 8, 3, 3), torch.randn(8)  # TMA and pointer candidates
    with caplog.at_level("WARNING", logger="conv_backend"):
        y = launch_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto")
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, 1))
    assert any("falls back to ATen" in r.getMessage() for r in caplog.records)
    assert not tuning.cache_path().exists()


class _AlwaysFails(dict):
    def __missing__(self, key):
        return RuntimeError("cannot run")


@pytest.mark.interpreter
def test_launch_tunes_once_then_reuses_disk_choice(gpu_like, kernel_launches, monkeypatch):
    """launch_conv2d on a "GPU-like" tuner: first call times both load paths; a fresh process re-tunes nothing."""
    from conv_backend import dispatch
    from conv_backend.dispatch import launch_conv2d

    class Times(dict):
        def __missing__(self, cand):
            return 1.0 if cand.kernel == "igemm_pointer" else 2.0

    bench = gpu_like(Times())
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 8, 3, 3)
    ref = F.conv2d(x, w, None, 1, 1)
    torch.testing.assert_close(launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto"), ref,
                               rtol=1e-5, atol=1e-5)
    assert {c.kernel for c in bench.timed} == {"igemm_tma", "igemm_pointer"}
    assert kernel_launches.names[-1] == "igemm_pointer_kernel", "the faster candidate runs the convolution"
    tuning.reset_memory()
    getattr(dispatch, "_plans", {}).clear()
    monkeypatch.setattr(tuning, "_benchmark", no_benchmark)
    del kernel_launches[:]
    torch.testing.assert_close(launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto"), ref,
                               rtol=1e-5, atol=1e-5)
    assert kernel_launches.names == ["igemm_pointer_kernel"]


# ---------------------------------------------------------------- the clock

def test_each_candidate_is_prepared_once_and_timed_by_do_bench(gpu_like):
    """The launch is built once per candidate, outside the clock; do_bench times that launch."""
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    assert select(bench=bench) == B
    assert [p.candidate for p in bench.prepared] == [A, B, C]
    assert all(p.calls == tuning.TIMING_PASSES for p in bench.prepared)
    assert bench.timed == [A, B, C] * tuning.TIMING_PASSES  # whole passes over the list, not back to back


def test_a_stalled_pass_does_not_decide(gpu_like):
    """A host stall inflates one do_bench run 2x: the candidate's other pass still counts."""
    bench = gpu_like({A: [1.0, 2.2], B: [2.1, 1.1], C: [1.5, 1.6]})
    assert select(bench=bench) == A
    bench = gpu_like({A: [2.0, 1.2], B: [1.4, 2.8], C: [1.3, 1.3]})
    assert select(key="other", bench=bench) == A


def test_a_failing_candidate_is_not_timed_again(gpu_like):
    bench = gpu_like({A: RuntimeError("out of shared memory"), B: 2.0, C: 1.0})
    assert select(bench=bench) == C
    assert A not in bench.timed and bench.timed.count(C) == tuning.TIMING_PASSES


def test_time_candidate_uses_do_bench_median(monkeypatch):
    seen = {}

    def fake_do_bench(fn, **kwargs):
        seen.update(kwargs)
        fn()
        return 0.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    ran = PreparedRun(A)
    assert tuning._time_candidate(ran) == 0.5
    assert ran.calls == 1 and seen.get("return_mode") == "median"


@pytest.mark.interpreter
@pytest.mark.parametrize("kernel,layout,offered", [
    ((1, 1), "contiguous", True),  # a batched GEMM over NCHW planes: read in place
    ((1, 1), "channels_last", False),
    ((3, 3), "contiguous", False),  # a gather per tap: copying to channels_last wins
], ids=["1x1_nchw", "1x1_channels_last", "3x3_nchw"])
def test_auto_offers_the_nchw_kernel_for_1x1_on_nchw_planes(kernel, layout, offered, gpu_like):
    from conv_backend.dispatch import launch_conv2d

    class Times(dict):
        def __missing__(self, cand):
            return 1.0 if cand.kernel == "igemm_nchw" else 2.0

    bench = gpu_like(Times())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=fmt)
    w = torch.randn(16, 8, *kernel)
    pad = kernel[0] // 2
    y = launch_conv2d(x, w, None, (1, 1), (pad, pad), (1, 1), 1, "ieee", "auto")
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, pad), rtol=1e-5, atol=1e-5)
    assert ("igemm_nchw" in {c.kernel for c in bench.timed}) == offered


@pytest.mark.interpreter
def test_plan_builds_each_candidates_launch_once_while_tuning(gpu_like, monkeypatch):
    """Launch setup (closures, KernelLauncher, first JIT launch) stays outside the clock: however often
    do_bench calls a candidate, its launch is built once, and once more for the chosen plan."""
    from conv_backend.dispatch import launch_conv2d
    from conv_backend.kernels import implicit_gemm as igemm_mod

    built = []
    real_launcher = igemm_mod._launcher
    monkeypatch.setattr(igemm_mod, "_launcher",
                        lambda cand, *a, **k: built.append(cand) or real_launcher(cand, *a, **k))

    def do_bench_thrice(fn, **kwargs):
        for _ in range(3):
            fn()
        return 2.0 if fn.candidate.kernel == "igemm_tma" else 1.0

    gpu_like({})
    monkeypatch.setattr(triton.testing, "do_bench", do_bench_thrice)
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 8, 3, 3)
    y = launch_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, "ieee", "auto")
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), rtol=1e-5, atol=1e-5)
    timed, chosen = built[:-1], built[-1]
    assert len(timed) == len(set(timed)) >= 2, "a candidate's launch was rebuilt inside the clock"
    assert chosen.kernel == "igemm_pointer"


def test_a_candidate_failing_in_the_second_pass_keeps_its_first_time(gpu_like):
    bench = gpu_like({A: [1.0, RuntimeError("launch failed")], B: 2.0, C: 3.0})
    assert select(bench=bench) == A


# ---------------------------------------------------------------- compiling candidates ahead of timing

def _async_mode_active() -> bool:
    return triton.runtime._async_compile.active_mode.get() is not None


needs_async_compile = pytest.mark.skipif(not hasattr(triton, "AsyncCompileMode"),
                                         reason="this Triton has no AsyncCompileMode")


@pytest.mark.parametrize("setting,threads", [("3", 3), ("1", 1), ("0", 1), (" 12 ", 12)])
def test_compile_threads_setting(setting, threads, monkeypatch):
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", setting)
    assert tuning.compile_threads() == threads


@pytest.mark.parametrize("setting", [None, "", "many"])
def test_compile_threads_default_is_the_usable_cpus(setting, monkeypatch):
    if setting is None:
        monkeypatch.delenv("TRITONCONV_COMPILE_THREADS", raising=False)
    else:
        monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", setting)
    assert 1 <= tuning.compile_threads() <= 32


@needs_async_compile
def test_compile_ahead_runs_every_candidate_compile_only(monkeypatch):
    """Each candidate's launch runs once with compiling_only set, inside Triton's AsyncCompileMode, and one
    that fails does not stop the others; afterwards both are off again."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", "4")
    seen = []

    def prepare(candidate):
        def run():
            seen.append((candidate, tuning.compiling_only.get(), _async_mode_active()))
            if candidate == B:
                raise RuntimeError("does not compile")
        return run

    launches = tuning._compile_ahead([A, B, C], prepare)
    assert list(launches) == [A, B, C]  # what timing runs (B fails there again, and is skipped)
    assert seen == [(A, True, True), (B, True, True), (C, True, True)]
    assert not tuning.compiling_only.get() and not _async_mode_active()


def test_collecting_pass_launches_candidates_to_compile_and_decides_nothing(gpu_like):
    """In a collecting pass (backend.make_plans' first, with precompile.recording) a cold problem's
    candidates each run once with compiling_only set, nothing is timed or remembered, and select() raises
    CandidatesCollected; the next select() tunes as usual."""
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    seen = []

    def prepare(candidate):
        return lambda: seen.append((candidate, tuning.compiling_only.get()))

    with tuning.collecting_candidates(), pytest.raises(tuning.CandidatesCollected):
        tuning.select("prob", SIGNATURE, CPU, [A, B, C], prepare)
    assert sorted(map(str, seen)) == sorted(map(str, [(A, True), (B, True), (C, True)]))
    assert bench.timed == [] and not tuning.compiling_only.get() and not tuning.collecting.get()
    assert not tuning.cache_path().exists(), "a collecting pass writes no choice"
    assert select(bench=bench) == B


@pytest.mark.parametrize("threads,interpreted", [("1", False), ("4", True)], ids=["one_thread", "interpreter"])
def test_compile_ahead_skipped(threads, interpreted, monkeypatch):
    """One thread, or the interpreter (nothing to compile): candidates compile as they are first timed."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: interpreted)
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", threads)
    assert tuning._compile_ahead([A, B, C], lambda c: pytest.fail("prepared a candidate")) == {}


@needs_async_compile
def test_select_compiles_ahead_then_times(gpu_like, monkeypatch):
    """With compile threads, select() first runs every candidate compile-only, then times them as before."""
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", "2")
    bench = gpu_like({A: 3.0, B: 1.0, C: 2.0})
    compile_only = []
    real_prepare = bench.prepare

    def prepare(candidate):
        run = real_prepare(candidate)
        return lambda: (compile_only.append((candidate, tuning.compiling_only.get())), run())

    bench.prepare = prepare
    assert select(bench=bench) == B
    assert len(bench.prepared) == 3, "timing reuses the launches built while compiling ahead"
    assert compile_only[:3] == [(A, True), (B, True), (C, True)]
    assert all(not flag for _, flag in compile_only[3:]) and len(compile_only) == 3 + 3 * tuning.TIMING_PASSES


def test_launcher_compiles_without_launching_when_compiling_only():
    """KernelLauncher under compiling_only: the kernel's warmup (compile, no launch) with every argument."""
    from conv_backend.kernels.common import KernelLauncher

    class Kernel:
        def __init__(self):
            self.warmups = []

        def warmup(self, *args, grid, **meta):
            self.warmups.append((args, grid, meta))

        def __getitem__(self, grid):
            raise AssertionError("launched while compiling only")

    kernel = Kernel()
    launcher = KernelLauncher(kernel, (3, 2), (7, 8), BLOCK=16, num_warps=4)
    token = tuning.compiling_only.set(True)
    try:
        launcher("x", "w")
    finally:
        tuning.compiling_only.reset(token)
    assert kernel.warmups == [(("x", "w", 7, 8), (3, 2), {"BLOCK": 16, "num_warps": 4})]
    assert launcher._direct is None  # the first real launch still goes through the JIT


def test_a_compile_error_is_summed_up_by_its_reason_not_its_source_position():
    import ast

    from triton.compiler.errors import CompilationError

    src = "def kernel():\n    acc = mma(a, b, acc)\n"
    node = ast.parse(src).body[0].body[0].value  # the call, at line 2
    inner = CompilationError("def mma():\n    return tl.dot(a, b)\n", node, "input_precision must be one of ...")
    outer = CompilationError(src, node, None)  # what the call site raises, `from` the callee's error
    outer.__cause__ = inner
    assert str(outer).splitlines()[0] == "at 2:10:"
    assert tuning.failure_summary(outer) == "input_precision must be one of ..."
    assert tuning.failure_summary(RuntimeError("CUDA out of memory.\nmore")) == "CUDA out of memory."
    failures: dict = {}
    tuning._candidate_failed(Candidate("igemm_pointer", (), 4, 3), outer, failures)
    assert failures == {"CompilationError": [1, "input_precision must be one of ...", False]}
