"""conv_backend.runtime (precision policy, devices), conv_backend.options and conv_backend.layout."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from conv_backend import ALGORITHMS, PRECISIONS, BackendOptions, runtime
from conv_backend.kernels.common import needs_int64
from conv_backend.layout import conv_output_hw

cudnn = torch.backends.cudnn
HAS_PRECISION_API = hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(cudnn, "conv")
needs_precision_api = pytest.mark.skipif(not HAS_PRECISION_API, reason="torch without per-op fp32_precision")
# The settings that decide cuDNN's fp32 convolution math, parents first.
PRECISION_KNOBS = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn")]


def _snapshot():
    return [torch._C._get_fp32_precision_getter(*knob) for knob in PRECISION_KNOBS]


@pytest.fixture
def precision_flags():
    """Restore every TF32 knob after the test (parents first: setting one propagates to its children)."""
    if not HAS_PRECISION_API:
        legacy = torch._C._get_cudnn_allow_tf32()
        yield
        torch._C._set_cudnn_allow_tf32(legacy)
        return
    saved = _snapshot()
    yield
    for knob, value in zip(PRECISION_KNOBS, saved):
        torch._C._set_fp32_precision_setter(*knob, value)
    assert _snapshot() == saved, "could not restore the fp32 precision flags"


def cudnn_conv_uses_tf32() -> bool:
    """ATen's own answer for cuDNN convolutions: TF32 exactly when the resolved conv precision is 'tf32'."""
    return torch._C._get_fp32_precision_getter("cuda", "conv") == "tf32"


# ---------------------------------------------------------------- cudnn_conv_allows_tf32

@needs_precision_api
def test_default_allows_tf32_like_cudnn(precision_flags):
    assert runtime.cudnn_conv_allows_tf32() is cudnn_conv_uses_tf32()


@pytest.mark.parametrize("allow", [False, True])
def test_legacy_allow_tf32_flag(allow, precision_flags):
    cudnn.allow_tf32 = allow
    assert runtime.cudnn_conv_allows_tf32() is allow


@pytest.mark.parametrize("allow", [False, True])
def test_legacy_flags_context_manager(allow, precision_flags):
    with cudnn.flags(enabled=cudnn.enabled, allow_tf32=allow):
        assert runtime.cudnn_conv_allows_tf32() is allow


@needs_precision_api
@pytest.mark.parametrize("value", ["ieee", "tf32"])
def test_conv_fp32_precision(value, precision_flags):
    cudnn.conv.fp32_precision = value
    assert runtime.cudnn_conv_allows_tf32() is (value == "tf32")


@needs_precision_api
@pytest.mark.parametrize("parent,conv", [("tf32", "ieee"), ("ieee", "tf32")])
def test_conv_setting_overrides_cudnn_setting(parent, conv, precision_flags):
    cudnn.fp32_precision = parent
    cudnn.conv.fp32_precision = conv
    assert runtime.cudnn_conv_allows_tf32() is (conv == "tf32")
    assert runtime.cudnn_conv_allows_tf32() is cudnn_conv_uses_tf32()


# Setting a parent precision only reaches children the user has not set, so these run in fresh processes.
FRESH_PROCESS_SCENARIOS = {
    "defaults": ("pass", True),
    "global_ieee": ("torch.backends.fp32_precision = 'ieee'", False),
    "global_tf32": ("torch.backends.fp32_precision = 'tf32'", True),
    "cudnn_ieee": ("torch.backends.cudnn.fp32_precision = 'ieee'", False),
    "conv_ieee": ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", False),
    "legacy_false": ("torch.backends.cudnn.allow_tf32 = False", False),
}


