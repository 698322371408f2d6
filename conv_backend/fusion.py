"""FX pass: fold the ops that follow one of our convolutions into its kernel's epilogue.

On an ATen graph where convolutions are already `tritonconv::conv2d` nodes, a
chain `conv -> batch norm (eval) -> add -> activation` (each step optional, in
that order) becomes one fused node, so the activation is written once instead
of once per op. A step is folded only when the value before it has no other
use (not another op, not a graph output, not a tensor saved for backward), so
no intermediate anyone reads disappears. What is not folded stays in the graph
for the next compiler (Inductor fuses it there, or ATen runs it).

The ops are matched in the form AOTAutograd leaves them when their
decompositions are held back (UNDECOMPOSED); `decompose_leftovers` decomposes
whichever of them were not folded, so the graph Inductor lowers holds only
what it lowers.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .epilogue import Epilogue
from .ops import ALGORITHM_ARG, EPILOGUE_START, TRITON_CONV

aten = torch.ops.aten
BATCH_NORM = aten._native_batch_norm_legit_no_training.default


def _gelu_kind(node: fx.Node) -> Optional[str]:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)


# ATen op -> (epilogue activation name, or a function of the node giving it; its float parameters with defaults)
ACTIVATION_OPS: dict = {
    aten.relu.default: ("relu", ()),
    aten.hardtanh.default: ("hardtanh", (-1.0, 1.0)),
    aten.leaky_relu.default: ("leaky_relu", (0.01,)),
    aten.silu.default: ("silu", ()),
    aten.gelu.default: (_gelu_kind, ()),
    aten.hardswish.default: ("hardswish", ()),
    aten.hardsigmoid.default: ("hardsigmoid", ()),
    aten.sigmoid.default: ("sigmoid", ()),
    aten.tanh.default: ("tanh", ()),
}
# Ops whose decompositions the backend holds back from AOTAutograd so that this pass can see them.
UNDECOMPOSED = (BATCH_NORM, aten.hardtanh.default, aten.leaky_relu.default, aten.silu.default, aten.gelu.default,
                aten.hardswish.default, aten.hardsigmoid.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_function" else None


def _same_tensor_type(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
        and a.shape == b.shape and a.device == b.device


def _batch_norm_step(node: fx.Node):
    """(bn arguments, the node holding its output, the nodes to erase) when node's sole use is an eval batch
    norm with affine parameters whose statistics are its only other output uses; else None."""
    bn = _sole_user(node)
    if bn is None or bn.target != BATCH_NORM or bn.args[0] is not node:
        return None
    _, weight, bias, mean, var = bn.args[:5]
    eps = bn.args[6] if len(bn.args) > 6 else bn.kwargs.get("eps")
    if weight is None or bias is None or not isinstance(eps, float):
        return None
    outputs = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outputs) != 1 or any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users):
        return None
    return (mean, var, weight, bias, eps), outputs[0], [bn, *bn.users]


def _residual_step(node: fx.Node):
    """(the other addend, the add node) when node's sole use is `node + other` with a tensor of its type."""
    add = _sole_user(node)
    if add is None or add.target != aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    if other is node or not isinstance(other, fx.Node) or not _same_tensor_type(_val(other), _val(node)):
        return None
    return other, add


def _activation_step(node: fx.Node):
    """(name, parameters, the activation node) when node's sole use is a supported activation of it."""
    act = _sole_user(node)
    if act is None or act.target not in ACTIVATION_OPS or act.args[0] is not node:
        return None
    name, defaults = ACTIVATION_OPS[act.target]
    if callable(name):
        name = name(act)
    elif act.kwargs:  # parameters passed by name: rare in ATen graphs, not worth reading
        return None
    if name is None:
        return None
    params = tuple(act.args[1:1 + len(defaults)]) + defaults[len(act.args) - 1:]
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in params):
        return None
    return name, tuple(float(p) for p in params), act


def fuse_epilogues(gm: fx.GraphModule, on_fused: Optional[Callable[[fx.Node, fx.Node, Epilogue], None]] = None
                   ) -> int:
    """Fold each foldable chain after a `tritonconv::conv2d` node into the node; returns how many were folded.

    `on_fused(old, new, epilogue)` is told of every replacement (the report follows it)."""
    fused = 0
    for conv in list(gm.graph.nodes):
        if conv.op != "call_function" or conv.target != TRITON_CONV or len(conv.args) > EPILOGUE_START \
                or conv.args[ALGORITHM_ARG] == "seed":  # the seed kernel stays the baseline it is: unfused
            continue
        tail, erased = conv, [conv]
        bn_args, residual, activation = None, None, ("none", ())
        step = _batch_norm_step(tail)
        if step is not None:
            bn_args, tail, nodes = step
            erased += nodes
        step = _residual_step(tail)
        if step is not None:
            residual, tail = step
            erased.append(tail)
        step = _activation_step(tail)
        if step is not None:
            activation, tail = step[:2], step[2]
            erased.append(tail)
        if tail is conv or not _same_tensor_type(_val(tail), _val(conv)):
            continue
        mean, var, weight, bias, eps = bn_args or (None, None, None, None, 0.0)
        epilogue = Epilogue(batch_norm=mean is not None, bn_eps=eps, residual=residual is not None,
                            activation=activation[0], activation_params=activation[1])
        out_format = "channels_last" if suggest_memory_format(_val(tail)) == torch.channels_last else "contiguous"
        args = conv.args[:EPILOGUE_START - 1] + (out_format, mean, var, weight, bias, float(eps), residual,
                                                 activation[0], list(activation[1]))
        with gm.graph.inserting_before(tail):
            new = gm.graph.call_function(TRITON_CONV, args)
        new.meta = dict(tail.meta)
        tail.replace_all_uses_with(new)
        for node in reversed(erased):
            gm.graph.erase_node(node)
        if on_fused is not None:
            on_fused(conv, new, epilogue)
        fused += 1
    return fused


def decompose_leftovers(gm: fx.GraphModule, decompositions: dict) -> int:
    """Replace each node of an UNDECOMPOSED op left in the graph by its decomposition (from `decompositions`,
    the table AOTAutograd would have used), traced on the node's fake values and spliced in place."""
    from torch.fx.experimental.proxy_tensor import make_fx

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in UNDECOMPOSED or node.target not in decompositions:
            continue
        decomposition = decompositions[node.target]
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        consts = [None if isinstance(a, fx.Node) else a for a in node.args]

        def call(*values, _consts=consts, _kwargs=dict(node.kwargs), _fn=decomposition):
            it = iter(values)
            return _fn(*[next(it) if c is None else c for c in _consts], **_kwargs)

        with unset_fake_temporarily():
            traced = make_fx(call, decomposition_table=decompositions, tracing_mode="real")(*[_val(a) for a in tensors])
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        with gm.graph.inserting_before(node):
            out = gm.graph.graph_copy(traced.graph, dict(zip(placeholders, tensors)))
        if isinstance(out, (tuple, list)):
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(out[user.args[1]])
                    gm.graph.erase_node(user)
        else:
            node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    return count
