"""The `tritonconv` torch.compile backend (registered through the torch_dynamo_backends entry point)."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Optional

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from .dispatch import launch_conv2d
from .graph_pass import TRITON_CONV, replace_convolutions
from .options import BackendOptions
from .report import Report, set_last_report

_graph_ids = itertools.count()


def tritonconv_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[Mapping[str, Any]] = None,
                       mode: Optional[str] = None, report_sink: Optional[Callable[[Report], None]] = None):
    """Lower a Dynamo graph to ATen through AOTAutograd and move its convolutions to Triton.

    `options` arrive from `torch.compile(..., options={...})`; see BackendOptions.
    """
    if mode not in (None, "default"):
        raise ValueError(f"tritonconv: mode {mode!r} is not supported; pass settings through options={{...}}")
    opts = BackendOptions.from_mapping(options)
    report = Report()
    set_last_report(report)
    if report_sink is not None:
        report_sink(report)
    graph_id = next(_graph_ids)

    def make_compiler(kind: str):
        def compile_graph(aten_gm: torch.fx.GraphModule, aten_inputs):
            replace_convolutions(aten_gm, opts, report, f"{kind}{graph_id}", allow_layout_copies=kind == "inference")
            return make_boxed_func(direct_calls(aten_gm).forward)
        return compile_graph

    compiler = aot_autograd(
        fw_compiler=make_compiler("forward"),
        bw_compiler=make_compiler("backward"),
        inference_compiler=make_compiler("inference"),
        keep_inference_input_mutations=True,
    )
    return compiler(gm, example_inputs)


def direct_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose `tritonconv::conv2d` calls go straight to the launch wrapper.

    The custom op keeps graphs traceable; once a graph is compiled nothing traces
    it again, and AOTAutograd runs it with autograd off, so the dispatcher's trip
    through the op (tens of microseconds per call on the host) buys nothing.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node metadata is shared, not copied
    for node in graph.nodes:
        if node.op == "call_function" and node.target == TRITON_CONV:
            node.target = launch_conv2d
    return torch.fx.GraphModule(gm, graph)


def explain(model: Callable, *inputs, options: Optional[Mapping[str, Any]] = None, **kwargs) -> Report:
    """Compile `model` with the backend, run it once on `inputs` (under no_grad), return the report.

    The report lists every convolution of every captured graph: replaced by
    Triton or kept on ATen, with the reason.
    """
    combined = Report()
    reports: list[Report] = []

    def backend(gm, example_inputs):
        return tritonconv_backend(gm, example_inputs, options=options, report_sink=reports.append)

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(*inputs, **kwargs)
    for report in reports:
        combined.extend(report)
    return combined