@needs_precision_api
def test_precision_settings_in_fresh_processes():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    # runtime.py loaded on its own: the subprocess need not import Triton.
    template = (
        "import importlib.util, json, torch\n{stmt}\n"
        "spec = importlib.util.spec_from_file_location('runtime', 'conv_backend/runtime.py')\n"
        "runtime = importlib.util.module_from_spec(spec); spec.loader.exec_module(runtime)\n"
        "print(json.dumps([runtime.cudnn_conv_allows_tf32(), "
        "torch._C._get_fp32_precision_getter('cuda', 'conv') == 'tf32']))\n")
    repo = Path(__file__).resolve().parents[1]
    procs = {name: subprocess.Popen([sys.executable, "-c", template.format(stmt=stmt)], cwd=repo,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for name, (stmt, _) in FRESH_PROCESS_SCENARIOS.items()}
    failures = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{name}: exit {proc.returncode}: {err[-500:]}")
            continue
        ours, aten = json.loads(out.strip().splitlines()[-1])
        expected = FRESH_PROCESS_SCENARIOS[name][1]
        if not (ours is aten is expected):
            failures.append(f"{name}: cudnn_conv_allows_tf32()={ours}, ATen conv precision tf32={aten}, "
                            f"expected {expected}")
    assert not failures, "\n".join(failures)


@needs_precision_api
def test_conv_falls_back_to_cudnn_setting(precision_flags):
    cudnn.fp32_precision = "ieee"
    cudnn.conv.fp32_precision = "none"
    assert runtime.cudnn_conv_allows_tf32() is False
    assert runtime.cudnn_conv_allows_tf32() is cudnn_conv_uses_tf32()


@needs_precision_api
def test_conv_precision_none_does_not_raise(precision_flags):
    """Regression: the legacy getter raised here (conv and rnn precisions differ)."""
    cudnn.conv.fp32_precision = "none"  # a documented value; rnn keeps its default
    assert runtime.cudnn_conv_allows_tf32() is cudnn_conv_uses_tf32()


# ---------------------------------------------------------------- resolve_input_precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", PRECISIONS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_half_precision_resolves_to_ieee(dtype, policy, device):
    assert runtime.resolve_input_precision(policy, dtype, torch.device(device)) == "ieee"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("allowed", [False, True])
def test_forced_fp32_policies(device, allowed, monkeypatch):
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: allowed)
    assert runtime.resolve_input_precision("tf32", torch.float32, torch.device(device)) == "tf32"
    assert runtime.resolve_input_precision("ieee", torch.float32, torch.device(device)) == "ieee"
    assert runtime.resolve_input_precision("tf32x3", torch.float32, torch.device(device)) == "tf32x3"


@pytest.mark.parametrize("allowed", [False, True])
def test_auto_policy_follows_cudnn_on_cuda(allowed, monkeypatch):
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: allowed)
    expected = "tf32" if allowed else "ieee"
    assert runtime.resolve_input_precision("auto", torch.float32, torch.device("cuda")) == expected
    assert runtime.resolve_input_precision("auto", torch.float32, torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("allowed", [False, True])
def test_auto_policy_is_exact_on_cpu(allowed, monkeypatch):
    """Eager CPU convolutions are exact fp32, whatever cuDNN would do."""
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: allowed)
    assert runtime.resolve_input_precision("auto", torch.float32, torch.device("cpu")) == "ieee"


# ---------------------------------------------------------------- choose_fp32_precision

# (x shape, weight shape, stride, padding, groups) at batch 32
MOBILENET_1X1 = ((32, 96, 56, 56), (24, 96, 1, 1), (1, 1), (0, 0), 1)       # memory-bound
RESNET_3X3 = ((32, 256, 14, 14), (256, 256, 3, 3), (1, 1), (1, 1), 1)        # compute-bound
DEPTHWISE = ((32, 144, 56, 56), (144, 1, 3, 3), (1, 1), (1, 1), 144)


def _choose(policy, layer, dtype=torch.float32, device="cuda"):
    x_shape, w_shape, stride, padding, groups = layer
    return runtime.choose_fp32_precision(policy, x_shape, w_shape, stride, padding, (1, 1), groups, dtype,
                                         torch.device(device))


def test_tf32_threshold_is_the_tf32x3_ridge_point():
    assert runtime.TF32_MIN_FLOP_PER_BYTE == pytest.approx(495e12 / 3 / 3.35e12)


def test_flop_per_byte():
    # 1x1 96->24 on 32x56x56: 2*96*24 FLOPs per pixel over 4*(96+24) bytes per pixel (the weight is negligible)
    assert runtime.conv_flop_per_byte(*MOBILENET_1X1[:4], (1, 1)) == pytest.approx(2 * 96 * 24 / (4 * 120), rel=1e-3)
    x_shape, w_shape, stride, padding, _ = RESNET_3X3
    flops = 2 * 32 * 14 * 14 * 256 * 256 * 9
    elems = 2 * 32 * 256 * 14 * 14 + 256 * 256 * 9
    assert runtime.conv_flop_per_byte(x_shape, w_shape, stride, padding, (1, 1)) == pytest.approx(flops / (4 * elems))
    assert runtime.conv_flop_per_byte(x_shape, w_shape, stride, padding, (1, 1), itemsize=2) == pytest.approx(
        flops / (2 * elems))


def test_auto_uses_tf32_only_where_it_pays(monkeypatch):
    """Rounded TF32 (cuDNN's, not Triton's truncating TF32) where it pays, tf32x3 elsewhere."""
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: True)
    assert _choose("auto", MOBILENET_1X1) == "tf32x3"
    assert _choose("auto", DEPTHWISE) == "tf32x3"
    assert _choose("auto", RESNET_3X3) == "tf32_round"
    # ResNet's last 3x3 layer (512 channels, 7x7): compute-bound at batch 32, its weights' traffic sets the time
    # at batch 1
    assert _choose("auto", ((32, 512, 7, 7), (512, 512, 3, 3), (1, 1), (1, 1), 1)) == "tf32_round"
    assert _choose("auto", ((1, 512, 7, 7), (512, 512, 3, 3), (1, 1), (1, 1), 1)) == "tf32x3"


