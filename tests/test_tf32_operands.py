"""Rounded-TF32 convolutions with their operands rounded where they are made (conv_backend/tf32.py): the graph
rewrite through the backend and Inductor (CPU, the interpreter, "tf32_round" forced), the rounding itself, and
the guard on cuDNN's TF32 setting."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conv_backend import tf32
from conv_backend.epilogue import round_to_tf32
from conv_backend.ops import TRITON_CONV, named_args, replaced_args

from _util import rel_err

LOW_BITS = (1 << 13) - 1  # the fp32 mantissa bits TF32 drops


def is_tf32(t: torch.Tensor) -> bool:
    return not (t.float().view(torch.int32) & LOW_BITS).any()


class Block(nn.Module):
    """conv -> bn -> relu -> conv, the first convolution's activation also returned, and a residual add:
    the activation is made by our convolution (its epilogue rounds it), the graph input by no one of ours."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(a) + a, a


def block():
    model = Block().eval()
    with torch.no_grad():
        model.bn1.running_mean.normal_()
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model


def test_round_to_tf32_is_round_to_nearest_and_keeps_specials():
    ulp = 2.0 ** -10
    x = torch.tensor([1.0 + ulp / 4, 1.0 + ulp * 3 / 4, -(1.0 + ulp / 2), 3.0, float("inf"), -float("inf"), 0.0])
    assert round_to_tf32(x).tolist() == [1.0, 1.0 + ulp, -(1.0 + ulp), 3.0, float("inf"), -float("inf"), 0.0]
    canonical_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(round_to_tf32(canonical_nan)).all()  # plus half an ulp would carry into the sign bit
    y = torch.randn(1000)
    assert is_tf32(round_to_tf32(y)) and (round_to_tf32(y) - y).abs().le(y.abs() * 2.0 ** -11).all()


@pytest.fixture
def rewrites(monkeypatch):
    """Per inner graph round_operands_where_made saw: how many convolutions it changed, every convolution's
    arguments after it, and how many values it rounded with ATen ops."""
    seen = []
    real = tf32.round_operands_where_made

    def spy(gm):
        changed = real(gm)
        convs = [named_args(n.args) for n in gm.graph.nodes if n.target == TRITON_CONV]
        roundings = sum(n.target == torch.ops.aten.bitwise_and.Scalar for n in gm.graph.nodes)
        seen.append((changed, convs, roundings))  # before use_static_form changes the nodes' form
        return changed

    monkeypatch.setattr(tf32, "round_operands_where_made", spy)
    return seen


@pytest.mark.interpreter
def test_operands_rounded_where_made(rewrites, kernel_launches):
    """Forced "tf32_round": both convolutions run "tf32" on rounded operands. The activation comes out of
    conv1's kernel rounded (what the graph returns is a TF32 value), the graph input and the weights through
    Inductor's rounding ops; the outputs are those of float64 convolutions of the rounded operands."""
    model, x = block(), torch.randn(2, 8, 6, 6)
    options = {"input_precision": "tf32_round", "cudagraphs": False}
    with torch.no_grad():
        out, a = torch.compile(model, backend="tritonconv", options=options)(x)
    (changed, convs, roundings), = rewrites
    assert changed == 2
    assert [args["input_precision"] for args in convs] == ["tf32", "tf32"]
    assert [args["round_tf32"] for args in convs] == [True, False]
    assert roundings == 3  # x, w1, w2
    assert {meta["INPUT_PRECISION"] for _, meta in kernel_launches} == {"tf32"}
    assert [meta["ROUND_TF32"] for _, meta in kernel_launches] == [True, False]

    assert is_tf32(a)
    with torch.no_grad():
        r = lambda t: round_to_tf32(t).double()  # noqa: E731
        bn = model.bn1
        a_ref = F.relu(F.batch_norm(F.conv2d(r(x), r(model.conv1.weight), padding=1), bn.running_mean.double(),
                                    bn.running_var.double(), bn.weight.double(), bn.bias.double(), eps=bn.eps))
        assert rel_err(a, a_ref) <= 2.0 ** -11
        out_ref = F.conv2d(a.double(), r(model.conv2.weight), model.conv2.bias.double(), padding=1) + a.double()
        assert rel_err(out, out_ref) <= 1e-5
        exact = F.conv2d(a.double(), model.conv2.weight.double(), model.conv2.bias.double(), padding=1) + a.double()
        assert rel_err(out, exact) > 1e-5  # the weight was rounded


