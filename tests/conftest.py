"""Shared pytest setup for the tritonconv suite.

Three kinds of tests:
- `@pytest.mark.cuda`: run on a GPU; skipped unless CUDA is available and the
  Triton interpreter is off (`pytest -m cuda` on a GPU box).
- `@pytest.mark.interpreter`: launch Triton kernels on CPU tensors; skipped
  unless TRITON_INTERPRET=1 was set before the kernels were imported
  (`TRITON_INTERPRET=1 pytest -m "not cuda"`).
- everything else: pure Python / ATen, runs anywhere.

Every test gets its own XDG_CACHE_HOME (the tuning cache writes there), a
clean in-process tuning memory and a seeded RNG.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

from conv_backend import dispatch, tuning
from conv_backend.runtime import interpreter_enabled


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: launches Triton kernels on CPU tensors (needs TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "slow: a GPU test that takes minutes or tens of GB (tensors past 2^31 elements)")


def cuda_runnable() -> bool:
    return torch.cuda.is_available() and not interpreter_enabled()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(
        reason="needs a CUDA GPU with TRITON_INTERPRET unset (run `pytest -m cuda` on a GPU machine)")
    skip_interp = pytest.mark.skip(
        reason="launches Triton kernels on CPU tensors: run with TRITON_INTERPRET=1 in the environment "
               "(e.g. `TRITON_INTERPRET=1 pytest -m 'not cuda'`)")
    for item in items:
        if "cuda" in item.keywords:
            if not cuda_runnable():
                item.add_marker(skip_cuda)
        elif "interpreter" in item.keywords and not interpreter_enabled():
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _isolated_test(request, tmp_path_factory, monkeypatch):
    """Private tuning cache directory, empty tuning memory, fresh Dynamo caches, reproducible RNG."""
    torch._dynamo.reset()  # a test's compiles must not count against another's recompile limit
    cache_home = tmp_path_factory.mktemp("xdg_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    forget_in_process_state()
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    random.seed(seed)
    yield
    forget_in_process_state()


def forget_in_process_state() -> None:
    """What a fresh process would not know: tuning choices and cached launch plans."""
    tuning.reset_memory()
    plans = getattr(dispatch, "_plans", None)
    if isinstance(plans, dict):
        plans.clear()


class KernelLaunches(list):
    """Every Triton kernel launch seen during a test: (kernel name, launch keyword arguments)."""

    @property
    def names(self) -> list:
        return [name for name, _ in self]


@pytest.fixture
def kernel_launches(monkeypatch):
    """Record Triton kernel launches (interpreter or GPU) without changing what they do."""
    from conv_backend.kernels.common import KernelLauncher

    launches = KernelLaunches()
    if interpreter_enabled():
        from triton.runtime.interpreter import InterpretedFunction as cls
    else:
        from triton.runtime.jit import JITFunction as cls
    real_run, real_call = cls.run, KernelLauncher.__call__
    inside_launcher = []  # a KernelLauncher's first call also goes through the JIT: count it once

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False) and not inside_launcher:
            launches.append((getattr(self.fn, "__name__", "?"), dict(kwargs)))
        return real_run(self, *args, **kwargs)

    def call(self, *args):
        if tuning.compiling_only.get():  # the tuner compiling ahead (tuning._compile_ahead): no launch
            return real_call(self, *args)
        # Later launches skip the JIT (direct launch), so they are recorded here.
        launches.append((getattr(self.kernel.fn, "__name__", "?"), dict(self.meta)))
        inside_launcher.append(self)
        try:
            return real_call(self, *args)
        finally:
            inside_launcher.pop()

    monkeypatch.setattr(cls, "run", run)
    monkeypatch.setattr(KernelLauncher, "__call__", call)
    return launches
