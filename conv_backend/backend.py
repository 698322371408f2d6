"""The `tritonconv` torch.compile backend (registered through the torch_dynamo_backends entry point).

With inner="inductor" (the default) the backend is torch.compile's default
backend with one step added: Inductor's compile_fx runs AOTAutograd, freezing,
CUDA graphs and everything else as it would, and hands each ATen graph to our
`inner_compile`, which moves the convolutions to `tritonconv::conv2d`, folds
the ops after them into their epilogues, and passes the graph on to Inductor's
own compile_fx_inner. Inductor then fuses and schedules what is left and calls
our op as an extern kernel. AOTAutograd is asked to keep batch norm and the
activations we fuse whole (conv_backend.fusion.UNDECOMPOSED), so that the pass
sees them as single ops; whichever are not folded are decomposed after it.

With inner="aten" AOTAutograd runs alone and every other op runs as an eager
ATen call (the graph calls our launch wrapper directly).
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
import triton
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from . import precompile, tf32, tuning
from .dispatch import launch_conv2d
from .fusion import UNDECOMPOSED, decompose_leftovers
from .graph_pass import TRITON_CONV, replace_convolutions, use_static_form
from .options import BackendOptions, split_options
from .report import Report, set_last_report
from .support import has_static_layout

log = logging.getLogger("conv_backend")
_graph_ids = itertools.count()


def tritonconv_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[Mapping[str, Any]] = None,
                       mode: Optional[str] = None, report_sink: Optional[Callable[[Report], None]] = None):
    """Compile a Dynamo graph: our convolutions, and the rest by `options["inner"]` (see module docstring).

    `options` arrive from `torch.compile(..., options={...})`: ours (BackendOptions) and, with
    inner="inductor", any torch._inductor.config setting; `mode` is torch.compile's mode.
    """
    opts, inductor_options = split_options(options)
    report = Report()
    set_last_report(report)
    if report_sink is not None:
        report_sink(report)
    graph_id = next(_graph_ids)
    if opts.inner == "aten":
        if mode not in (None, "default") or inductor_options:
            raise ValueError(f"tritonconv: mode={mode!r} and Inductor options {sorted(inductor_options)} need "
                             "inner='inductor'")
        compiled = _compile_with_aten(gm, example_inputs, opts, report, graph_id)
    else:
        compiled = _compile_with_inductor(gm, example_inputs, opts, report, graph_id, mode, inductor_options)
    return _wrap_compiled(compiled, report, opts.autotune)


def _compile_with_aten(gm, example_inputs, opts: BackendOptions, report: Report, graph_id: int):
    def make_compiler(kind: str):
        def compile_graph(aten_gm: torch.fx.GraphModule, aten_inputs):
            replace_convolutions(aten_gm, opts, report, f"{kind}{graph_id}", allow_layout_copies=kind == "inference")
            # Inductor's compile pool is not started for this path: the compile threads, unless told otherwise.
            prepare_plans(aten_gm, opts.autotune, precompile.processes() or 0)
            return make_boxed_func(direct_calls(aten_gm).forward)
        return compile_graph

    compiler = aot_autograd(
        fw_compiler=make_compiler("forward"),
        bw_compiler=make_compiler("backward"),
        inference_compiler=make_compiler("inference"),
        keep_inference_input_mutations=True,
    )
    return compiler(gm, example_inputs)


def inductor_settings(mode: Optional[str], options: Mapping[str, Any]) -> dict:
    """Inductor's config patches for a torch.compile mode and options, exactly as its own backend reads them."""
    try:
        return dict(torch._TorchCompileInductorWrapper(mode, dict(options) or None, None).config)
    except RuntimeError as exc:  # an unknown setting or a bad type: the user's error, said as ours are
        raise ValueError(f"tritonconv: {exc}") from exc


