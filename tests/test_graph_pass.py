"""The FX pass alone (no AOTAutograd, no Dynamo): conv_backend.replace_convolutions on ATen graphs.

Graphs come from make_fx(tracing_mode="fake"/"symbolic"), whose nodes carry
meta["val"] fake tensors, or are built by hand where ATen's tracing would
reject the convolution (mixed dtypes / devices) before it reached a graph.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from conv_backend import BackendOptions, Report, replace_convolutions
from conv_backend.ops import OUTPUT_FORMAT_ARG

from _util import format_flags

aten = torch.ops.aten
TRITON_CONV = torch.ops.tritonconv.conv2d.default
needs_interpreter = pytest.mark.interpreter


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def conv_nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def trace(fn, *args, mode="fake"):
    return make_fx(fn, tracing_mode=mode)(*args)


@pytest.fixture
def interpret_env(monkeypatch):
    """Make support decisions as under TRITON_INTERPRET=1 (the pass launches nothing): the variable, and the
    kernels' mode, which runtime.interpreter_enabled reads from the kernels themselves."""
    import conv_backend.runtime
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(conv_backend.runtime, "interpreter_enabled", lambda: True)


def run_pass(gm, **options):
    """The pass alone; fusion off unless asked for (tests/test_fusion.py covers it), so the graph keeps its ops."""
    report = Report()
    out = replace_convolutions(gm, BackendOptions(**{"fusion": False, **options}), report, "g")
    assert out is gm, "the pass rewrites in place and returns the same GraphModule"
    return report


