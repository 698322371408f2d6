"""FX pass: replace each supported aten.convolution node by `tritonconv::conv2d`.

A plain GraphModule -> GraphModule function, independent of AOTAutograd, so it
can be tested alone and its output handed to another compiler.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch._prims_common import suggest_memory_format

from .fusion import fuse_epilogues
from .ops import (OUTPUT_FORMAT_ARG, RESIDUAL_ARG, TENSOR_ARGS, TRITON_CONV, TRITON_CONV_STATIC, full_call_args,
                  static_string)
from .options import BackendOptions
from .report import ConvDecision, Report
from .support import unsupported_reason

log = logging.getLogger("conv_backend")
aten = torch.ops.aten
# aten.convolution is what AOTAutograd produces; aten.conv2d what torch.export leaves in its default graphs.
CONV_TARGETS = (aten.convolution.default, aten.conv2d.default)
BACKWARD_TARGETS = (aten.convolution_backward.default,)
# Convolutions the pass does not take; the report names them so that none goes unseen.
OTHER_CONV_TARGETS = {
    aten.conv2d.padding: "aten.conv2d with string padding (run_decompositions() turns it into aten.convolution)",
    aten._convolution.default: "aten._convolution (run_decompositions() turns it into aten.convolution)",
    aten.conv1d.default: "1D convolution (only 2D is supported)",
    aten.conv3d.default: "3D convolution (only 2D is supported)",
    aten.conv_transpose2d.input: "transposed convolution",
}
# Unary pointwise ops: their output keeps their input's memory format.
LAYOUT_PRESERVING = {
    aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default, aten.silu.default,
    aten.silu_.default, aten.gelu.default, aten.sigmoid.default, aten.leaky_relu.default, aten.hardswish.default,
    aten.clamp_min.default, aten.clamp.default, aten.mul.Scalar, aten.add.Scalar,
}
# Ops that read only sizes: any memory format will do, and nothing flows on from them.
LAYOUT_BLIND = {aten.sym_size.int, aten.sym_numel.default}
# Ops that compute the same values for any input memory format (their output's may differ).
LAYOUT_TOLERANT = LAYOUT_PRESERVING | {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten._native_batch_norm_legit_no_training.default, aten.max_pool2d_with_indices.default,
    aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.mean.dim, aten.cat.default,
    operator.getitem,
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


def use_static_form(gm: fx.GraphModule) -> int:
    """Turn each `tritonconv::conv2d` node whose arguments are constants into `tritonconv::conv2d_static`, the
    form with its static arguments in one string (cheaper to call, see ops.py). For a compiled graph, once
    every pass that reads the full form has run. Returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != TRITON_CONV:
            continue
        static = static_string(node.args)
        if static is None:
            continue
        full = full_call_args(node.args)
        node.target = TRITON_CONV_STATIC
        node.args = (*(full[i] for i in TENSOR_ARGS), static)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _convolution_args(node: fx.Node) -> tuple:
    """aten.convolution's nine arguments for a node of CONV_TARGETS (aten.conv2d's defaults filled in)."""
    if node.target == aten.convolution.default:
        return node.args
    named = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), node.args), **node.kwargs)

    def pair(value):
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        return value * 2 if len(value) == 1 else value
    return (named["input"], named["weight"], named.get("bias"), pair(named.get("stride", 1)),
            pair(named.get("padding", 0)), pair(named.get("dilation", 1)), False, [0, 0], named.get("groups", 1))


def replace_convolutions(gm: fx.GraphModule, options: Optional[BackendOptions] = None,
                         report: Optional[Report] = None, graph_name: str = "graph",
                         allow_layout_copies: bool = False) -> fx.GraphModule:
    """Rewrite `gm` in place and return it; record every convolution node in `report`.

    Supported convolutions become `tritonconv::conv2d` nodes, and with
    options.fusion the ops after them fold into their epilogues (conv_backend.fusion).
    `allow_layout_copies`: see keep_channels_last_between_convs (the backend sets
    it for inference graphs, which save no activations for backward).
    """
    options = options or BackendOptions()
    report = report if report is not None else Report()
    decisions: dict = {}  # our conv node -> its decision, to record what fusion folds into it
    seen: list = []  # every decision, in graph order: reported once fusion has run
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in BACKWARD_TARGETS:
            _, x, weight, _, stride, padding, dilation, _, _, groups, _ = node.args
            seen.append(_decision(graph_name, node, x, weight, stride, padding, dilation, groups, False,
                                  "convolution_backward stays on ATen"))
            continue
        if node.target in OTHER_CONV_TARGETS:
            x, weight = node.args[:2]
            decision = _decision(graph_name, node, x, weight, (), (), (), 1, False, OTHER_CONV_TARGETS[node.target])
            seen.append(decision)
            log.warning("tritonconv: %s", decision.describe())
            continue
        if node.target not in CONV_TARGETS:
            continue
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = _convolution_args(node)
        if not options.enabled:
            reason = "replacement disabled (options={'enabled': False})"
        else:
            reason = unsupported_reason(_val(x), _val(weight), _val(bias), stride, padding, dilation,
                                        transposed, output_padding, groups, options.algorithm)
        decision = _decision(graph_name, node, x, weight, stride, padding, dilation, groups, reason is None,
                             reason or "", options.algorithm)
        seen.append(decision)
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
        decisions[new] = decision
    if decisions and options.fusion:
        def record(old, new, epilogue):
            decisions[new] = decisions.pop(old)
            decisions[new].epilogue = epilogue.describe()
        fuse_epilogues(gm, record)
    for decision in seen:
        report.add(decision, options.verbose)
    if decisions and options.channels_last:
        keep_channels_last_between_convs(gm, allow_layout_copies)
    if decisions:
        gm.graph.lint()
        gm.recompile()
    return gm