@pytest.mark.parametrize("layer", [MOBILENET_1X1, RESNET_3X3], ids=["1x1", "3x3"])
def test_auto_is_exact_where_eager_is(layer, monkeypatch):
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: False)
    assert _choose("auto", layer) == "ieee"
    monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: True)
    assert _choose("auto", layer, device="cpu") == "ieee"


@pytest.mark.parametrize("policy", ["tf32", "tf32_round", "tf32x3", "ieee"])
@pytest.mark.parametrize("layer", [MOBILENET_1X1, RESNET_3X3], ids=["1x1", "3x3"])
def test_forced_policies_apply_to_every_layer(policy, layer, monkeypatch):
    for allowed in (False, True):
        monkeypatch.setattr(runtime, "cudnn_conv_allows_tf32", lambda: allowed)
        assert _choose(policy, layer) == policy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", PRECISIONS)
def test_half_precision_layers_choose_ieee(dtype, policy):
    assert _choose(policy, RESNET_3X3, dtype) == "ieee"


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("TRUE", True), ("on", True), ("yes", True),
                                            ("0", False), ("", False), ("false", False), (None, False)])
def test_interpreter_requested_reads_environment(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert runtime.interpreter_requested() is expected


def test_interpreter_enabled_is_what_triton_made_of_the_kernels(monkeypatch):
    """Triton picked interpreter or GPU compiler when it defined the kernels; changing the variable later changes
    neither that nor our answer."""
    from triton.runtime.interpreter import InterpretedFunction
    from conv_backend.kernels import depthwise, implicit_gemm

    interpreted = isinstance(implicit_gemm.seed_conv2d_kernel, InterpretedFunction)
    assert isinstance(depthwise.depthwise_kernel, InterpretedFunction) is interpreted
    for value in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert runtime.interpreter_enabled() is interpreted
        assert runtime.has_tma(torch.device("cpu")) is interpreted


@pytest.mark.parametrize("requested", [True, False])
def test_device_supported(requested, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if requested else "0")
    interpreted = runtime.interpreter_enabled()
    cpu_ok, cpu_why = runtime.device_supported(torch.device("cpu"))
    cuda_ok, cuda_why = runtime.device_supported(torch.device("cuda"))
    assert cpu_ok is (interpreted and requested) and (cpu_why == "") is cpu_ok
    assert cuda_ok is not (interpreted or requested) and (cuda_why == "") is cuda_ok
    meta_ok, meta_why = runtime.device_supported(torch.device("meta"))
    assert not meta_ok and "meta" in meta_why


def flip_interpreter_variable(monkeypatch) -> str:
    """Set TRITON_INTERPRET to the opposite of what the kernels were defined under; the expected reason."""
    if runtime.interpreter_enabled():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "CPU tensor without TRITON_INTERPRET=1"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return LATE_INTERPRETER_REASON


LATE_INTERPRETER_REASON = ("TRITON_INTERPRET=1 was set after the kernels were defined for the GPU (Triton reads it "
                           "when a kernel is defined): set it before importing conv_backend")


def test_flipping_the_variable_after_import_falls_back_to_aten(monkeypatch, kernel_launches):
    from conv_backend import conv2d
    from conv_backend.support import unsupported_reason

    x, w, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    reason = flip_interpreter_variable(monkeypatch)
    assert unsupported_reason(x, w, b, (1, 1), (1, 1), (1, 1)) == reason
    torch.testing.assert_close(conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1), F.conv2d(x, w, b, padding=1))
    assert not kernel_launches


# Kernels defined for the GPU, then TRITON_INTERPRET=1: the op on CPU tensors must fall back to ATen, not launch
# a GPU kernel with no GPU driver.
LATE_INTERPRETER_SCRIPT = """
import os, torch, torch.nn.functional as F
import conv_backend
from conv_backend import conv2d, runtime
from conv_backend.support import unsupported_reason
assert not runtime.interpreter_enabled()
os.environ["TRITON_INTERPRET"] = "1"
x, w, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
print(unsupported_reason(x, w, b, (1, 1), (1, 1), (1, 1)))
torch.testing.assert_close(conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1), F.conv2d(x, w, b, padding=1))
"""


def test_interpreter_set_after_import_falls_back_in_fresh_process():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", LATE_INTERPRETER_SCRIPT], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == LATE_INTERPRETER_REASON


