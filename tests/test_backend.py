"""The `tritonconv` backend through torch.compile, by its registered name."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conv_backend
from conv_backend import Report, explain, last_report

from _util import format_flags, rel_err

REPO = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.interpreter
IEEE = {"input_precision": "ieee"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """conv + bn + relu, a grouped conv, a depthwise conv (multiplier 2), and a float64 conv that must fall back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.head = nn.Conv2d(16, 4, 1).double()

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.relu(self.grouped(y))
        y = self.depthwise(y)
        return self.head(y.double()).float()


TRITON_CONVS, ATEN_CONVS = 3, 1  # per forward graph of Net
FLOAT64_REASON = "dtype torch.float64 (supported: float32, float16, bfloat16)"


def forward_decisions(report: Report) -> list:
    return [d for d in report.decisions if "convolution_backward" not in d.node]


# ---------------------------------------------------------------- registration

def test_backend_name_is_registered():
    names = importlib.metadata.entry_points(group="torch_dynamo_backends").names
    assert "tritonconv" in names
    (entry,) = [e for e in importlib.metadata.entry_points(group="torch_dynamo_backends") if e.name == "tritonconv"]
    assert entry.load() is conv_backend.tritonconv_backend
    assert "tritonconv" in torch._dynamo.list_backends(exclude_tags=())
    assert torch._dynamo.lookup_backend("tritonconv") is conv_backend.tritonconv_backend


@needs_interpreter
def test_backend_by_name_in_fresh_process_without_import():
    code = textwrap.dedent("""
        import importlib.metadata, json, sys
        import torch
        assert "conv_backend" not in sys.modules
        eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
        assert "tritonconv" in eps.names, eps.names
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU())
        x = torch.randn(2, 4, 6, 6)
        with torch.no_grad():
            out = torch.compile(model, backend="tritonconv", options={"input_precision": "ieee"})(x)
            ref = model(x)
        report = sys.modules["conv_backend"].last_report()
        print(json.dumps({"err": (out - ref).abs().max().item(), "replaced": len(report.replaced),
                          "kept": len(report.kept)}))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-4
    assert result["replaced"] == 1 and result["kept"] == 0


_LOGGING_CHILD = textwrap.dedent("""
    import logging, sys
    import torch
    {setup}
    model = torch.nn.Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        torch.compile(model, backend="tritonconv")(torch.randn(1, 4, 6, 6))
""")


@needs_interpreter
@pytest.mark.parametrize("how", ["TORCH_LOGS", "set_logs"])
def test_decisions_reach_torch_logging(how):
    """README: TORCH_LOGS="+conv_backend", or torch._logging.set_logs(modules={"tritonconv": ...}) after import."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("TORCH_LOGS", None)
    if how == "TORCH_LOGS":
        env["TORCH_LOGS"] = "+conv_backend"
        setup = ""
    else:
        setup = "import conv_backend; torch._logging.set_logs(modules={'tritonconv': logging.DEBUG})"
    proc = subprocess.run([sys.executable, "-c", _LOGGING_CHILD.format(setup=setup)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-> tritonconv::conv2d" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- outputs and gradients match eager

@needs_interpreter
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "eval_no_grad", "eval_grad_enabled"])
def test_inference_matches_eager(mode, kernel_launches):
    model = Net()
    if mode.startswith("eval"):
        model.eval()
    x = torch.randn(2, 4, 9, 9)
    compiled = torch.compile(model, backend="tritonconv", options=IEEE)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "eval_no_grad": torch.no_grad,
           "eval_grad_enabled": torch.enable_grad}[mode]
    with ctx():
        ref = model(x)
        out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    report = last_report()
    forward = forward_decisions(report)
    assert sum(d.replaced for d in forward) == TRITON_CONVS
    assert [d.reason for d in forward if not d.replaced] == [FLOAT64_REASON]
    assert set(kernel_launches.names) == {"igemm_tma_kernel", "igemm_pointer_kernel", "depthwise_kernel"}