def _compile_with_inductor(gm, example_inputs, opts: BackendOptions, report: Report, graph_id: int, mode,
                           inductor_options):
    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import maybe_warm_pool
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    maybe_warm_pool()  # as Inductor's own backend does: its compile workers start while AOTAutograd traces

    settings = inductor_settings(mode, inductor_options)
    graphs = replays_in_cuda_graphs(opts, mode, settings, example_inputs) and not has_dynamic_shapes(gm)
    if graphs:
        settings = {**settings, "triton.cudagraphs": True}
    with inductor_config.patch(settings):
        decompositions = select_decomp_table()
    aot_table = {op: fn for op, fn in decompositions.items() if op not in UNDECOMPOSED}  # keeps ours whole
    rounded = []  # per inner graph: how many convolutions take operands rounded to TF32 where they are made

    def inner_compile(aten_gm: torch.fx.GraphModule, aten_inputs, **kwargs):
        kind = "inference" if kwargs.get("is_inference") else "backward" if kwargs.get("is_backward") else "forward"
        replace_convolutions(aten_gm, opts, report, f"{kind}{graph_id}", allow_layout_copies=kind == "inference")
        if decompose_leftovers(aten_gm, decompositions):
            aten_gm.graph.lint()
            aten_gm.recompile()
        if kind == "inference":
            rounded.append(tf32.round_operands_where_made(aten_gm))
        # Our candidates compile in the workers while Inductor compiles the rest; they are tuned after.
        planning = start_plans(aten_gm, opts.autotune, precompile.processes())
        try:
            use_static_form(aten_gm)
            compiled = compile_fx_inner(aten_gm, aten_inputs, **kwargs)
        except BaseException:
            if planning is not None and planning.compiling is not None:
                planning.compiling.cancel()
            raise
        finish_plans(planning)
        return compiled

    # AOTAutograd's cache would hand back a compiled graph without running inner_compile, and so without
    # a report of its convolutions; Inductor's own graph cache (inside compile_fx_inner) still applies.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=settings,
                              decompositions=aot_table)
    if graphs:
        report.cuda_graphs = True
        compiled = copying_outputs(compiled, outputs_to_copy(gm))
    return tf32.guarded(compiled, gm, opts.input_precision, sum(rounded))


def replays_in_cuda_graphs(opts: BackendOptions, mode: Optional[str], settings: Mapping[str, Any],
                           example_inputs) -> bool:
    """Whether the backend turns on Inductor's CUDA graphs for this graph (options.cudagraphs): an inference
    graph (what AOTAutograd makes when no input needs a gradient) with CUDA inputs, where neither a
    torch.compile mode nor the "triton.cudagraphs" setting has decided."""
    if not opts.cudagraphs or mode not in (None, "default") or "triton.cudagraphs" in settings:
        return False
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if training or not any(t.is_cuda for t in tensors):
        return False
    # CUDA-graph trees check their pool's live blocks, which only the native caching allocator can report
    # (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync would make every replay an error)
    return torch.cuda.get_allocator_backend() == "native"


def has_dynamic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced `gm` with symbolic sizes. Such a graph would record one CUDA graph per size it
    meets (memory without bound for a server that sees many), so options.cudagraphs leaves it kernel by
    kernel. Decided here, not with Inductor's cudagraph_skip_dynamic_graphs: with graph partitions that
    setting also cuts out nodes of static graphs (our op among them) as "dynamic shape ops"."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return any(free_symbols(node.meta.get("example_value")) for node in gm.graph.find_nodes(op="placeholder")
               if isinstance(node.meta.get("example_value"), (torch.Tensor, torch.SymInt)))


