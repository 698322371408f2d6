"""Autotune levels: the ranking rule, what each level times, reuse across batch sizes, one tuning per problem
at a time, failed tunings, and the pre-tuning CLI. Timing is faked throughout (no GPU here)."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch

import conv_backend.tuning as tuning
from conv_backend import ranking
from conv_backend.kernels import common, depthwise, halo, implicit_gemm, warp_specialized
from conv_backend.ranking import ConvShape, family, rank_candidates
from conv_backend.tuning import Candidate, NoKernelError, RetryPolicy

CPU = torch.device("cpu")
SMS = 132  # an H100


def shape_of(n, c, hw, oc, k, stride=1, padding=None, dilation=1, groups=1, dtype=torch.bfloat16) -> ConvShape:
    kh, kw = (k, k) if isinstance(k, int) else k
    pad = (padding if padding is not None else ((kh - 1) * dilation // 2, (kw - 1) * dilation // 2))
    pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
    return ConvShape(n, c, hw, hw, oc, kh, kw, (stride, stride), pad, (dilation, dilation), groups, dtype)


def signature_of(shape: ConvShape) -> tuple:
    weight = (shape.out_channels, shape.channels // shape.groups, shape.kernel_h, shape.kernel_w)
    return tuning.problem_signature((shape.batch, shape.channels, shape.in_h, shape.in_w), weight, shape.stride,
                                    shape.padding, shape.dilation, shape.groups, shape.dtype)


@pytest.fixture
def hopper(monkeypatch):
    """The candidate builders as on an H100 with Triton 3.6 (no GPU needed: they only read sizes)."""
    for module in (implicit_gemm, depthwise):
        monkeypatch.setattr(module, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(warp_specialized, "unaligned_views_supported", lambda: True)

    def candidates(shape: ConvShape, gluon: bool = True, nchw: bool = False) -> list:
        """What implicit_gemm_plan offers a channels_last (`nchw`: NCHW) problem on Hopper, split-K aside;
        `gluon=False`: exact fp32, where the Gluon kernels do not run."""
        c, oc, dtype, kh = shape.channels, shape.out_channels, shape.dtype, shape.kernel_h
        strided = shape.stride != (1, 1)
        flat = (kh, shape.kernel_w) == (1, 1) and not strided and shape.padding == (0, 0) and not nchw
        maps = (1, 1, shape.batch * shape.out_h * shape.out_w) if flat else (shape.batch, shape.out_h, shape.out_w)
        cands = implicit_gemm.tma_candidates(c, oc, maps[1], maps[2], maps[0], 1, dtype, strided=strided, flat=flat)
        if gluon:
            if not strided and kh > 1:
                cands += halo.halo_candidates(c, oc, shape.out_h, shape.out_w, kh, shape.dilation[0], dtype)
                cands += warp_specialized.ws_halo_candidates(c, oc, *maps, kh, shape.dilation[0], dtype, SMS)
            cands += warp_specialized.ws_candidates(c, oc, *maps, dtype, SMS, strided=strided)
        cands += implicit_gemm.pointer_candidates(c, oc, dtype)
        if not flat and (shape.out_h % 8 or shape.out_w % 8):
            cands += implicit_gemm.gather_candidates(c, oc, dtype)
        if nchw and (kh, shape.kernel_w) == (1, 1):
            cands += implicit_gemm.nchw_candidates(c, oc, dtype, flat=True)
        cands += implicit_gemm.seed_candidates(c, 1, shape.batch)
        assert len({cand.describe() for cand in cands}) == len(cands)
        return cands

    return candidates


# ---------------------------------------------------------------- the ranking rule (bench/NOTES.md)

def test_3x3_bf16_on_hopper_ranks_the_patch_kernel_first(hopper):
    shape = shape_of(32, 64, 56, 64, 3)  # ResNet-50's 3x3 64 at 56x56
    cands = hopper(shape)
    best = rank_candidates(cands, shape)[0]
    assert best.kernel == "igemm_ws_halo", best.describe()
    assert (best.params["BLOCK_H"], best.params["BLOCK_W"], best.num_warps) == (16, 8, 4)


def test_few_input_channels_rank_pixels_as_n_first(hopper):
    shape = shape_of(16, 16, 1024, 128, 3, dtype=torch.float32)  # KernelBench #63
    best = rank_candidates(hopper(shape), shape)[0]
    assert best.kernel == "igemm_ws_halo" and best.params["PIXELS_AS_N"] and best.params["SPLIT_TILE"]


def test_halved_channel_chunk_ranks_256_pixel_tiles_first(hopper):
    shape = ConvShape(8, 64, 512, 1024, 128, 3, 3, (1, 1), (1, 1), (1, 1), 1, torch.float32)  # KernelBench #55
    best = rank_candidates(hopper(shape), shape)[0]
    assert best.kernel == "igemm_ws_halo" and not best.params["PIXELS_AS_N"]
    assert (best.params["BLOCK_H"], best.params["BLOCK_W"], best.params["BLOCK_N"], best.num_warps) == (16, 16, 128, 8)


KB80 = ConvShape(8, 32, 512, 512, 64, 5, 9, (1, 1), (2, 4), (2, 3), 1, torch.float32)  # the seed problem


def _patch_tile(bh, bw, bk, bn, warps, stages):
    return (f"igemm_ws_halo[BLOCK_B=1,BLOCK_H={bh},BLOCK_K={bk},BLOCK_N={bn},BLOCK_W={bw},CONSUMERS=1,"
            f"PIXELS_AS_N=False,SPLIT_TILE=False,warps={warps},stages={stages}]")


@pytest.mark.parametrize("shape,picked", [
    (KB80._replace(dtype=torch.float32), _patch_tile(16, 16, 16, 64, 8, 4)),
    (KB80._replace(dtype=torch.bfloat16), _patch_tile(16, 16, 32, 64, 8, 3)),
    (ConvShape(8, 64, 512, 256, 128, 5, 7, (1, 1), (0, 0), (1, 1), 1, torch.float32),
     _patch_tile(16, 16, 16, 128, 8, 3)),
    (KB80._replace(padding=(0, 0), dilation=(1, 1)), _patch_tile(16, 8, 32, 64, 4, 3)),
    (shape_of(32, 256, 14, 256, 3), _patch_tile(16, 16, 32, 64, 8, 4)),
], ids=["kb80_fp32", "kb80_bf16", "kb56", "kb62", "3x3_256_at_14"])
def test_patch_kernel_tile_is_the_one_the_h100_tuner_picked(shape, picked, hopper):
    """bench/results/*-run30.md, "Kernels chosen" (channels_last): the tuner's picks when it timed everything."""
    assert rank_candidates(hopper(shape), shape)[0].describe() == picked


@pytest.mark.parametrize("shape,tile", [
    (shape_of(32, 512, 7, 512, 3), (1, 8, 8, 128)),  # 7x7 maps: one map's box, no patch kernel fits
    (shape_of(32, 128, 56, 128, 3, stride=2), (1, 4, 32, 128)),  # ResNet's 3x3/2: strided boxes
    (shape_of(32, 64, 56, 256, 1), (1, 1, 128, 128)),  # 1x1 into channels_last, bf16
], ids=["7x7", "3x3_stride2", "1x1_bf16"])
def test_tap_per_step_kernel_ranks_first_where_the_patch_kernel_does_not_serve(shape, tile, hopper):
    best = rank_candidates(hopper(shape), shape)[0]
    assert best.kernel == "igemm_ws", best.describe()
    p = best.params
    assert (p["BLOCK_B"], p["BLOCK_H"], p["BLOCK_W"], p["BLOCK_N"], best.num_warps, p["CONSUMERS"]) == (*tile, 4, 1)


def test_fp32_1x1_ranks_the_flat_tma_tile_first(hopper):
    shape = shape_of(16, 64, 256, 128, 1, dtype=torch.float32)  # #87's class
    best = rank_candidates(hopper(shape), shape)[0]
    assert best.kernel == "igemm_tma" and best.params["BLOCK_H"] == 1 and best.params["BLOCK_W"] == 128
    assert best.num_warps == 4


def test_exact_fp32_on_hopper_ranks_tma_before_pointer(hopper):
    shape = shape_of(8, 64, 64, 64, 3, dtype=torch.float32)
    ranked = rank_candidates(hopper(shape, gluon=False), shape)
    assert ranked[0].kernel == "igemm_tma" and ranked[-1].kernel == "igemm_pointer"


def test_stem_ranks_the_direct_kernel_first(hopper):
    shape = shape_of(32, 3, 224, 64, 7, stride=2, padding=3)
    best = rank_candidates(hopper(shape), shape)[0]
    assert best.kernel == "seed_direct" and (best.params["BLOCK_OC"], best.params["BLOCK_HW"]) == (64, 128)


def test_1x1_on_nchw_ranks_streamed_nchw_tiles_first(hopper):
    shape = shape_of(32, 64, 56, 256, 1)
    best = rank_candidates(hopper(shape, nchw=True), shape)[0]
    assert best.kernel == "igemm_nchw" and best.params["TILES"] == 4
    assert (best.params["BLOCK_M"], best.params["BLOCK_N"]) == (64, 64)


@pytest.mark.parametrize("channels_last,expected", [(True, dict(BLOCK_H=8, BLOCK_W=8, BLOCK_C=64, maxnreg=80)),
                                                    (False, dict(BLOCK_H=8, BLOCK_W=64, STREAM_ROWS=1))],
                         ids=["channels_last", "nchw"])
def test_depthwise_ranks_the_measured_tiles_first(channels_last, expected, hopper):
    shape = shape_of(16, 64, 512, 64, 3, groups=64, dtype=torch.float32)
    best = rank_candidates(depthwise.depthwise_candidates(channels_last, streamable=True), shape)[0]
    assert {k: best.params.get(k) for k in expected} == expected


def test_without_tma_the_pointer_tile_matches_the_output_channels(hopper):
    shape = shape_of(8, 32, 128, 64, 3, dtype=torch.float32)
    best = rank_candidates(implicit_gemm.pointer_candidates(32, 64, torch.float32), shape)[0]
    assert best.params["BLOCK_N"] == 64


def test_signature_round_trip():
    shape = shape_of(2, 8, 10, 16, (3, 5), stride=2, padding=(1, 2), dilation=1, dtype=torch.float16)
    assert ConvShape.from_signature(signature_of(shape)) == shape
    assert ConvShape.from_signature(("problem",)) is None


def test_short_list_spans_families_and_keeps_the_leader(hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    ranked = rank_candidates(hopper(shape), shape)
    picked = ranking.short_list(ranked, 4, 3)
    assert len(picked) == 4 and picked[0] == ranked[0]
    assert len({family(c) for c in picked}) == 3
    assert ranking.short_list(ranked[:2], 4, 3) == ranked[:2]


# ---------------------------------------------------------------- what each level times

class FakeClock:
    """Stands in for _time_candidate: a time per candidate kernel name (default: by rank order, the described
    name's length), counting calls and the largest number of timings in flight at once."""

    def __init__(self, times=None, delay: float = 0.0):
        self.times, self.delay = times or {}, delay
        self.timed, self.in_flight, self.most_in_flight = [], 0, 0
        self._lock = threading.Lock()

    def __call__(self, fn) -> float:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            # tuned_plan times functools.partial(launch, ...): its launch may know the candidate
            candidate = getattr(fn, "candidate", None) or getattr(getattr(fn, "func", None), "candidate", fn)
            outcome = self.times.get(candidate, 1.0 + len(self.timed) * 1e-3)
            if isinstance(outcome, BaseException):
                raise outcome
            with self._lock:
                self.timed.append(candidate)
            return outcome
        finally:
            with self._lock:
                self.in_flight -= 1


class Prepared:
    """A launch that knows its candidate (select's `prepare`, or tuned_plan's `make`)."""

    def __init__(self, candidate):
        self.candidate = candidate

    def __call__(self, *tensors):
        pass


@pytest.fixture
def clock(monkeypatch):
    """select() as on a GPU, with a fake clock; candidates are compiled as they are timed."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setenv("TRITONCONV_COMPILE_THREADS", "1")
    monkeypatch.delenv("TRITONCONV_AUTOTUNE", raising=False)

    def install(times=None, delay=0.0) -> FakeClock:
        fake = FakeClock(times, delay)
        monkeypatch.setattr(tuning, "_time_candidate", fake)
        return fake

    return install


def run_select(shape, cands, key="prob", **kwargs):
    return tuning.select(key, signature_of(shape), CPU, cands, Prepared, **kwargs)


def test_default_level_times_at_most_four_candidates_on_a_cold_cache(clock, hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    assert len(cands) > 8
    fake = clock()
    choice = run_select(shape, cands)
    assert 1 < len(set(fake.timed)) <= 4, "the default level must not time every candidate"
    assert choice in fake.timed and choice in cands


def test_fast_compiles_only_the_short_list(clock, hopper, monkeypatch):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    compiled = []
    monkeypatch.setattr(tuning, "_compile_ahead", lambda timed, prepare: compiled.extend(timed) or {})
    clock()
    run_select(shape, cands, level="fast")
    assert 1 < len(compiled) <= 4


def test_exhaustive_times_every_candidate(clock, hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    fake = clock({cands[-1]: 0.5})
    assert run_select(shape, cands, level="exhaustive") == cands[-1]
    assert set(fake.timed) == set(cands) and len(fake.timed) == len(cands) * tuning.TIMING_PASSES


def test_none_never_times_and_stores_nothing_on_disk(clock, hopper, monkeypatch):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    monkeypatch.setattr(tuning, "_benchmark", lambda *a: pytest.fail("level 'none' timed"))
    assert run_select(shape, cands, level="none") == rank_candidates(cands, shape)[0]
    assert not tuning.cache_path().exists()


def test_levels_keep_their_results_apart(clock, hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    run_select(shape, cands, level="none")
    fake = clock()
    run_select(shape, cands, level="fast")
    assert fake.timed, "an untimed pick must not serve a fast request"
    fake = clock()
    run_select(shape, cands, level="exhaustive")
    assert len(set(fake.timed)) == len(cands), "a fast result must not serve an exhaustive request"
    exhaustive = run_select(shape, cands, level="exhaustive")
    tuning.reset_memory()  # a new process: an exhaustive result on disk serves every level
    fake = clock()
    assert run_select(shape, cands, level="fast") == exhaustive == run_select(shape, cands, level="none")
    assert not fake.timed


def test_fast_result_serves_fast_in_a_new_process(clock, hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    clock()
    chosen = run_select(shape, cands)
    tuning.reset_memory()
    fake = clock()
    assert run_select(shape, cands) == chosen and not fake.timed


def test_level_comes_from_the_context_variable_then_the_environment(clock, hopper, monkeypatch):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    monkeypatch.setenv("TRITONCONV_AUTOTUNE", "exhaustive")
    assert tuning.current_autotune_level() == "exhaustive"
    with tuning.autotune_level_set("none"):
        fake = clock()
        run_select(shape, cands)
        assert not fake.timed
    assert tuning.autotune_level.get() is None
    fake = clock()
    run_select(shape, cands, key="other")
    assert len(set(fake.timed)) == len(cands)


@pytest.mark.parametrize("where", ["argument", "context", "environment"])
def test_unknown_level_is_an_error_naming_the_valid_ones(where, clock, monkeypatch):
    shape = shape_of(1, 8, 8, 8, 3)
    kwargs = {}
    if where == "argument":
        kwargs["level"] = "fastest"
    elif where == "context":
        monkeypatch.setattr(tuning, "autotune_level", tuning.contextvars.ContextVar("test_level", default="fastest"))
    else:
        monkeypatch.setenv("TRITONCONV_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="'fastest'.*none, fast, exhaustive"):
        run_select(shape, [Candidate.make("a"), Candidate.make("b")], **kwargs)
    assert tuning.AUTOTUNE_LEVELS == ("none", "fast", "exhaustive")


# ---------------------------------------------------------------- the same layer at another batch size

CANDS = [Candidate.make(f"k{i}", BLOCK=16 * i) for i in range(1, 7)]
WINNER = CANDS[2]  # on the short list (unknown kernels keep their order)


def _plan(batch, size, channels=8, cands=CANDS, layout=torch.contiguous_format):
    x = torch.empty(batch, channels, size, size).contiguous(memory_format=layout)
    w, y = torch.empty(16, channels, 3, 3), torch.empty(batch, 16, size, size)
    made = []

    def make(cand):
        made.append(cand)
        return Prepared(cand)

    common.tuned_plan("test", x, w, None, y, (1, 1), (1, 1), (1, 1), 1, cands, make)
    return made[-1]


def test_fast_reuses_the_choice_for_the_same_layer_at_another_batch_size_and_resolution(clock):
    fake = clock({WINNER: 0.5})
    first = _plan(2, 8)
    assert first == WINNER and fake.timed
    fake = clock()
    assert _plan(4, 12) == first and not fake.timed
    tuning.reset_memory()  # also from the disk cache in a new process
    assert _plan(3, 10) == first and not fake.timed


def test_reuse_needs_the_same_layer_and_the_choice_among_the_candidates(clock):
    clock({WINNER: 0.5})
    _plan(2, 8)
    for other in (dict(channels=16), dict(layout=torch.channels_last), dict(cands=[c for c in CANDS if c != WINNER])):
        fake = clock()
        _plan(4, 12, **other)
        assert fake.timed, other


def test_exhaustive_does_not_reuse_across_sizes(clock):
    clock({WINNER: 0.5})
    _plan(2, 8)
    fake = clock()
    with tuning.autotune_level_set("exhaustive"):
        _plan(4, 12)
    assert len(set(fake.timed)) == len(CANDS)


def test_layer_key_drops_batch_and_sizes_only():
    rest = "|w(16, 8, 3, 3)(72, 9, 3, 1)"
    a = f"igemm-auto|x(2, 8, 6, 6)(288, 1, 48, 8){rest}|y(576, 1, 96, 16)|s(1, 1)p(1, 1)d(1, 1)g1"
    b = f"igemm-auto|x(4, 8, 9, 9)(648, 1, 72, 8){rest}|y(1296, 1, 144, 16)|s(1, 1)p(1, 1)d(1, 1)g1"
    assert tuning.layer_key(a) == tuning.layer_key(b) is not None
    assert tuning.layer_key(a.replace("p(1, 1)", "p(0, 0)")) != tuning.layer_key(a)
    assert tuning.layer_key("prob") is None


# ---------------------------------------------------------------- one tuning per problem at a time

def test_threads_meeting_one_new_problem_tune_it_once(clock, hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    fake = clock(delay=0.02)
    results = []
    threads = [threading.Thread(target=lambda: results.append(run_select(shape, cands))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(fake.timed) == len(set(fake.timed)) * tuning.TIMING_PASSES <= 4 * tuning.TIMING_PASSES, \
        "each short-listed candidate timed in one tuning"
    assert fake.most_in_flight == 1


def test_different_problems_are_never_timed_at_once(clock):
    fake = clock(delay=0.01)
    cands = [Candidate.make("a"), Candidate.make("b")]
    threads = [threading.Thread(target=run_select, args=(shape_of(1, 8, 8, 8, 3), cands, f"p{i}"))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.timed) == 4 * 2 * tuning.TIMING_PASSES, "four problems tuned"
    assert fake.most_in_flight == 1
    assert not tuning._problem_locks, "per-problem locks are dropped once no thread holds them"


# ---------------------------------------------------------------- failed tunings

def test_failure_message_names_each_cause_and_marks_out_of_memory_transient(clock):
    a, b, c = Candidate.make("a"), Candidate.make("b"), Candidate.make("c")
    clock({a: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
           b: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"),
           c: RuntimeError("an illegal memory access")})
    with pytest.raises(NoKernelError) as info:
        run_select(shape_of(1, 8, 8, 8, 3), [a, b, c], level="exhaustive")
    message = str(info.value)
    assert "2x OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in message
    assert "1x RuntimeError: an illegal memory access" in message
    assert info.value.transient and info.value.causes["OutOfMemoryError"][0] == 2
    assert not tuning.cache_path().exists()


def test_unexpected_failures_warn_once_and_resource_failures_stay_quiet(clock, caplog, monkeypatch):
    monkeypatch.setattr(tuning, "_warned_failures", set())
    monkeypatch.setattr(tuning, "_tuning_noticed", True)  # only the candidates' warnings here
    a, b = Candidate.make("a"), Candidate.make("b")
    clock({a: ValueError("a bug"), b: RuntimeError("out of shared memory")})
    with caplog.at_level(logging.WARNING, logger="conv_backend"), pytest.raises(NoKernelError) as info:
        run_select(shape_of(1, 8, 8, 8, 3), [a, b])
    assert not info.value.transient
    with caplog.at_level(logging.WARNING, logger="conv_backend"), pytest.raises(NoKernelError):
        run_select(shape_of(1, 8, 8, 8, 3), [a, b], key="another")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ValueError: a bug" in warnings[0]


def test_fast_times_the_rest_when_the_short_list_cannot_run(clock, hopper):
    shape = shape_of(32, 64, 56, 64, 3)
    cands = hopper(shape)
    short = ranking.short_list(rank_candidates(cands, shape), tuning.FAST_CANDIDATES, tuning.FAST_FAMILIES)
    fake = clock({c: triton_compile_error() for c in short})
    choice = run_select(shape, cands)
    assert choice not in short and choice in fake.timed


def test_when_every_candidate_fails_the_error_counts_all_of_them(clock):
    cands = [Candidate.make(f"k{i}") for i in range(6)]
    clock({c: triton_compile_error() for c in cands})
    with pytest.raises(NoKernelError, match=r"\(6 tried\).*6x RuntimeError: PassManager"):
        run_select(shape_of(1, 8, 8, 8, 3), cands)


def triton_compile_error():
    return RuntimeError("PassManager::run failed: compilation error")


def test_retry_policy_retries_transient_failures_with_growing_intervals():
    now = [0.0]
    policy = RetryPolicy(max_attempts=3, first_interval=1.0, growth=4.0, clock=lambda: now[0])
    oom = NoKernelError("every kernel candidate failed", {"OutOfMemoryError": (3, "CUDA out of memory")}, True)
    assert not policy.should_rebuild("k"), "a plan that never failed is not rebuilt"
    policy.failed("k", oom)
    assert not policy.should_rebuild("k")
    now[0] = 1.0
    assert policy.should_rebuild("k")
    policy.failed("k", oom)  # attempt 2 failed at t=1
    now[0] = 4.9
    assert not policy.should_rebuild("k")
    now[0] = 5.0
    assert policy.should_rebuild("k")
    policy.failed("k", oom)  # attempt 3: the last
    now[0] = 1e6
    assert not policy.should_rebuild("k")
    policy.succeeded("k")
    assert not policy.should_rebuild("k")


def test_retry_policy_never_retries_a_lasting_failure():
    now = [0.0]
    policy = RetryPolicy(clock=lambda: now[0])
    policy.failed("k", NoKernelError("every kernel candidate failed", {"CompilationError": (2, "bad")}, False))
    now[0] = 1e6
    assert not policy.should_rebuild("k")


def test_out_of_memory_is_transient():
    assert tuning.is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert tuning.is_transient(RuntimeError("CUDA error: out of memory"))
    assert not tuning.is_transient(RuntimeError("an illegal memory access"))
    assert not tuning.is_transient(ValueError("out of memory"))


# ---------------------------------------------------------------- progress

def test_each_tuning_logs_one_line_and_long_tuning_warns_once(clock, caplog, monkeypatch):
    monkeypatch.setattr(tuning, "TUNING_NOTICE_SECONDS", 0.0)
    monkeypatch.setattr(tuning, "_tuning_seconds", 0.0)
    monkeypatch.setattr(tuning, "_tuning_noticed", False)
    clock(delay=0.001)
    cands = [Candidate.make("a"), Candidate.make("b")]
    with caplog.at_level(logging.INFO, logger="conv_backend"):
        for key in ("p1", "p2"):
            run_select(shape_of(1, 8, 8, 8, 3), cands, key=key)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 2 and all("2 candidate(s) timed" in m and "chose" in m for m in infos)
    assert "in [1, 8, 8, 8]" in infos[0].replace("(", "[").replace(")", "]")
    assert len(warnings) == 1
    assert "TORCH_LOGS" in warnings[0] and "conv_backend.tune" in warnings[0] and "autotune" in warnings[0]


def test_the_warning_comes_while_a_long_tuning_runs(clock, caplog, monkeypatch):
    monkeypatch.setattr(tuning, "TUNING_NOTICE_SECONDS", 0.05)
    monkeypatch.setattr(tuning, "_tuning_seconds", 0.0)
    monkeypatch.setattr(tuning, "_tuning_noticed", False)
    seen_while_timing = []

    def slow_clock(fn):
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(r.levelno == logging.WARNING for r in caplog.records):
            time.sleep(0.01)
        seen_while_timing.append(any(r.levelno == logging.WARNING for r in caplog.records))
        return 1.0

    monkeypatch.setattr(tuning, "_time_candidate", slow_clock)
    with caplog.at_level(logging.INFO, logger="conv_backend"):
        run_select(shape_of(1, 8, 8, 8, 3), [Candidate.make("a"), Candidate.make("b")])
    assert seen_while_timing and seen_while_timing[0], "the warning waited for the tuning to end"
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


# ---------------------------------------------------------------- the pre-tuning CLI

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.interpreter
def test_tune_cli_leaves_the_choices_in_the_cache_file(clock, tmp_path, capsys, monkeypatch):
    """The CLI compiles and runs the model at the level asked for, and the cache file gets its choices (timing
    faked: under the interpreter the tuner would time nothing)."""
    from conv_backend import tune
    levels = []
    real_select = tuning.select
    monkeypatch.setattr(common, "select", lambda *a: levels.append(tuning.current_autotune_level()) or real_select(*a))
    clock()
    out = tmp_path / "out.json"
    try:
        assert tune.main(["--model", f"{__name__}:TinyNet", "--batch", "1", "--size", "6", "--device", "cpu",
                          "--level", "exhaustive", "--cache-file", str(out)]) == 0
    finally:
        logging.getLogger("conv_backend").setLevel(logging.NOTSET)  # main() shows INFO lines
    printed = capsys.readouterr().out
    assert "2 convolution node(s), 2 on Triton" in printed
    assert levels and set(levels) == {"exhaustive"}
    records = [json.loads(line) for line in out.read_text().splitlines()]  # the cache's JSON-lines journal
    keys = {r["key"] for r in records if "key" in r}
    assert len([k for k in keys if "|layer|" not in k]) == 2, keys


def test_tune_cli_rejects_an_unknown_level():
    from conv_backend import tune
    with pytest.raises(SystemExit, match="none, fast, exhaustive"):
        tune.main(["--model", "torchvision.models:resnet18", "--level", "quick", "--device", "cpu"])
