"""Epilogue fusion (conv_backend.fusion): what the pass folds into a convolution, what it must leave, and that
the fused model computes what eager does, on CPU through Triton's interpreter.

Most tests compile with inner="aten" (the pass is the same for both inner compilers, and Inductor's C++
compile on CPU is slow); test_inductor.py covers the Inductor path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conv_backend
from conv_backend import fusion
from conv_backend.epilogue import ACTIVATIONS

needs_interpreter = pytest.mark.interpreter
ATEN = {"inner": "aten", "input_precision": "ieee"}


def _randomize_bn(*bns):
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)


def _compile_eval(model, x, options=ATEN):
    model.eval()
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=options)(x)
        ref = model.double()(x.double())
    model.float()
    report = conv_backend.last_report()
    return out, ref, report


def _epilogues(report) -> list:
    return [d.epilogue for d in report.decisions if d.replaced]


class ConvBnAct(nn.Module):
    def __init__(self, act, cin=4, cout=6):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act
        _randomize_bn(self.bn)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


ACTIVATION_MODULES = {
    "relu": (nn.ReLU(), "relu"),
    "relu6": (nn.ReLU6(), "hardtanh"),
    "hardtanh": (nn.Hardtanh(-0.5, 0.25), "hardtanh"),
    "leaky_relu": (nn.LeakyReLU(0.2), "leaky_relu"),
    "silu": (nn.SiLU(), "silu"),
    "gelu": (nn.GELU(), "gelu"),
    "gelu_tanh": (nn.GELU(approximate="tanh"), "gelu_tanh"),
    "hardswish": (nn.Hardswish(), "hardswish"),
    "hardsigmoid": (nn.Hardsigmoid(), "hardsigmoid"),
    "sigmoid": (nn.Sigmoid(), "sigmoid"),
    "tanh": (nn.Tanh(), "tanh"),
}


def test_every_epilogue_activation_has_a_module_case():
    assert {name for _, name in ACTIVATION_MODULES.values()} == set(ACTIVATIONS) - {"none"}


@needs_interpreter
@pytest.mark.parametrize("name", sorted(ACTIVATION_MODULES))
def test_conv_bn_activation_folds_into_one_launch(name, kernel_launches):
    module, activation = ACTIVATION_MODULES[name]
    model = ConvBnAct(module)
    x = torch.randn(2, 4, 6, 5)
    out, ref, report = _compile_eval(model, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert _epilogues(report) == [f"bn+{activation}"]
    assert len(kernel_launches) == 1  # conv, batch norm and activation: one kernel


class Residual(nn.Module):
    """conv -> bn -> + shortcut -> relu, the shortcut a 1x1 conv -> bn of the block's input (ResNet's)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(4, 8, 1, bias=False)
        self.down_bn = nn.BatchNorm2d(8)
        _randomize_bn(self.bn, self.down_bn)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.down_bn(self.down(x)))


@needs_interpreter
def test_residual_block_folds_bn_add_and_relu(kernel_launches):
    x = torch.randn(2, 4, 7, 6)
    out, ref, report = _compile_eval(Residual(), x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert sorted(_epilogues(report)) == ["bn", "bn+add+relu"]
    assert len(kernel_launches) == 2


@needs_interpreter
def test_residual_in_another_memory_format():
    """The shortcut arrives channels_last while the block's output is NCHW: the residual is read by its strides."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, shortcut):
            return F.relu(self.conv(x) + shortcut)

    x = torch.randn(2, 4, 5, 6)
    shortcut = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last)
    model = Block().eval()
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=ATEN)(x, shortcut)
        ref = model(x, shortcut)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert _epilogues(conv_backend.last_report()) == ["add+relu"]


@needs_interpreter
def test_a_value_read_elsewhere_is_not_folded_away():
    """bn's output is also returned: batch norm folds into the conv, the ReLU stays a separate op."""
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            _randomize_bn(self.bn)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return F.relu(y), y

    x = torch.randn(1, 4, 5, 5)
    model = TwoOutputs().eval()
    with torch.no_grad():
        out, y = torch.compile(model, backend="tritonconv", options=ATEN)(x)
        ref_out, ref_y = model(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-5)
    assert _epilogues(conv_backend.last_report()) == ["bn"]


@needs_interpreter
def test_conv_output_returned_is_not_fused():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.sigmoid(y), y

    model = Both().eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        outs = torch.compile(model, backend="tritonconv", options=ATEN)(x)
        refs = model(x)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert _epilogues(conv_backend.last_report()) == [""]


@needs_interpreter
def test_fusion_option_off_keeps_every_op():
    model = ConvBnAct(nn.ReLU())
    out, ref, report = _compile_eval(model, torch.randn(1, 4, 5, 5), {**ATEN, "fusion": False})
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert _epilogues(report) == [""]


@needs_interpreter
def test_changed_batch_norm_statistics_after_compiling_are_used(kernel_launches):
    """Batch norm is read live on every call: no value folded at compile time goes stale."""
    model = ConvBnAct(nn.ReLU()).eval()
    x = torch.randn(1, 4, 5, 5)
    compiled = torch.compile(model, backend="tritonconv", options=ATEN)
    with torch.no_grad():
        compiled(x)
        model.bn.running_mean.add_(0.75)
        model.bn.weight.mul_(-1.5)
        model.conv.weight.mul_(0.5)
        out = compiled(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert _epilogues(conv_backend.last_report()) == ["bn+relu"]


@needs_interpreter
def test_training_forward_folds_activation_and_gradients_match():
    """In a training graph batch norm computes batch statistics (not folded); a ReLU right after a convolution
    folds (its backward reads the ReLU's output, not the convolution's), and gradients match eager's."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(F.relu(self.bn(F.relu(self.conv1(x)))))

    torch.manual_seed(0)
    model, twin = Net(), Net()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    out = torch.compile(model, backend="tritonconv", options=ATEN)(x)
    ref = twin(x)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    forward = [d for d in conv_backend.last_report().decisions if d.graph.startswith("forward")]
    assert [d.epilogue for d in forward] == ["relu", ""]


def test_decompose_leftovers_replaces_held_back_ops():
    """A batch norm and a GELU the pass did not fold are decomposed, and the graph computes the same."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w, b, mean, var):
        y = torch.ops.aten._native_batch_norm_legit_no_training.default(x, w, b, mean, var, 0.1, 1e-5)[0]
        return torch.ops.aten.gelu.default(y) + torch.ops.aten.hardswish.default(x)

    args = (torch.randn(2, 3, 4, 4), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.5)
    gm = make_fx(f, tracing_mode="fake")(*args)
    assert fusion.decompose_leftovers(gm, select_decomp_table()) == 3
    gm.graph.lint()
    gm.recompile()
    assert not [n for n in gm.graph.nodes if n.target in fusion.UNDECOMPOSED]
    torch.testing.assert_close(gm(*args), f(*args), rtol=1e-5, atol=1e-6)