@needs_interpreter
def test_compiled_graphs_call_the_launch_wrapper_directly(monkeypatch):
    """The pass's graph holds the custom op; the graph that runs calls launch_conv2d without the dispatcher."""
    from conv_backend import backend, dispatch
    from conv_backend.graph_pass import TRITON_CONV

    pairs = []
    real = backend.direct_calls
    monkeypatch.setattr(backend, "direct_calls", lambda gm: pairs.append((gm, real(gm))) or pairs[-1][1])
    model = Net().eval()
    x = torch.randn(2, 4, 9, 9)
    compiled = torch.compile(model, backend="tritonconv", options={**IEEE, "inner": "aten"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    (traced, executable), = pairs

    def targets(gm):
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets(traced).count(TRITON_CONV) == TRITON_CONVS and TRITON_CONV not in targets(executable)
    assert targets(executable).count(dispatch.launch_conv2d) == TRITON_CONVS


@needs_interpreter
def test_training_step_gradients_match_eager(kernel_launches):
    model = Net()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="tritonconv", options=IEEE)
    x = torch.randn(2, 4, 9, 9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(2, 4, 5, 5)

    out = compiled(x1)
    ref = twin(x2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    F.mse_loss(out, target).backward()
    F.mse_loss(ref, target).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    for name, p in params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, twin_params[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # BatchNorm's running statistics were updated the same way.
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, twin.bn.running_var)

    report = last_report()
    forward = [d for d in report.decisions if d.graph.startswith("forward")]
    backward = [d for d in report.decisions if d.graph.startswith("backward")]
    assert sum(d.replaced for d in forward) == TRITON_CONVS and len(forward) == TRITON_CONVS + ATEN_CONVS
    assert len(backward) == 4 and not any(d.replaced for d in backward)
    assert {d.reason for d in backward} == {"convolution_backward stays on ATen"}
    assert len(kernel_launches) == TRITON_CONVS


@needs_interpreter
def test_optimizer_steps_track_eager():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="tritonconv", options=IEEE)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8)
        for m, o in ((compiled, opt), (twin, twin_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@needs_interpreter
def test_recompile_on_new_batch_size_stays_correct(kernel_launches):
    model = Net().eval()
    compiled = torch.compile(model, backend="tritonconv", options=IEEE)
    reports = []
    with torch.no_grad():
        for batch in (2, 3, 1):
            x = torch.randn(batch, 4, 9, 9)
            out = compiled(x)
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
            assert out.shape[0] == batch
            reports.append(last_report())
    assert reports[0] is not reports[1], "a new batch size should have recompiled"
    assert sum(d.replaced for d in forward_decisions(reports[1])) == TRITON_CONVS
    assert len(kernel_launches) == 3 * TRITON_CONVS


@needs_interpreter
def test_dynamic_shapes(kernel_launches):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=8))
    compiled = torch.compile(model, backend="tritonconv", dynamic=True, options=IEEE)
    with torch.no_grad():
        first = None
        for shape in [(2, 4, 9, 10), (3, 4, 7, 12), (5, 4, 11, 8)]:  # size 1 or H == W would specialize
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
            first = first or last_report()
    assert last_report() is first, "dynamic=True should compile once"
    assert len(first.replaced) == 2
    assert any(not isinstance(s, int) for s in first.replaced[0].input_shape)
    assert len(kernel_launches) == 6


@needs_interpreter
def test_channels_last_input_gives_channels_last_output(kernel_launches):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 7, 9).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=IEEE)(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(kernel_launches) == 3
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert format_flags(out) == format_flags(ref)


@needs_interpreter
@pytest.mark.parametrize("channels_last_option", [True, False])
def test_output_strides_match_eager(channels_last_option):
    """Contiguous input with channels_last weights, and contiguous everything: graph outputs keep eager's format."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 4, 7, 9)
    for m in (model, copy.deepcopy(model).to(memory_format=torch.channels_last)):
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(m, backend="tritonconv",
                                options={"channels_last": channels_last_option, **IEEE})(x)
            ref = m(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert format_flags(out) == format_flags(ref), (out.stride(), ref.stride())


@needs_interpreter
def test_autocast_bfloat16(kernel_launches):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 4, 8, 9)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(model, backend="tritonconv")(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref64) <= 2e-2
    assert [d.dtype for d in last_report().replaced] == ["bfloat16", "bfloat16"]
    assert len(kernel_launches) == 2


@needs_interpreter
def test_same_and_reflect_padding(kernel_launches):
    model = nn.Sequential(nn.Conv2d(4, 8, 4, padding="same", dilation=2),
                          nn.Conv2d(8, 8, 3, padding=2, padding_mode="reflect"),
                          nn.Conv2d(8, 8, (1, 3), padding="same"))
    x = torch.randn(2, 4, 8, 9)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=IEEE)(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(last_report().replaced) == 3 and len(kernel_launches) == 3


# ---------------------------------------------------------------- reports

@needs_interpreter
def test_explain_reports_replaced_and_kept():
    model = Net().eval()
    x = torch.randn(2, 4, 9, 9)
    report = explain(model, x, options=IEEE)
    assert isinstance(report, Report)
    assert len(report.decisions) == TRITON_CONVS + ATEN_CONVS
    assert len(report.replaced) == TRITON_CONVS and len(report.kept) == ATEN_CONVS
    (kept,) = report.kept
    assert kept.reason == FLOAT64_REASON and kept.dtype == "float64"
    assert sorted(d.groups for d in report.replaced) == [1, 2, 8]
    text = str(report)
    assert f"{TRITON_CONVS} on Triton, {ATEN_CONVS} on ATen" in text
    assert FLOAT64_REASON in text
    # The report names the kernel and config chosen for each replaced convolution.
    for d in report.replaced:
        assert any(k in d.describe() for k in ("igemm_tma[", "igemm_pointer[", "depthwise[")), d.describe()
    assert isinstance(report.to_dict()["decisions"][0], dict)


@needs_interpreter
def test_explain_after_compiling_the_same_model():
    """explain() must report even when Dynamo already holds a compiled version of the model."""
    model = Net().eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        torch.compile(model, backend="tritonconv", options=IEEE)(x)
    report = explain(model, x, options={"enabled": False})
    assert len(report.decisions) == TRITON_CONVS + ATEN_CONVS and not report.replaced


class GraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(4, 8, 3)
        self.second = nn.Conv2d(8, 8, 3).double()

    def forward(self, x):
        y = self.first(x)
        torch._dynamo.graph_break()
        return self.second(y.double())


@needs_interpreter
def test_explain_combines_graphs_around_a_graph_break():
    model = GraphBreak()
    x = torch.randn(2, 4, 8, 9)
    report = explain(model, x)
    assert len(report.decisions) == 2 and len({d.graph for d in report.decisions}) == 2
    assert len(report.replaced) == 1 and report.kept[0].reason == FLOAT64_REASON
    # last_report() is the last graph's alone.
    assert [d.reason for d in last_report().decisions] == [FLOAT64_REASON]


@needs_interpreter
def test_last_report_is_the_latest_compilation():
    m1 = nn.Conv2d(4, 8, 3)
    m2 = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.compile(m1, backend="tritonconv")(x)
        r1 = last_report()
        torch.compile(m2, backend="tritonconv")(x)
        r2 = last_report()
    assert len(r1.decisions) == 1 and len(r2.decisions) == 2
    assert r1 is not r2 and last_report() is r2


# ---------------------------------------------------------------- options

def _small_net():
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))


@needs_interpreter
def test_enabled_false_replaces_nothing(kernel_launches):
    model = _small_net()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options={"enabled": False})(x)
        torch.testing.assert_close(out, model(x))
    report = last_report()
    assert len(report.decisions) == 2 and not report.replaced
    assert {d.reason for d in report.kept} == {"replacement disabled (options={'enabled': False})"}
    assert not kernel_launches


@needs_interpreter
@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
def test_input_precision_option_reaches_the_kernel(precision, kernel_launches):
    model = _small_net()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options={"input_precision": precision})(x)
    torch.testing.assert_close(out, model(x), rtol=2e-3, atol=2e-3)
    assert len(kernel_launches) == 2
    assert {kw["INPUT_PRECISION"] for _, kw in kernel_launches} == {precision}


@needs_interpreter
def test_algorithm_option_forces_the_seed_kernel(kernel_launches):
    model = _small_net()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options={"algorithm": "seed", **IEEE})(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    report = last_report()
    assert [d.replaced for d in report.decisions] == [True, False]
    assert report.kept[0].reason == "algorithm='seed' handles groups == 1 only"
    assert report.replaced[0].algorithm == "seed"
    assert kernel_launches.names == ["seed_conv2d_kernel"]


@needs_interpreter
@pytest.mark.parametrize("algorithm,kernel", [("gemm_pointer", "igemm_pointer_kernel"),
                                              ("gemm_tma", "igemm_tma_kernel")])
def test_algorithm_option_forces_a_gemm_path(algorithm, kernel, kernel_launches):
    model = _small_net()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options={"algorithm": algorithm, **IEEE})(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    # gemm_tma cannot take 4 channels per group in boxes of 16: that conv stays on ATen.
    expected_replaced = 2 if algorithm == "gemm_pointer" else 1
    assert len(last_report().replaced) == expected_replaced
    assert kernel_launches.names == [kernel] * expected_replaced


@needs_interpreter
def test_verbose_option_logs_at_info(caplog):
    x = torch.randn(1, 8, 6, 6)
    with caplog.at_level(logging.INFO, logger="conv_backend"):
        with torch.no_grad():
            torch.compile(_small_net(), backend="tritonconv")(x)
        quiet = [r for r in caplog.records if r.name == "conv_backend" and r.levelno >= logging.INFO]
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(_small_net(), backend="tritonconv", options={"verbose": True})(x)
    loud = [r for r in caplog.records if r.name == "conv_backend" and r.levelno == logging.INFO]
    assert not quiet
    assert len(loud) == 2
    assert all("tritonconv::conv2d" in r.getMessage() for r in loud)


def _compile_and_run(options=None, **kwargs):
    model = nn.Conv2d(2, 2, 1)
    return torch.compile(model, backend="tritonconv", options=options, **kwargs)(torch.randn(1, 2, 3, 3))


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(Exception) as info:
        _compile_and_run({"precision": "ieee"})
    message = str(info.value)
    assert "precision" in message and "unknown option" in message
    for name in ("enabled", "input_precision", "algorithm", "channels_last", "verbose"):
        assert name in message


@pytest.mark.parametrize("options,fragment", [
    ({"input_precision": "fp8"}, "input_precision"),
    ({"algorithm": "fft"}, "algorithm"),
    ({"enabled": "yes"}, "enabled"),
    ({"verbose": 1}, "verbose"),
    ({"channels_last": None}, "channels_last"),
])
def test_bad_option_values_raise(options, fragment):
    with pytest.raises(Exception, match=fragment):
        _compile_and_run(options)


def test_mode_reaches_inductor():
    model = nn.Conv2d(2, 2, 1)
    x = torch.randn(1, 2, 3, 3)
    out = torch.compile(model, backend="tritonconv", mode="max-autotune-no-cudagraphs")(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- regressions

@needs_interpreter
def test_strided_bias_through_compile(kernel_launches):
    """A strided slice of a parameter as bias was once read as contiguous by every kernel."""
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
            self.b = nn.Parameter(torch.randn(16))

        def forward(self, x):
            return F.conv2d(x, self.w, self.b[::2], padding=1)

    model = Sliced()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="tritonconv", options=IEEE)(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(kernel_launches) == 1
