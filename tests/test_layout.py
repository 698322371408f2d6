"""The channels_last region in inference graphs: through batch norm, pooling and residual adds,
with copies back to eager's format wherever an activation leaves it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conv_backend.backend as backend_mod
from conv_backend.graph_pass import OUTPUT_FORMAT_ARG, TRITON_CONV

from _util import format_flags

aten = torch.ops.aten
needs_interpreter = pytest.mark.interpreter


class ResidualBlock(nn.Module):
    """conv -> bn -> relu -> conv (+ residual) -> relu -> conv -> pools -> linear; also returns the block
    output (before the last conv), which leaves the channels_last region as a graph output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        z = F.relu(self.conv2(y) + y)
        p = F.max_pool2d(self.conv3(z), 2) * 2.0
        return self.fc(torch.flatten(self.pool(p), 1)), z


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The graphs the backend hands on, after its pass: [(kind, GraphModule)]."""
    graphs = []
    real = backend_mod.replace_convolutions

    def spy(gm, options, report, name, allow_layout_copies=False):
        graphs.append((name, real(gm, options, report, name, allow_layout_copies=allow_layout_copies)))
        return graphs[-1][1]

    monkeypatch.setattr(backend_mod, "replace_convolutions", spy)
    return graphs


# The layout pass alone: no epilogue fusion (it removes the ops a region spans), ATen for the rest.
LAYOUT_ONLY = {"input_precision": "ieee", "fusion": False, "inner": "aten"}


def _formats(gm):
    return [n.args[OUTPUT_FORMAT_ARG] for n in gm.graph.nodes if n.target == TRITON_CONV]


def _copies(gm):
    return [n for n in gm.graph.nodes if n.target == aten.clone.default]


@needs_interpreter
def test_inference_region_spans_batch_norm_residual_and_pooling(compiled_graphs, kernel_launches):
    model = ResidualBlock().eval()
    for p in model.bn1.parameters():  # non-trivial batch norm
        nn.init.uniform_(p, 0.5, 1.5)
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 10, 9)
    with torch.no_grad():
        out, block = torch.compile(model, backend="tritonconv", options=LAYOUT_ONLY)(x)
        ref_out, ref_block = model(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block, ref_block, rtol=1e-4, atol=1e-5)
    assert format_flags(block) == format_flags(ref_block)  # the graph output keeps eager's strides
    (name, gm), = compiled_graphs
    assert name.startswith("inference")
    # conv1 and conv2 feed later convolutions through bn/relu/add: they write channels_last;
    # conv3 feeds only pooling and outputs: nothing to gain, it keeps eager's format.
    assert _formats(gm) == ["channels_last", "channels_last", "contiguous"]
    # The block output leaves the region as a graph output: one copy back to NCHW, read by the output.
    copy_node, = _copies(gm)
    assert copy_node.kwargs["memory_format"] == torch.contiguous_format
    assert [u.op for u in copy_node.users] == ["output"]
    assert len(kernel_launches) == 3


@needs_interpreter
def test_training_graphs_make_no_layout_copies(compiled_graphs):
    model = ResidualBlock().train()
    x = torch.randn(2, 4, 10, 9, requires_grad=True)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="tritonconv", options=LAYOUT_ONLY)
    out, block = compiled(x)
    ref_out, ref_block = twin(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    (out.sum() + block.sum()).backward()
    forward = [gm for name, gm in compiled_graphs if name.startswith("forward")]
    assert forward and not _copies(forward[0])
    # Activations are saved for backward, so no convolution leaves eager's format here.
    assert _formats(forward[0]) == ["contiguous", "contiguous", "contiguous"]


@needs_interpreter
def test_channels_last_option_off_keeps_inference_graph_eager(compiled_graphs):
    model = ResidualBlock().eval()
    with torch.no_grad():
        torch.compile(model, backend="tritonconv", options={**LAYOUT_ONLY, "channels_last": False})(torch.randn(1, 4, 8, 8))
    (_, gm), = compiled_graphs
    assert _formats(gm) == ["contiguous"] * 3 and not _copies(gm)


class Branches(nn.Module):
    """Two branches concatenated along channels, then a convolution (an Inception-style join)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1)
        self.join = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        return self.join(torch.cat([F.relu(self.a(x)), self.b(x)], dim=1))


@needs_interpreter
def test_inference_region_spans_concatenation(compiled_graphs, kernel_launches):
    model = Branches().eval()
    x = torch.randn(2, 4, 7, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=LAYOUT_ONLY)(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert format_flags(out) == format_flags(ref)
    (_, gm), = compiled_graphs
    assert sorted(_formats(gm)) == ["channels_last", "channels_last", "contiguous"] and not _copies(gm)
    assert len(kernel_launches) == 3


@needs_interpreter
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "eager"])
def test_output_format_argument(fmt):
    x, w = torch.randn(2, 4, 6, 7), torch.randn(8, 4, 3, 3)
    y = torch.ops.tritonconv.conv2d.default(x, w, None, [1, 1], [1, 1], [1, 1], 1, "ieee", "auto", fmt)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), rtol=1e-5, atol=1e-5)
    expected = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


def test_unknown_output_format_is_an_error():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="output_format must be one of"):
        torch.ops.tritonconv.conv2d.default(x, w, None, [1, 1], [1, 1], [1, 1], 1, "ieee", "auto", "bogus")
