"""FX pass: replace each supported aten.convolution node by `tritonconv::conv2d`.

A plain GraphModule -> GraphModule function, independent of AOTAutograd, so it
can be tested alone and its output handed to another compiler.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch._prims_common import suggest_memory_format

from . import ops  # noqa: F401  (registers torch.ops.tritonconv.conv2d)
from .options import BackendOptions
from .report import ConvDecision, Report
from .support import unsupported_reason

aten = torch.ops.aten
CONV_TARGETS = (aten.convolution.default,)
BACKWARD_TARGETS = (aten.convolution_backward.default,)
TRITON_CONV = torch.ops.tritonconv.conv2d.default
OUTPUT_FORMAT_ARG = 9  # index of output_format in tritonconv::conv2d's arguments
# Unary pointwise ops: their output keeps their input's memory format.
LAYOUT_PRESERVING = {
    aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default, aten.silu.default,
    aten.silu_.default, aten.gelu.default, aten.sigmoid.default, aten.leaky_relu.default, aten.hardswish.default,
    aten.clamp_min.default, aten.clamp.default, aten.mul.Scalar, aten.add.Scalar,
}


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
                TRITON_CONV,
                (x, weight, bias, stride, padding, dilation, groups, options.input_precision, options.algorithm,
                 _traced_format(node)),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed and options.channels_last:
        keep_channels_last_between_convs(gm)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _traced_format(node: fx.Node) -> str:
    """The memory format eager gave this convolution's output when the graph was traced."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and suggest_memory_format(val) == torch.channels_last:
        return "channels_last"
    return "contiguous" if isinstance(val, torch.Tensor) else "eager"


def _feeds_only_convs(node: fx.Node) -> bool:
    """Every use of `node` is as the input of our conv, directly or through layout-preserving ops."""
    if not node.users:
        return False
    for user in node.users:
        if user.op == "call_function" and user.target == TRITON_CONV:
            if user.args[0] is not node or node in user.args[1:]:
                return False
        elif not (user.op == "call_function" and user.target in LAYOUT_PRESERVING and user.args[0] is node
                  and _feeds_only_convs(user)):
            return False
    return True


def _channels_last_meta(node: fx.Node) -> None:
    val = node.meta.get("val")
    fake_mode = getattr(val, "fake_mode", None)
    if isinstance(val, torch.Tensor) and val.dim() == 4 and fake_mode is not None:
        with fake_mode:
            node.meta["val"] = torch.empty_like(val, memory_format=torch.channels_last)


def keep_channels_last_between_convs(gm: fx.GraphModule) -> None:
    """Let a convolution whose output only feeds other convolutions write it channels_last.

    Our GEMM kernels read NHWC; producing it directly saves a layout conversion
    per edge. Anything else that consumes the activation (and every graph
    output) still sees eager's memory format.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == TRITON_CONV and _feeds_only_convs(node):
            args = list(node.args)
            args[OUTPUT_FORMAT_ARG] = "channels_last"
            node.args = tuple(args)
            _channels_last_meta(node)
            pending = [u for u in node.users if u.target in LAYOUT_PRESERVING]
            while pending:
                user = pending.pop()
                _channels_last_meta(user)
                pending.extend(u for u in user.users if u.target in LAYOUT_PRESERVING)
