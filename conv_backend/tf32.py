"""Rounded-TF32 convolutions whose operands are rounded where they are made, so that every kernel can take them.

With TF32 allowed (cuDNN's setting, eager's default) the "auto" policy multiplies compute-bound fp32
convolutions in TF32 with cuDNN's rounding ("tf32_round", runtime.choose_fp32_precision): each operand
rounded to the nearest TF32 value, where Triton's TF32 dot truncates, a bias that adds up over a deep
network. Rounding inside a kernel costs a trip of every tile through the registers, and the Gluon kernels
for Hopper, which feed the tensor cores straight from shared memory, cannot round at all. In a graph
compiled by Inductor the rounding moves to where the operands are made:

- an input made by one of our convolutions: that convolution stores its output rounded (Epilogue.round_tf32),
  in the epilogue it runs anyway;
- any other input (Inductor's batch norm, a pooling, a graph input): rounding ops after it, which Inductor
  fuses into the kernel that makes it;
- the weight: rounding ops on it, one small kernel a call (constant-folded under freezing), whose output is
  channels_last, the layout our kernels read in place;

and the convolution runs "tf32" on values that TF32 holds exactly: cuDNN's arithmetic, on any of our kernels.
An activation stored rounded is rounded for all its readers (a residual branch too): it moves by at most
half a TF32 ulp (2^-11 relative, unbiased), which the same convolution's TF32 products already cost.

Only inference graphs with static shapes are rewritten. Under "auto" the choice depends on cuDNN's
TF32 setting when the graph is compiled, which Dynamo does not guard: `TF32Guard` notices a change and runs
the graph eagerly instead of with the rounded operands.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from .epilogue import TF32_HALF_ULP, TF32_MASK
from .graph_pass import _val
from .ops import TRITON_CONV, named_args, replaced_args
from .runtime import choose_fp32_precision, cudnn_conv_allows_tf32
from .support import has_static_layout

log = logging.getLogger("conv_backend")
aten = torch.ops.aten


def _rounded_precision(node: fx.Node) -> bool:
    """Whether `node` (a full-form conv2d) multiplies in rounded TF32 under its policy: fp32 of static shapes
    ("auto" picks it on CUDA only; a forced "tf32_round" anywhere, the interpreter included)."""
    args = named_args(node.args)
    x, weight = _val(args["input"]), _val(args["weight"])
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.dtype != torch.float32 or not (has_static_layout(x) and has_static_layout(weight)):
        return False
    stride, padding, dilation, groups = (args[k] for k in ("stride", "padding", "dilation", "groups"))
    if not all(type(v) is int for v in (*stride, *padding, *dilation, groups)):
        return False
    return choose_fp32_precision(args["input_precision"], x.shape, weight.shape, stride, padding, dilation, groups,
                                 x.dtype, x.device) == "tf32_round"


def _call(graph: fx.Graph, target, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """A new node computing target(*args, **kwargs), its fake value computed from its arguments'."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals = [_val(a) for a in args]
    fake = next(v for v in vals if isinstance(v, torch.Tensor))
    with fake.fake_mode:
        node.meta["val"] = target(*vals, **kwargs)
    return node


def _insert_rounding(gm: fx.GraphModule, value: fx.Node, before: fx.Node, channels_last: bool) -> fx.Node:
    """Nodes, placed before `before`, that round `value` to the nearest TF32 value (epilogue.round_to_tf32 in
    ATen ops, which Inductor fuses); `channels_last` makes the rounded copy channels_last."""
    graph = gm.graph
    with graph.inserting_before(before):
        source = value
        if channels_last:
            source = _call(graph, aten.clone.default, (value,), {"memory_format": torch.channels_last})
        bits = _call(graph, aten.view.dtype, (source, torch.int32))
        carried = _call(graph, aten.add.Scalar, (bits, TF32_HALF_ULP))
        masked = _call(graph, aten.bitwise_and.Scalar, (carried, TF32_MASK))
        rounded = _call(graph, aten.view.dtype, (masked, torch.float32))
        # NaN stays NaN: the GPU's canonical NaN plus half an ulp would carry into the sign bit.
        return _call(graph, aten.where.self, (_call(graph, aten.isnan.default, (source,)), source, rounded))


def round_operands_where_made(gm: fx.GraphModule) -> int:
    """Rewrite every `tritonconv::conv2d` of `gm` (full form, before use_static_form) that multiplies in rounded
    TF32 as described in the module docstring. Returns how many convolutions now take rounded operands."""
    copies: dict = {}  # (value, channels_last) -> its rounded copy, made once however many convolutions read it

    def rounded(value, reader: fx.Node, channels_last: bool):
        if not isinstance(value, fx.Node):
            return value
        if (value, channels_last) not in copies:
            copies[value, channels_last] = _insert_rounding(gm, value, reader, channels_last)
        return copies[value, channels_last]

    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != TRITON_CONV or not _rounded_precision(node):
            continue
        args = named_args(node.args)
        x = args["input"]
        if isinstance(x, fx.Node) and x.op == "call_function" and x.target == TRITON_CONV:
            x.args = replaced_args(x.args, round_tf32=True)  # its epilogue stores the activation rounded
        else:
            x = rounded(x, node, channels_last=False)
        weight = rounded(args["weight"], node, channels_last=_val(args["weight"]).dim() == 4)
        # "tf32" is exact on operands TF32 holds: what "tf32_round" computes, on any kernel
        node.args = replaced_args(node.args, input=x, weight=weight, input_precision="tf32")
        changed += 1
    if changed:
        log.info("tritonconv: %d convolution(s) multiply in TF32 on operands rounded where they are made", changed)
        gm.graph.lint()
        gm.recompile()
    return changed


class TF32Guard:
    """A compiled graph whose "auto" convolutions took their precision from cuDNN's TF32 setting at compile
    time (round_operands_where_made): while the setting is what it was, the compiled graph runs; after a
    change (torch.backends.cudnn.allow_tf32 or fp32_precision), `eager` runs (the graph as Dynamo traced it:
    ATen, which reads the setting on each call), with a warning once. Recompiling (torch._dynamo.reset())
    brings the speed back under the new setting."""

    def __init__(self, compiled, eager: fx.GraphModule):
        self.compiled, self.eager = compiled, eager
        self.allows_tf32 = cudnn_conv_allows_tf32()
        self._boxed_call = getattr(compiled, "_boxed_call", False)  # called as `compiled` is
        self._warned = False

    def __call__(self, *args):
        if cudnn_conv_allows_tf32() == self.allows_tf32:
            return self.compiled(*args)
        if not self._warned:
            self._warned = True
            log.warning("tritonconv: cuDNN's TF32 setting changed after this graph was compiled for it; the graph "
                        "runs eagerly on ATen from now on (torch._dynamo.reset() recompiles it for the new setting)")
        # A boxed call passes one list; Dynamo's graph takes its inputs (tensors, sizes) one by one.
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        return self.eager(*inputs)


def guarded(compiled, eager: fx.GraphModule, policy: str, rounded: int):
    """`compiled`, behind a TF32Guard where its rounding depended on cuDNN's setting ("auto" and any rounded)."""
    if not rounded or policy != "auto":
        return compiled
    return TF32Guard(compiled, eager)