def test_needs_int64_threshold():
    meta = dict(device="meta")
    assert not needs_int64(torch.empty(2**31, **meta))  # last offset 2**31 - 1 fits
    assert needs_int64(torch.empty(2**31 + 1, **meta))
    assert not needs_int64(torch.empty((2, 64, 4096, 4096), **meta))  # exactly 2**31 elements
    assert needs_int64(torch.empty((1, 1), **meta), torch.empty((3, 64, 4096, 4096), **meta))
    assert needs_int64(torch.empty((2, 2), **meta).as_strided((2, 2), (2**31, 1)))  # few elements, far apart
    assert not needs_int64(torch.empty((8, 32, 512, 512), **meta))


# ---------------------------------------------------------------- options

def test_default_options():
    opts = BackendOptions.from_mapping(None)
    assert opts == BackendOptions.from_mapping({}) == BackendOptions()
    assert opts.enabled is True and opts.input_precision == "auto" and opts.algorithm == "auto"
    assert opts.verbose is False


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_documented_value_is_accepted(precision, algorithm):
    opts = BackendOptions.from_mapping({"input_precision": precision, "algorithm": algorithm, "enabled": False,
                                        "verbose": True, "channels_last": False})
    assert (opts.input_precision, opts.algorithm, opts.enabled, opts.verbose, opts.channels_last) == (
        precision, algorithm, False, True, False)


def test_documented_option_values():
    assert set(PRECISIONS) == {"auto", "tf32", "tf32_round", "tf32x3", "ieee"}
    assert {"auto", "gemm", "gemm_tma", "gemm_pointer", "depthwise", "seed"} <= set(ALGORITHMS)


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ValueError) as info:
        BackendOptions.from_mapping({"precision": "ieee", "enable": False})
    message = str(info.value)
    assert "precision" in message and "enable" in message
    for field in dataclasses.fields(BackendOptions):
        assert field.name in message


@pytest.mark.parametrize("options", [
    {"input_precision": "fp16"}, {"input_precision": None}, {"algorithm": "winograd"}, {"algorithm": ""},
    {"enabled": 1}, {"enabled": "False"}, {"verbose": "yes"}, {"channels_last": 0},
])
def test_bad_values_raise(options):
    (name,) = options
    with pytest.raises(ValueError, match=name):
        BackendOptions.from_mapping(options)


def test_options_are_immutable():
    opts = BackendOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.enabled = False


# ---------------------------------------------------------------- layout

LAYOUT_SHAPES = [  # (x shape, weight shape, groups): ordinary, 1x1 kernel, one channel, 1x1 image, depthwise
    ((2, 8, 6, 7), (4, 8, 3, 3), 1), ((2, 8, 6, 7), (4, 8, 1, 1), 1), ((2, 1, 6, 7), (4, 1, 3, 3), 1),
    ((2, 8, 1, 1), (4, 8, 1, 1), 1), ((1, 8, 6, 7), (16, 1, 3, 3), 8), ((2, 8, 6, 7), (8, 2, 3, 3), 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("x_shape,w_shape,groups", LAYOUT_SHAPES)
def test_output_memory_format_matches_eager_cpu(x_shape, w_shape, groups, dilation, dtype):
    """layout.empty_output('eager') gives the strides eager's CPU convolution gives, for every layout pair."""
    from conv_backend.layout import empty_output
    from _util import format_flags, make_input, make_weight
    for x_layout in ("contiguous", "channels_last", "sliced", "transposed_hw"):
        for w_layout in ("contiguous", "channels_last", "transposed"):
            x, w = make_input(x_shape, x_layout, dtype), make_weight(w_shape, w_layout, dtype)
            pad = dilation * (w_shape[2] // 2)
            eager = F.conv2d(x, w, None, 1, pad, dilation, groups)
            ours = empty_output(x, w, (1, 1), (pad, pad), (dilation, dilation))
            assert ours.shape == eager.shape
            assert format_flags(ours) == format_flags(eager), (x_layout, w_layout, ours.stride(), eager.stride())

def test_conv_output_hw_matches_aten():
    rng = random.Random(0)
    for _ in range(50):
        h, w = rng.randint(1, 20), rng.randint(1, 20)
        k = (rng.randint(1, 5), rng.randint(1, 5))
        s, p, d = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(0, 3), rng.randint(0, 3)), \
            (rng.randint(1, 3), rng.randint(1, 3))
        expected = conv_output_hw(h, w, *k, s, p, d)
        if min(expected) < 1:
            continue
        out = F.conv2d(torch.empty(1, 1, h, w, device="meta"), torch.empty(1, 1, *k, device="meta"), None, s, p, d)
        assert tuple(out.shape[2:]) == expected