def _traced_format(node: fx.Node) -> str:
    """The memory format eager gave this convolution's output when the graph was traced."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and suggest_memory_format(val) == torch.channels_last:
        return "channels_last"
    return "contiguous" if isinstance(val, torch.Tensor) else "eager"


def _is_4d(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 4


def _channels_last_meta(node: fx.Node) -> None:
    val = node.meta.get("val")
    fake_mode = getattr(val, "fake_mode", None)
    if _is_4d(node) and fake_mode is not None:
        with fake_mode:
            node.meta["val"] = torch.empty_like(val, memory_format=torch.channels_last)


def _reads_as_residual(user: fx.Node, node: fx.Node) -> bool:
    """`user` is one of our convolutions reading `node` only as the residual of its epilogue (any strides)."""
    args = user.args
    return user.op == "call_function" and user.target == TRITON_CONV and len(args) > RESIDUAL_ARG \
        and args[RESIDUAL_ARG] is node and node not in args[:RESIDUAL_ARG]


def _feeds_conv(user: fx.Node, node: fx.Node) -> bool:
    """`user` is one of our convolutions reading `node` as its input (not as weight or bias)."""
    return user.op == "call_function" and user.target == TRITON_CONV and user.args[0] is node \
        and node not in user.args[1:]


def _channels_last_region(conv: fx.Node, tolerant: set, restored: set):
    """Follow `conv`'s output through ops that take any memory format (`tolerant`).

    Returns the region's 4-D nodes, the convolutions fed from it, and the other
    uses (user, node) that would see a channels_last tensor where eager had not
    (`restored`: copies back to eager's format made for an earlier region).
    """
    region, convs, boundary = [conv], [], []
    pending = [conv]
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in restored or user.target in LAYOUT_BLIND or _reads_as_residual(user, node):
                continue
            if _feeds_conv(user, node):
                convs.append(user)
            elif user.op == "call_function" and user.target in tolerant:
                if user.target is operator.getitem and not _is_4d(user):
                    continue  # a statistic of batch norm, say: not an activation
                if user not in region:
                    region.append(user)
                    pending.append(user)
            else:
                boundary.append((user, node))
    return region, convs, boundary


def keep_channels_last_between_convs(gm: fx.GraphModule, allow_layout_copies: bool = False) -> None:
    """Let activations flowing from one of our convolutions into another stay channels_last.

    Our GEMM kernels read NHWC; producing it directly saves a layout conversion
    in the next convolution and gives the kernel coalesced stores. By default a
    convolution switches only when everything downstream of it, through unary
    pointwise ops, is another convolution. With `allow_layout_copies` the region
    also spans batch norm, pooling and binary pointwise ops, and wherever the
    activation leaves it (any other op, a graph output) a copy restores eager's
    memory format: worth it where no activation is saved for backward.
    """
    tolerant = LAYOUT_TOLERANT if allow_layout_copies else LAYOUT_PRESERVING
    copies: dict = {}  # region node -> its copy in eager's format, shared by all boundary uses
    for conv in list(gm.graph.nodes):
        if not (conv.op == "call_function" and conv.target == TRITON_CONV
                and conv.args[OUTPUT_FORMAT_ARG] == "contiguous"):
            continue
        region, convs, boundary = _channels_last_region(conv, tolerant, set(copies.values()))
        if not convs or (boundary and not allow_layout_copies):
            continue
        conv.args = conv.args[:OUTPUT_FORMAT_ARG] + ("channels_last",) + conv.args[OUTPUT_FORMAT_ARG + 1:]
        for user, node in boundary:
            if node not in copies:
                copies[node] = _eager_format_copy(gm, node)
            user.replace_input_with(node, copies[node])
        for node in region:
            _channels_last_meta(node)


def _eager_format_copy(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A copy of `node` in the memory format eager traced for it (read before the meta changes)."""
    val = node.meta["val"]
    with gm.graph.inserting_after(node):
        copy = gm.graph.call_function(aten.clone.default, (node,), {"memory_format": suggest_memory_format(val)})
    copy.meta["val"] = val
    return copy
