"""KernelLauncher: the first launch goes through the JIT, later ones straight to the compiled kernel.

The direct path runs only on GPUs (the interpreter has no compiled kernels), so
these tests drive it with a stand-in for a JIT kernel and its compiled form;
tests/test_cuda.py runs it for real.
"""
import pytest

from conv_backend.kernels import common
from conv_backend.kernels.common import KernelLauncher


class FakeCompiled:
    function = "function-handle"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeKernel:
    """Parameters: two tensors, one scalar, two constexprs (as our kernels order them)."""

    arg_names = ["x_ptr", "y_ptr", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.compiled = FakeCompiled()
        self.jit_launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_launches.append((grid, args, kwargs))
            return self.compiled
        return launch


@pytest.fixture
def on_gpu_runtime(monkeypatch):
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(common, "_current_device", lambda: 0)
    monkeypatch.setattr(common, "_current_stream", lambda device: f"stream-of-{device}")
    monkeypatch.setattr(common, "_launch_hooks_set", lambda: False)


def test_second_launch_skips_the_jit_and_orders_constexprs_by_parameter(on_gpu_runtime):
    kernel = FakeKernel()
    launcher = KernelLauncher(kernel, (7, 2), (128,), FLAG=True, num_warps=8, BLOCK=64)  # kwargs out of order
    launcher("x", "y")
    assert kernel.jit_launches == [((7, 2), ("x", "y", 128), dict(FLAG=True, num_warps=8, BLOCK=64))]
    assert kernel.compiled.launches == []
    launcher("x2", "y2")
    assert len(kernel.jit_launches) == 1
    assert kernel.compiled.launches == [(7, 2, 1, "stream-of-0", "function-handle", "packed-metadata", None, None, None,
                                         "x2", "y2", 128, 64, True)]


def test_launch_hooks_take_the_jit_path(on_gpu_runtime, monkeypatch):
    kernel = FakeKernel()
    launcher = KernelLauncher(kernel, (1,), (), BLOCK=16, FLAG=False)
    launcher("x", "y", 3)
    monkeypatch.setattr(common, "_launch_hooks_set", lambda: True)
    launcher("x", "y", 3)
    assert len(kernel.jit_launches) == 2 and kernel.compiled.launches == []


def test_a_defaulted_constexpr_keeps_the_jit_path(on_gpu_runtime):
    kernel = FakeKernel()
    launcher = KernelLauncher(kernel, (1,), (5,), BLOCK=16)  # FLAG left to the kernel's default
    launcher("x", "y")
    launcher("x", "y")
    assert len(kernel.jit_launches) == 2 and kernel.compiled.launches == []


def test_interpreter_keeps_the_jit_path(monkeypatch):
    monkeypatch.setattr(common, "interpreter_enabled", lambda: True)
    kernel = FakeKernel()
    launcher = KernelLauncher(kernel, (1,), (5,), BLOCK=16, FLAG=True)
    launcher("x", "y")
    launcher("x", "y")
    assert len(kernel.jit_launches) == 2 and kernel.compiled.launches == []


def test_empty_hook_chains_count_as_no_hooks(monkeypatch):
    """Newer Triton keeps launch hooks in chains that are never None: only a chain with calls is a hook."""
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not common._hook_active(None)
    assert not common._hook_active(Chain([]))
    assert common._hook_active(Chain([print]))
    assert common._hook_active(print)  # older Triton: the hook itself
    runtime = common.triton.knobs.runtime
    for enter, exit_, expected in ((Chain([]), Chain([]), False), (Chain([print]), None, True),
                                   (None, Chain([print]), True), (None, None, False)):
        monkeypatch.setattr(runtime, "launch_enter_hook", enter, raising=False)
        monkeypatch.setattr(runtime, "launch_exit_hook", exit_, raising=False)
        assert common._launch_hooks_set() is expected


def test_no_launch_hooks_by_default():
    """The direct path is only worth having if a plain process takes it."""
    assert not common._launch_hooks_set()
