"""The backend composed with Inductor (inner="inductor", the default), its options and modes, explain(), export
graphs, the op's own argument checks and dispatch path, and the private torch APIs all of it builds on."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conv_backend
from conv_backend import backend as backend_mod
from conv_backend.fusion import UNDECOMPOSED
from conv_backend.graph_pass import replace_convolutions
from conv_backend.options import BackendOptions

needs_interpreter = pytest.mark.interpreter


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return self.pool(F.gelu(self.conv2(y)) * 0.5 + y)


@pytest.fixture
def inner_compiles(monkeypatch):
    """The graphs Inductor's compile_fx_inner receives from the backend."""
    from torch._inductor import compile_fx as compile_fx_mod

    graphs = []
    real = compile_fx_mod.compile_fx_inner

    def spy(gm, example_inputs, **kwargs):
        from torch._inductor import config
        gm.meta["freezing"] = config.freezing  # the settings in force when Inductor compiles this graph
        graphs.append(gm)
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_mod, "compile_fx_inner", spy)
    return graphs


@needs_interpreter
def test_default_compiles_the_rest_with_inductor(inner_compiles, kernel_launches):
    model = Net().eval()
    model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options={"input_precision": "ieee"})(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (gm,), = [inner_compiles]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.tritonconv.conv2d_static.default) == 2  # the form compiled graphs call
    assert torch.ops.aten.convolution.default not in targets
    assert not set(targets) & set(UNDECOMPOSED)  # what Inductor lowers: no held-back op is left
    assert [d.epilogue for d in conv_backend.last_report().decisions] == ["bn+relu", "gelu"]
    assert len(kernel_launches) == 2


@needs_interpreter
def test_inner_aten_hands_nothing_to_inductor(inner_compiles):
    model = Net().eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options={"inner": "aten", "input_precision": "ieee"})(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert inner_compiles == []


@needs_interpreter
def test_inductor_settings_and_modes_pass_through(inner_compiles):
    """Inductor's own settings are in force when Inductor compiles our graph, and torch.compile's mode reaches
    it too."""
    model = Net().eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="tritonconv", options={"freezing": True, "input_precision": "ieee"})(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert inner_compiles[0].meta["freezing"] is True
        torch._dynamo.reset()
        out = torch.compile(model, backend="tritonconv", mode="max-autotune-no-cudagraphs")(x)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-4)
    assert len(inner_compiles) == 2 and inner_compiles[1].meta["freezing"] is False


def test_inductor_settings_for_a_mode_match_inductors_own():
    from torch._inductor import list_mode_options
    assert backend_mod.inductor_settings("reduce-overhead", {}) == list_mode_options("reduce-overhead")
    assert backend_mod.inductor_settings(None, {"freezing": True}) == {"freezing": True}


def test_unknown_option_is_an_error_naming_ours():
    with pytest.raises(ValueError) as info:
        backend_mod.inductor_settings(None, {"no_such_setting": 1})
    assert "no_such_setting" in str(info.value)
    with pytest.raises(ValueError, match="inner"):
        BackendOptions.from_mapping({"inner": "tvm"})
    with pytest.raises(ValueError, match="autotune"):
        BackendOptions.from_mapping({"autotune": "slow"})


def test_mode_with_inner_aten_is_an_error():
    with pytest.raises(ValueError, match="inner='inductor'"):
        conv_backend.tritonconv_backend(torch.fx.symbolic_trace(nn.Identity()), [torch.randn(1)],
                                        options={"inner": "aten"}, mode="reduce-overhead")


# ------------------------------------------------------------------------- explain()

@needs_interpreter
def test_explain_is_repeatable_and_leaves_later_compiles_alone(kernel_launches):
    """Each explain() once built a new backend: from the 8th call Dynamo's recompile limit returned empty
    reports, and a later torch.compile of the model silently ran eager."""
    model = Net().train()  # training mode: batch norm would update its running statistics
    x = torch.randn(2, 3, 5, 5)
    mean, var = model.bn1.running_mean.clone(), model.bn1.running_var.clone()
    options = {"inner": "aten", "input_precision": "ieee"}
    counts = [len(conv_backend.explain(model, x, options=options).decisions) for _ in range(10)]
    assert counts == [2] * 10
    assert torch.equal(model.bn1.running_mean, mean) and torch.equal(model.bn1.running_var, var)
    kernel_launches.clear()
    model.eval()
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=options)(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(kernel_launches) == 2


def test_explain_rejects_a_bad_option_before_running():
    with pytest.raises(ValueError, match="unknown option"):
        conv_backend.explain(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2), options={"precision": "ieee"})


# ------------------------------------------------------------------------- torch.export graphs