def hand_built_conv(x_val, w_val, b_val=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), transposed=False,
                    output_padding=(0, 0), groups=1) -> fx.GraphModule:
    """One aten.convolution node whose inputs carry the given fake tensors as meta['val']."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = x_val
    w = graph.placeholder("w")
    w.meta["val"] = w_val
    b = None
    if b_val is not None:
        b = graph.placeholder("b")
        b.meta["val"] = b_val
    conv = graph.call_function(aten.convolution.default, (x, w, b, list(stride), list(padding), list(dilation),
                                                          transposed, list(output_padding), groups))
    graph.output(conv)
    return fx.GraphModule(torch.nn.Module(), graph)


# ---------------------------------------------------------------- supported convolutions are replaced

def test_supported_conv_is_replaced(interpret_env):
    x, w, b = torch.randn(2, 4, 9, 8), torch.randn(6, 4, 3, 2), torch.randn(6)
    gm = trace(lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), x, w, b)
    assert targets(gm) == [aten.convolution.default]
    report = run_pass(gm, input_precision="ieee", algorithm="gemm_pointer")
    assert targets(gm) == [TRITON_CONV]
    (node,) = conv_nodes(gm, TRITON_CONV)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert list(node.args[:3]) == placeholders
    assert [list(a) for a in node.args[3:6]] == [[2, 1], [1, 2], [1, 2]]
    assert node.args[6] == 1
    assert node.args[7:9] == ("ieee", "gemm_pointer")
    assert node.meta["val"].shape == F.conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2)).shape
    (decision,) = report.decisions
    assert decision.replaced and decision.reason == ""
    assert decision.input_shape == (2, 4, 9, 8) and decision.weight_shape == (6, 4, 3, 2)
    assert decision.stride == (2, 1) and decision.padding == (1, 2) and decision.dilation == (1, 2)
    assert decision.dtype == "float32" and decision.device == "cpu" and decision.algorithm == "gemm_pointer"
    assert len(report.replaced) == 1 and not report.kept
    assert "tritonconv::conv2d" in str(report)


def test_pass_defaults_without_options_or_report(interpret_env):
    gm = trace(lambda x, w: F.conv2d(x, w), torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3))
    assert replace_convolutions(gm) is gm
    assert targets(gm) == [TRITON_CONV]


@needs_interpreter
def test_rewritten_graph_runs_and_matches_eager(kernel_launches):
    def fn(x, w1, b1, w2, w3):
        y = F.relu(F.conv2d(x, w1, b1, padding=1))
        y = F.conv2d(y, w2, None, stride=2, groups=2)
        return F.conv2d(y, w3, None, padding=1, groups=8) + 1.0  # depthwise, multiplier 2

    args = (torch.randn(2, 4, 9, 9), torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(8, 4, 3, 3),
            torch.randn(16, 1, 3, 3))
    gm = trace(fn, *args)
    report = run_pass(gm, input_precision="ieee")
    assert len(conv_nodes(gm, TRITON_CONV)) == 3 and not conv_nodes(gm, aten.convolution.default)
    assert len(report.replaced) == 3
    out = gm(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert format_flags(out) == format_flags(ref)
    assert len(kernel_launches) == 3


# ---------------------------------------------------------------- unsupported convolutions stay on ATen

def _conv1d():
    return lambda x, w: F.conv1d(x, w, padding=1), (torch.randn(2, 4, 9), torch.randn(6, 4, 3))


def _conv3d():
    return lambda x, w: F.conv3d(x, w), (torch.randn(1, 2, 5, 5, 5), torch.randn(4, 2, 3, 3, 3))


def _transposed():
    return lambda x, w: F.conv_transpose2d(x, w, stride=2), (torch.randn(1, 4, 5, 5), torch.randn(4, 6, 3, 3))


def _float64():
    return lambda x, w: F.conv2d(x, w, padding=1), (torch.randn(1, 4, 6, 6, dtype=torch.float64),
                                                    torch.randn(8, 4, 3, 3, dtype=torch.float64))


def _grouped():
    return lambda x, w: F.conv2d(x, w, groups=2), (torch.randn(1, 4, 6, 6), torch.randn(8, 2, 3, 3))


def _stride2():
    return lambda x, w: F.conv2d(x, w, stride=2), (torch.randn(1, 8, 7, 7), torch.randn(8, 8, 3, 3))


def _three_channels():
    return lambda x, w: F.conv2d(x, w), (torch.randn(1, 3, 6, 6), torch.randn(8, 3, 3, 3))


def _huge_batch():
    return lambda x, w: F.conv2d(x, w), (torch.randn(70000, 2, 3, 3), torch.randn(4, 2, 3, 3))


def _huge_groups():
    return lambda x, w: F.conv2d(x, w, groups=65536), (torch.randn(1, 65536, 2, 2), torch.randn(65536, 1, 1, 1))


def _plain():
    return lambda x, w: F.conv2d(x, w, padding=1), (torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3))


UNSUPPORTED_TRACED = {
    "conv1d": (_conv1d, {}, "1D convolution (only 2D is supported)"),
    "conv3d": (_conv3d, {}, "3D convolution (only 2D is supported)"),
    "transposed": (_transposed, {}, "transposed convolution"),
    "float64": (_float64, {}, "dtype torch.float64 (supported: float32, float16, bfloat16)"),
    "disabled": (_plain, {"enabled": False}, "replacement disabled (options={'enabled': False})"),
    "seed_grouped": (_grouped, {"algorithm": "seed"}, "algorithm='seed' handles groups == 1 only"),
    "tma_stride2": (_stride2, {"algorithm": "gemm_tma"},
                    "algorithm='gemm_tma': a strided box load needs input height and width divisible by the stride"),
    "tma_misaligned": (_three_channels, {"algorithm": "gemm_tma"},
                       "algorithm='gemm_tma': channels (per group) must fill 16-byte rows"),
    "depthwise_not_depthwise": (_grouped, {"algorithm": "depthwise"},
                                "algorithm='depthwise' needs groups == input channels"),
    "seed_batch_beyond_grid": (_huge_batch, {"algorithm": "seed"},
                               "algorithm='seed' launches one grid row per image (at most 65535)"),
    "groups_beyond_grid": (_huge_groups, {}, "more than 65535 groups (one grid row per group)"),
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED_TRACED))
def test_unsupported_kind_kept_with_reason(kind, interpret_env, monkeypatch):
    make, options, reason = UNSUPPORTED_TRACED[kind]
    fn, args = make()
    gm = trace(fn, *args)
    before = targets(gm)
    assert aten.convolution.default in before
    report = run_pass(gm, **options)
    assert targets(gm) == before, "an unsupported convolution must stay aten.convolution"
    assert not conv_nodes(gm, TRITON_CONV)
    (decision,) = report.decisions
    assert not decision.replaced
    assert decision.reason == reason
    assert reason in str(report)
    # The graph still runs (on ATen only: no kernel is involved) and gives eager's answer.
    monkeypatch.delenv("TRITON_INTERPRET")
    torch.testing.assert_close(gm(*args), fn(*args))


def test_cpu_without_interpreter_kept(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn, args = _plain()
    gm = trace(fn, *args)
    report = run_pass(gm)
    assert targets(gm) == [aten.convolution.default]
    assert report.decisions[0].reason == "CPU tensor without TRITON_INTERPRET=1"
    torch.testing.assert_close(gm(*args), fn(*args))


def test_device_rule_comes_from_runtime(monkeypatch, interpret_env):
    """support.device_supported is the single place that decides devices."""
    import conv_backend.support as support
    monkeypatch.setattr(support, "device_supported", lambda device: (False, "no Triton here (test)"))
    fn, args = _plain()
    gm = trace(fn, *args)
    report = run_pass(gm)
    assert targets(gm) == [aten.convolution.default]
    assert report.decisions[0].reason == "no Triton here (test)"


@pytest.fixture
def fake_mode():
    return FakeTensorMode()


def test_cuda_tensors_under_interpreter_kept(fake_mode, interpret_env):
    with fake_mode:
        x = torch.empty(1, 4, 6, 6, device="cuda")
        w = torch.empty(8, 4, 3, 3, device="cuda")
    report = Report()
    gm = hand_built_conv(x, w)
    replace_convolutions(gm, BackendOptions(), report)
    assert targets(gm) == [aten.convolution.default]
    assert report.decisions[0].reason == "CUDA tensors while TRITON_INTERPRET=1 (the interpreter runs on CPU tensors)"
    assert report.decisions[0].device == "cuda:0"


HAND_BUILT = {
    "complex64": (dict(x=((1, 4, 6, 6), torch.complex64), w=((8, 4, 3, 3), torch.complex64)),
                  "dtype torch.complex64 (supported: float32, float16, bfloat16)"),
    "mixed_input_weight": (dict(x=((1, 4, 6, 6), torch.float16), w=((8, 4, 3, 3), torch.float32)),
                           "mixed dtypes [torch.float16, torch.float32]"),
    "mixed_bias": (dict(x=((1, 4, 6, 6), torch.float32), w=((8, 4, 3, 3), torch.float32), b=((8,), torch.float16)),
                   "mixed dtypes [torch.float32, torch.float32, torch.float16]"),
    "mixed_devices": (dict(x=((1, 4, 6, 6), torch.float32), w=((8, 4, 3, 3), torch.float32, "meta")),
                      "input, weight and bias on different devices"),
    "bias_on_other_device": (dict(x=((1, 4, 6, 6), torch.float32), w=((8, 4, 3, 3), torch.float32),
                                  b=((8,), torch.float32, "meta")),
                             "input, weight and bias on different devices"),
}


@pytest.mark.parametrize("kind", sorted(HAND_BUILT))
def test_hand_built_unsupported_kept(kind, fake_mode, interpret_env):
    spec, reason = HAND_BUILT[kind]

    def fake(entry):
        if entry is None:
            return None
        shape, dtype, *device = entry
        with fake_mode:
            return torch.empty(shape, dtype=dtype, device=device[0] if device else "cpu")

    gm = hand_built_conv(fake(spec["x"]), fake(spec["w"]), fake(spec.get("b")))
    report = Report()
    replace_convolutions(gm, BackendOptions(), report, "hand")
    assert targets(gm) == [aten.convolution.default]
    assert report.decisions[0].reason == reason
    assert report.decisions[0].graph == "hand"


def test_node_without_fake_tensors_kept(interpret_env):
    gm = hand_built_conv(None, None)
    report = Report()
    replace_convolutions(gm, BackendOptions(), report)
    assert targets(gm) == [aten.convolution.default]
    assert report.decisions[0].reason == "input or weight has no tensor metadata"


def test_mixed_graph_counts(interpret_env):
    def fn(x, w, x64, w64, x1, w1):
        return F.conv2d(x, w, padding=1), F.conv2d(x64, w64), F.conv1d(x1, w1), F.conv2d(x, w, stride=2)

    args = (torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(1, 4, 6, 6, dtype=torch.float64),
            torch.randn(8, 4, 3, 3, dtype=torch.float64), torch.randn(1, 4, 9), torch.randn(6, 4, 3))
    gm = trace(fn, *args)
    report = run_pass(gm)
    assert len(report.decisions) == 4
    assert len(report.replaced) == 2 and len(report.kept) == 2
    assert len(conv_nodes(gm, TRITON_CONV)) == 2 and len(conv_nodes(gm, aten.convolution.default)) == 2
    assert sorted(d.reason for d in report.kept) == ["1D convolution (only 2D is supported)",
                                                     "dtype torch.float64 (supported: float32, float16, bfloat16)"]


def test_convolution_backward_stays_on_aten(interpret_env):
    def fn(x, w):
        return torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), (x, w))

    x, w = torch.randn(1, 4, 6, 6, requires_grad=True), torch.randn(8, 4, 3, 3, requires_grad=True)
    gm = trace(fn, x, w)
    assert aten.convolution_backward.default in targets(gm)
    report = run_pass(gm)
    assert aten.convolution_backward.default in targets(gm)
    assert len(conv_nodes(gm, TRITON_CONV)) == 1
    kept = [d for d in report.decisions if not d.replaced]
    assert [d.reason for d in kept] == ["convolution_backward stays on ATen"]


def test_verbose_logs_every_decision_at_info(interpret_env, caplog):
    fn, args = _plain()
    fn64, args64 = _float64()
    with caplog.at_level(logging.INFO, logger="conv_backend"):
        run_pass(trace(fn, *args), verbose=False)
        assert not [r for r in caplog.records if r.name == "conv_backend"]
        run_pass(trace(fn64, *args64), verbose=True)
    records = [r for r in caplog.records if r.name == "conv_backend"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "dtype torch.float64" in records[0].getMessage()


# ---------------------------------------------------------------- traceability, dynamic shapes

def test_rewritten_graph_retraces_with_fake_tensors(interpret_env):
    fn = lambda x, w, b: F.relu(F.conv2d(x, w, b, stride=2, padding=1))  # noqa: E731
    args = (torch.randn(2, 4, 9, 7), torch.randn(8, 4, 3, 3), torch.randn(8))
    gm = trace(fn, *args)
    run_pass(gm)
    again = make_fx(gm, tracing_mode="fake")(*args)
    (node,) = conv_nodes(again, TRITON_CONV)
    assert tuple(node.meta["val"].shape) == tuple(fn(*args).shape)


@needs_interpreter
def test_symbolic_shapes(kernel_launches):
    fn = lambda x, w: F.conv2d(x, w, padding=(1, 2), dilation=(1, 2))  # noqa: E731
    w = torch.randn(8, 4, 3, 3)
    gm = trace(fn, torch.randn(2, 4, 7, 9), w, mode="symbolic")
    report = run_pass(gm, input_precision="ieee")
    assert len(conv_nodes(gm, TRITON_CONV)) == 1
    assert any(not isinstance(s, int) for s in report.decisions[0].input_shape), "shapes should be symbolic"
    for shape in [(2, 4, 7, 9), (3, 4, 5, 11)]:
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x, w), fn(x, w), rtol=1e-4, atol=1e-4)
    assert len(kernel_launches) == 2


@needs_interpreter
def test_unbatched_input(kernel_launches):
    fn = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    args = (torch.randn(4, 6, 7), torch.randn(8, 4, 3, 3))
    gm = trace(fn, *args)
    run_pass(gm, input_precision="ieee")
    assert len(conv_nodes(gm, TRITON_CONV)) == 1
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-4, atol=1e-4)
    assert len(kernel_launches) == 1


@needs_interpreter
def test_complex_convolution_decomposes_into_replaced_real_convs(kernel_launches):
    fn = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    args = (torch.randn(1, 4, 6, 6, dtype=torch.complex64), torch.randn(8, 4, 3, 3, dtype=torch.complex64))
    gm = trace(fn, *args)
    report = run_pass(gm, input_precision="ieee")
    assert report.decisions and all(d.dtype == "float32" for d in report.decisions)
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-4, atol=1e-4)
    assert len(kernel_launches) == len(report.replaced) > 0


# ---------------------------------------------------------------- layout between convolutions

def _chain(x, w1, w2):
    return F.conv2d(F.relu(F.conv2d(x, w1, padding=1)), w2, padding=1)


def _chain_with_side_output(x, w1, w2):
    y = F.relu(F.conv2d(x, w1, padding=1))
    return F.conv2d(y, w2, padding=1), y


CHAIN_ARGS = lambda: (torch.randn(2, 8, 6, 7), torch.randn(8, 8, 3, 3), torch.randn(8, 8, 3, 3))  # noqa: E731


def _output_formats(gm):
    return [n.args[-1] for n in conv_nodes(gm, TRITON_CONV)]


def test_channels_last_between_consecutive_convs(interpret_env):
    gm = trace(_chain, *CHAIN_ARGS())
    run_pass(gm, channels_last=True)
    first, second = conv_nodes(gm, TRITON_CONV)
    assert _output_formats(gm)[0] == "channels_last"
    assert second.args[OUTPUT_FORMAT_ARG] != "channels_last", "the graph output keeps eager's format"
    relu = first.next
    assert relu.meta["val"].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_option_off(interpret_env):
    gm = trace(_chain, *CHAIN_ARGS())
    run_pass(gm, channels_last=False)
    assert "channels_last" not in _output_formats(gm)


def test_no_channels_last_when_activation_escapes(interpret_env):
    gm = trace(_chain_with_side_output, *CHAIN_ARGS())
    run_pass(gm, channels_last=True)
    assert "channels_last" not in _output_formats(gm)


@needs_interpreter
@pytest.mark.parametrize("fn", [_chain, _chain_with_side_output], ids=["chain", "side_output"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_layout_pass_keeps_eager_results_and_strides(fn, channels_last, kernel_launches):
    args = CHAIN_ARGS()
    gm = trace(fn, *args)
    run_pass(gm, channels_last=channels_last, input_precision="ieee")
    got, want = gm(*args), fn(*args)
    got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
        assert format_flags(g) == format_flags(e), (g.stride(), e.stride())
    assert len(kernel_launches) == 2


@needs_interpreter
def test_channels_last_input_graph_keeps_channels_last_output(kernel_launches):
    args = list(CHAIN_ARGS())
    args[0] = args[0].to(memory_format=torch.channels_last)
    gm = trace(_chain, *args)
    run_pass(gm, input_precision="ieee")
    out = gm(*args)
    ref = _chain(*args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last) and format_flags(out) == format_flags(ref)


@needs_interpreter
def test_channels_last_weight_graph_output_format_matches_eager(kernel_launches):
    """The traced node's format (FakeTensor's rule: input OR weight channels_last) is kept."""
    x = torch.randn(2, 8, 6, 7)
    w = torch.randn(8, 8, 3, 3).to(memory_format=torch.channels_last)
    fn = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    gm = trace(fn, x, w)
    run_pass(gm, input_precision="ieee")
    out, ref = gm(x, w), fn(x, w)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert format_flags(out) == format_flags(ref), (out.stride(), ref.stride())