def outputs_to_copy(gm: torch.fx.GraphModule) -> list:
    """Positions of the Dynamo graph's tensor outputs that do not share memory with one of its inputs (from
    the fake values Dynamo records): those come out of the CUDA graphs' memory. An output that views an
    input keeps that view, as in eager; one whose memory is unknown is copied."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def storage(node):
        value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
        return StorageWeakRef(value.untyped_storage()) if isinstance(value, torch.Tensor) else None

    inputs = {storage(n) for n in gm.graph.find_nodes(op="placeholder")} - {None}
    (returned,) = gm.graph.find_nodes(op="output")[0].args
    flat = returned if isinstance(returned, (tuple, list)) else (returned,)
    return [i for i, node in enumerate(flat)
            if not (isinstance(node, torch.fx.Node) and storage(node) in inputs)]


def copying_outputs(compiled, positions: list):
    """`compiled`, returning copies of its outputs at `positions`. The next replay of a CUDA graph writes its
    outputs where the last one did; a caller that keeps results across calls (a list of predictions, a
    result compared with the next) must not see them change, as it would under mode="reduce-overhead"."""
    def run(*args):
        outputs = compiled(*args)
        copies, made = list(outputs), {}
        for i in positions:
            if isinstance(copies[i], torch.Tensor):  # one copy of a tensor returned twice, as eager returns one
                copies[i] = made.setdefault(id(copies[i]), copies[i].clone())
        return type(outputs)(copies) if isinstance(outputs, tuple) else copies
    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


class Planning(NamedTuple):
    """A graph's plans under way (start_plans): its convolutions, their device and autotune level, and the
    compiling of their candidates in worker processes (None where the compile threads do it)."""

    convs: list
    device: torch.device
    autotune: str
    compiling: Optional[precompile.Compiling]


def prepare_plans(gm: torch.fx.GraphModule, autotune: str, processes: Optional[int] = 0) -> int:
    """Choose each convolution's kernel now, while the graph compiles, on random tensors of its shapes and
    strides, so that a call finds its plan made (tuned, compiled) and only launches. Only on a GPU (the
    interpreter's kernels are slow and its choice is fixed) and for static shapes; a convolution that meets
    other strides or sizes at run time gets its plan then. `processes`: who compiles the candidates (see
    _collect_and_compile). Returns how many plans were made."""
    return finish_plans(start_plans(gm, autotune, processes))


def start_plans(gm: torch.fx.GraphModule, autotune: str, processes: Optional[int]) -> Optional[Planning]:
    """prepare_plans' first half: start compiling what every convolution's tuning will compile, in worker
    processes where `processes` says so (see _collect_and_compile), and return at once. None where `gm` has no
    convolution to plan."""
    convs = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != TRITON_CONV:
            continue
        vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
        tensors = [v for v in vals if isinstance(v, torch.Tensor)]
        if all(v.is_cuda and has_static_layout(v) for v in tensors):
            convs.append((node.name, vals))
    if not convs:
        return None
    device = next(v for v in convs[0][1] if isinstance(v, torch.Tensor)).device
    with torch.cuda.device(device):
        return Planning(convs, device, autotune, _collect_and_compile(convs, autotune, processes))


def finish_plans(planning: Optional[Planning]) -> int:
    """prepare_plans' second half: wait for the workers, then make (tune) each plan. Returns how many were made."""
    if planning is None:
        return 0
    with torch.cuda.device(planning.device):
        return _tune(planning.convs, planning.autotune, planning.compiling)


def _tune(convs: list, autotune: str, compiling: Optional[precompile.Compiling]) -> int:
    started = time.monotonic()
    if compiling is not None:
        compiling.wait()
    waited = time.monotonic() - started
    made = sum(_plan_for(name, vals, autotune) for name, vals in convs)
    # Where a first call's time goes: the wait for the workers' compiling, then the tuning (with any compiling
    # left to this process).
    log.info("tritonconv: %d plan(s) made for %d convolution(s): %.1f s waiting for the compile workers, %.1f s "
             "tuning (autotune level %r)", made, len(convs), waited, time.monotonic() - started - waited, autotune)
    return made


def make_plans(convs: list, autotune: str, processes: Optional[int] = None) -> int:
    """Make the plans of `convs` ((name, arguments) of each convolution, fake tensors for tensors) on the
    current device, compiling first in worker processes (see _collect_and_compile). Returns how many were made."""
    return _tune(convs, autotune, _collect_and_compile(convs, autotune, processes))


def _collect_and_compile(convs: list, autotune: str, processes: Optional[int]) -> Optional[precompile.Compiling]:
    """Collect what the tuning of `convs` will compile (a pass that launches each one's candidates with the
    compiling recorded instead of done) and start compiling it in worker processes: Inductor's compile pool
    where `processes` is None, our own where it is a count. None where the compile threads are to do it
    (`processes` 0, no pool here, nothing to compile)."""
    if processes == 0 or (processes is None and precompile.inductor_pool() is None):
        return None
    target = triton.runtime.driver.active.get_current_target()
    with precompile.recording() as jobs, tuning.collecting_candidates():
        for name, vals in convs:
            _plan_for(name, vals, autotune)
    return precompile.start_compiling(jobs, target, processes)


def _plan_for(name: str, vals: list, autotune: str) -> bool:
    """Make the plan of one convolution (`vals`: its arguments, fake tensors for tensors) on random tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad(), tuning.autotune_level_set(autotune):
        try:
            args = [torch.empty_strided(tuple(v.shape), v.stride(), dtype=v.dtype, device=v.device).uniform_()
                    if isinstance(v, torch.Tensor) else v for v in vals]
            launch_conv2d(*args)
        except tuning.CandidatesCollected:
            return False
        except RuntimeError as exc:  # e.g. out of memory now: the first call makes the plan instead
            log.debug("tritonconv: no plan made ahead for %s: %s", name, exc)
            return False
    return True


# Lists that explain() opens while it runs a model: every compiled graph that runs adds its report to each.
_collectors: list = []


def _wrap_compiled(compiled, report: Report, autotune: str):
    """`compiled` run at the graph's autotune level (a plan is tuned when its call first meets a shape), telling
    explain() which report belongs to it whenever it runs (also on Dynamo cache hits)."""
    level = tuning.autotune_level

    def run(*args):
        for collected in _collectors:
            if not any(r is report for r in collected):
                collected.append(report)
        token = level.set(autotune)
        try:
            return compiled(*args)
        finally:
            level.reset(token)
    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


def direct_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose `tritonconv::conv2d` calls go straight to the launch wrapper.

    The op keeps graphs traceable; once a graph is compiled nothing traces it
    again, and AOTAutograd runs it with autograd off, so the dispatcher's trip
    through the op buys nothing.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node metadata is shared, not copied
    for node in graph.nodes:
        if node.op == "call_function" and node.target == TRITON_CONV:
            node.target = launch_conv2d
    return torch.fx.GraphModule(gm, graph)


_explain_backends: dict = {}


def _explain_backend(options: Optional[Mapping[str, Any]]):
    """One backend callable per set of options, so that repeated explain() calls hit Dynamo's cache instead of
    recompiling (each new callable would count against Dynamo's recompile limit)."""
    key = repr(sorted((options or {}).items()))
    if key not in _explain_backends:
        def backend(gm, example_inputs):
            return tritonconv_backend(gm, example_inputs, options=options)
        _explain_backends[key] = backend
    return _explain_backends[key]


def explain(model: Callable, *inputs, options: Optional[Mapping[str, Any]] = None, **kwargs) -> Report:
    """Compile `model` with the backend, run it once on `inputs` (under no_grad), return the report.

    The report lists every convolution of every graph that ran: replaced by
    Triton or kept on ATen, with the reason. The run leaves no trace on the
    model: buffers (batch norm's running statistics) and the RNG state are
    restored, and repeated calls reuse what Dynamo compiled the first time.
    """
    split_options(options)  # a bad option is an error now, not at the first graph
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, torch.nn.Module) else []
    collected: list = []
    compiled = torch.compile(model, backend=_explain_backend(options))
    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    _collectors.append(collected)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            compiled(*inputs, **kwargs)
    finally:
        del _collectors[next(i for i, c in enumerate(_collectors) if c is collected)]
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    combined = Report()
    for report in collected:
        combined.extend(report)
    return combined
