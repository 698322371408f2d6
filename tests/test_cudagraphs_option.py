"""options cudagraphs: which graphs the backend hands to Inductor's CUDA graphs, and the copies of their outputs
that keep a caller's results from being overwritten by the next replay (CPU; the replays are in
test_cuda_compose.py)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conv_backend.backend import copying_outputs, has_dynamic_shapes, outputs_to_copy, replays_in_cuda_graphs
from conv_backend.options import BackendOptions
from conv_backend.report import Report


def _inputs(device: str, requires_grad: bool):
    with FakeTensorMode():  # a CUDA tensor's metadata, no GPU needed
        return [torch.empty(2, 3, device=device, requires_grad=requires_grad), torch.empty(3, device=device)]


@pytest.mark.parametrize("cudagraphs, mode, settings, device, requires_grad, grad_enabled, expected", [
    (True, None, {}, "cuda", False, True, True),          # inference: no input needs a gradient
    (True, "default", {}, "cuda", True, False, True),     # inference: grad mode off
    (True, None, {}, "cuda", True, True, False),          # training graph
    (True, None, {}, "cpu", False, True, False),          # nothing on CUDA
    (False, None, {}, "cuda", False, True, False),        # turned off
    (True, "max-autotune-no-cudagraphs", {}, "cuda", False, True, False),  # a mode decides
    (True, "reduce-overhead", {"triton.cudagraphs": True}, "cuda", False, True, False),  # Inductor's own, as asked
    (True, None, {"triton.cudagraphs": False}, "cuda", False, True, False),  # the setting decides
])
def test_which_graphs_get_cuda_graphs(cudagraphs, mode, settings, device, requires_grad, grad_enabled, expected,
                                      monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    opts = BackendOptions(cudagraphs=cudagraphs)
    inputs = _inputs(device, requires_grad)
    with torch.set_grad_enabled(grad_enabled):
        assert replays_in_cuda_graphs(opts, mode, settings, inputs) is expected


def test_not_with_an_allocator_that_cuda_graph_trees_cannot_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    with torch.no_grad():
        assert replays_in_cuda_graphs(BackendOptions(), None, {}, _inputs("cuda", False)) is False


def test_option_must_be_a_bool():
    with pytest.raises(ValueError, match="cudagraphs"):
        BackendOptions.from_mapping({"cudagraphs": "yes"})


def _dynamo_graph(fn, *args, dynamic=None) -> torch.fx.GraphModule:
    graphs: list = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True, dynamic=dynamic)(*args)
    (gm,) = graphs
    return gm


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_shape_graphs_are_told_apart(dynamic):
    def fn(x, w):
        return torch.nn.functional.conv2d(x, w).relu()
    gm = _dynamo_graph(fn, torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3), dynamic=dynamic)
    assert has_dynamic_shapes(gm) is dynamic


def test_outputs_that_view_an_input_are_not_copied():
    def fn(x, w):
        y = torch.nn.functional.conv2d(x, w)
        return x.view(-1), y, y.relu(), x, w[0]
    gm = _dynamo_graph(fn, torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
    assert outputs_to_copy(gm) == [1, 2]


def test_copies_are_made_once_per_tensor_and_only_where_asked():
    a, b, view = torch.randn(3), torch.randn(3), torch.randn(4)
    calls = []

    def compiled(*args):
        calls.append(args)
        return [a, a, b, view, 7]
    compiled._boxed_call = True
    run = copying_outputs(compiled, [0, 1, 2, 4])
    out = run("arg")
    assert calls == [("arg",)] and run._boxed_call is True
    assert out[0] is out[1] and out[0] is not a and torch.equal(out[0], a)   # one copy of a tensor returned twice
    assert out[2] is not b and torch.equal(out[2], b)
    assert out[3] is view and out[4] == 7                                      # not asked / not a tensor
    a.add_(1)                                                                  # what a replay would do to its outputs
    assert not torch.equal(out[0], a)


def test_tuple_outputs_stay_tuples():
    t = torch.randn(2)
    out = copying_outputs(lambda: (t,), [0])()
    assert isinstance(out, tuple) and out[0] is not t


def test_report_says_when_cuda_graphs_are_on():
    report, other = Report(), Report()
    other.cuda_graphs = True
    assert "CUDA graphs" not in str(report)
    report.extend(other)
    assert "CUDA graphs on" in str(report) and report.to_dict()["cuda_graphs"] is True