@pytest.mark.interpreter
def test_only_rounded_tf32_convolutions_are_rewritten(rewrites):
    """Exact fp32 ("ieee"), bf16, and "auto" on the CPU (exact, as eager is there) keep their graphs."""
    model, x = block(), torch.randn(2, 8, 6, 6)
    for precision, dtype in (("ieee", torch.float32), ("tf32_round", torch.bfloat16), ("auto", torch.float32)):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model.to(dtype), backend="tritonconv",
                          options={"input_precision": precision, "cudagraphs": False})(x.to(dtype))
    assert [changed for changed, _, _ in rewrites] == [0, 0, 0]


@pytest.mark.interpreter
def test_training_graphs_are_not_rewritten(rewrites):
    """Forward graphs that save activations for backward keep exact stored values: only inference graphs."""
    model, x = block().train(), torch.randn(2, 8, 6, 6)
    out, _ = torch.compile(model, backend="tritonconv", options={"input_precision": "tf32_round"})(x)
    out.sum().backward()
    assert rewrites == []


def test_guard_runs_eagerly_after_the_tf32_setting_changes(caplog):
    calls = []
    compiled = lambda *args: calls.append("compiled") or "compiled"  # noqa: E731
    eager = lambda *args: calls.append("eager") or "eager"  # noqa: E731
    assert tf32.guarded(compiled, eager, "tf32_round", 3) is compiled  # forced: the setting does not matter
    assert tf32.guarded(compiled, eager, "auto", 0) is compiled  # nothing rounded
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32
    try:
        cudnn.allow_tf32 = True
        guard = tf32.guarded(compiled, eager, "auto", 3)
        assert guard(1) == "compiled"
        cudnn.allow_tf32 = False
        with caplog.at_level(logging.WARNING, logger="conv_backend"):
            assert guard(1) == "eager" and guard(1) == "eager"
        assert sum("TF32 setting changed" in r.message for r in caplog.records) == 1
        cudnn.allow_tf32 = True
        assert guard(1) == "compiled"
    finally:
        cudnn.allow_tf32 = before
    assert calls == ["compiled", "eager", "eager", "compiled"]


def test_arguments_by_name():
    """The rewrite names the op's arguments (ops.named_args / replaced_args) instead of indexing them."""
    x, w = torch.empty(1, 4, 5, 5), torch.empty(8, 4, 3, 3)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 1)  # the dispatcher drops trailing defaults
    named = named_args(args)
    assert named["input_precision"] == "auto" and named["round_tf32"] is False and named["input"] is x
    changed = replaced_args(args, input_precision="tf32", round_tf32=True)
    assert len(changed) == 19 and changed[:7] == args
    assert named_args(changed)["input_precision"] == "tf32" and named_args(changed)["round_tf32"] is True
    with pytest.raises(TypeError, match="no argument"):
        replaced_args(args, precision="tf32")


@pytest.mark.interpreter
def test_compiled_graph_runs_eagerly_after_the_setting_changes(monkeypatch, kernel_launches):
    """Through the backend: "auto" rounded at compile time (made to pick rounded TF32 on CPU here), then cuDNN's
    TF32 setting changes. The call runs Dynamo's graph on ATen (no kernel of ours), returns what the compiled
    graph returns in the same structure, and the eager model's values."""
    setting = {"tf32": True}
    monkeypatch.setattr(tf32, "cudnn_conv_allows_tf32", lambda: setting["tf32"])
    monkeypatch.setattr(tf32, "choose_fp32_precision", lambda *args: "tf32_round")
    model, x = block(), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        compiled = torch.compile(model, backend="tritonconv", options={"cudagraphs": False})
        out, a = compiled(x)
        assert is_tf32(a) and len(kernel_launches) == 2
        setting["tf32"] = False
        eager_out, eager_a = compiled(x)
        ref_out, ref_a = model(x)
    assert len(kernel_launches) == 2  # nothing of ours ran the second time
    torch.testing.assert_close(eager_out, ref_out)
    torch.testing.assert_close(eager_a, ref_a)
    assert not is_tf32(eager_a)
