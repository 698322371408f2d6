"""FX pass: replace each supported aten.convolution node by `tritonconv::conv2d`.

A plain GraphModule -> GraphModule function, independent of AOTAutograd, so it
can be tested alone and its output handed to another compiler.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.tritonconv.conv2d)
from .options import BackendOptions
from .report import ConvDecision, Report
from .support import unsupported_reason

aten = torch.ops.aten
CONV_TARGETS = (aten.convolution.default,)
BACKWARD_TARGETS = (aten.convolution_backward.default,)


def _val(arg):
    """The fake tensor (or plain value) an FX argument stands for."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("val", arg.meta.get("example_value"))
    return arg


def _static(values) -> tuple:
    return tuple(int(v) if isinstance(v, int) else str(v) for v in values)


def _decision(graph_name: str, node: fx.Node, x_arg, weight_arg, stride, padding, dilation, groups,
              replaced: bool, reason: str, algorithm: str = "") -> ConvDecision:
    x, weight = _val(x_arg), _val(weight_arg)
    return ConvDecision(
        graph=graph_name, node=node.name, replaced=replaced, reason=reason, algorithm=algorithm,
        input_shape=_static(x.shape) if isinstance(x, torch.Tensor) else None,
        weight_shape=_static(weight.shape) if isinstance(weight, torch.Tensor) else None,
        stride=_static(stride), padding=_static(padding), dilation=_static(dilation),
        groups=groups if isinstance(groups, int) else str(groups),
        dtype=str(x.dtype).replace("torch.", "") if isinstance(x, torch.Tensor) else "",
        device=str(x.device) if isinstance(x, torch.Tensor) else "",
    )


def replace_convolutions(gm: fx.GraphModule, options: Optional[BackendOptions] = None,
                         report: Optional[Report] = None, graph_name: str = "graph") -> fx.GraphModule:
    """Rewrite `gm` in place and return it; record every convolution node in `report`."""
    options = options or BackendOptions()
    report = report if report is not None else Report()
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in BACKWARD_TARGETS:
            _, x, weight, _, stride, padding, dilation, _, _, groups, _ = node.args
            report.add(_decision(graph_name, node, x, weight, stride, padding, dilation, groups, False,
                                 "convolution_backward stays on ATen"), options.verbose)
            continue
        if node.target not in CONV_TARGETS:
            continue
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
        if not options.enabled:
            reason = "replacement disabled (options={'enabled': False})"
        else:
            reason = unsupported_reason(_val(x), _val(weight), _val(bias), stride, padding, dilation,
                                        transposed, output_padding, groups, options.algorithm)
        report.add(_decision(graph_name, node, x, weight, stride, padding, dilation, groups, reason is None,
                             reason or "", options.algorithm), options.verbose)
        if reason is not None:
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                torch.ops.tritonconv.conv2d.default,
                (x, weight, bias, stride, padding, dilation, groups, options.input_precision, options.algorithm),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