@needs_interpreter
def test_export_graphs_are_matched():
    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.same = nn.Conv2d(4, 4, 3, padding="same")

        def forward(self, x):
            return self.same(F.relu(self.conv(x)))

    model = Exported().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = torch.export.export(model, (x,)).module()
    report = conv_backend.Report()
    replace_convolutions(gm, BackendOptions(input_precision="ieee", fusion=False), report)
    decisions = {d.node: d for d in report.decisions}
    assert len(decisions) == 2
    replaced = [d for d in decisions.values() if d.replaced]
    kept = [d for d in decisions.values() if not d.replaced]
    assert len(replaced) == 1 and replaced[0].stride == (2, 2) and replaced[0].padding == (1, 1)
    assert len(kept) == 1 and "string padding" in kept[0].reason
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- the op

def test_direct_call_with_a_bad_string_argument_names_the_valid_values():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        torch.ops.tritonconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, "ieee", "bogus")
    with pytest.raises(ValueError, match="input_precision must be one of"):
        torch.ops.tritonconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, "bogus", "auto")
    with pytest.raises(ValueError, match="activation must be one of"):
        conv_backend.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, activation="swish")


def test_fused_epilogue_with_gradients_is_a_clear_error():
    x, w = torch.randn(1, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 3, 3)
    with pytest.raises(NotImplementedError, match="no autograd formula"):
        conv_backend.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, activation="relu")


def test_the_op_traces_instead_of_running_under_a_dispatch_mode():
    """The op's short path launches only for plain tensors with no mode active: under FakeTensor and
    make_fx it must give a fake result and a graph node, never run a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        return conv_backend.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, activation="silu")

    with FakeTensorMode():
        y = f(torch.empty(2, 3, 8, 8), torch.empty(4, 3, 3, 3))
    assert y.shape == (2, 4, 8, 8)
    gm = make_fx(f, tracing_mode="fake")(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.tritonconv.conv2d.default]


@needs_interpreter
def test_static_form_computes_what_the_full_form_does():
    """use_static_form moves a node's constant arguments into one string; the graph computes the same, a
    symbolic size keeps the full form, and the string round-trips every argument."""
    from conv_backend.graph_pass import use_static_form
    from conv_backend.ops import full_args, full_call_args, static_string

    def f(x, w, mean, var, gamma, beta, res):
        y = conv_backend.conv2d(x, w, None, [2, 1], [1, 0], [1, 2], 1, "ieee", "gemm_pointer", "channels_last",
                                mean, var, gamma, beta, 1e-3, res, "leaky_relu", [0.25])
        return conv_backend.conv2d(y, w, None, [1, 1], [1, 1], [1, 1], 1, "ieee")

    from torch.fx.experimental.proxy_tensor import make_fx
    args = (torch.randn(2, 3, 9, 8), torch.randn(3, 3, 3, 3), torch.randn(3), torch.rand(3) + 0.5, torch.randn(3),
            torch.randn(3), torch.randn(2, 3, 5, 4))
    gm = make_fx(f)(*args)
    calls = [n for n in gm.graph.nodes if n.target == torch.ops.tritonconv.conv2d.default]
    full = [full_call_args(n.args) for n in calls]
    assert use_static_form(gm) == 2
    static = [n for n in gm.graph.nodes if n.target == torch.ops.tritonconv.conv2d_static.default]
    for node, before in zip(static, full):
        after = full_args(*node.args)
        assert after[3:] == tuple(tuple(v) if isinstance(v, list) else v for v in before[3:])
    torch.testing.assert_close(gm(*args), f(*args), rtol=1e-5, atol=1e-5)
    assert static_string((args[0], args[1], None, [object(), 1], [0, 0], [1, 1], 1)) is None  # not a constant


# ------------------------------------------------------------------------- private torch APIs we rely on

def test_private_torch_apis_the_backend_uses():
    """If an upgrade moves one of these, this fails first, naming it."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner  # noqa: F401
    from torch._inductor.decomposition import select_decomp_table

    params = inspect.signature(compile_fx).parameters
    assert {"inner_compile", "config_patches", "decompositions"} <= set(params)
    assert isinstance(torch._TorchCompileInductorWrapper(None, {"freezing": True}, None).config, dict)
    assert hasattr(torch._functorch.config, "enable_autograd_cache")
    # options cudagraphs: the settings it turns on, and the fake values it reads the outputs' memory from
    from torch._inductor import config as inductor_config
    assert isinstance(inductor_config.triton.cudagraphs, bool)
    from torch.fx.experimental.symbolic_shapes import free_symbols  # noqa: F401
    from torch.multiprocessing.reductions import StorageWeakRef  # noqa: F401
    assert callable(torch._C._len_torch_dispatch_stack) and torch._C._AutoDispatchBelowAutograd is not None
    # The ops we hold back from AOTAutograd are ones Inductor would otherwise decompose.
    table = select_decomp_table()
    assert all(op in table for op in UNDECOMPOSED)
