"""The backend composed with Inductor on a GPU: fused epilogues, CUDA graphs (the default for inference graphs, and
mode="reduce-overhead") replayed on new inputs, weights changed after compiling, and a training step, each
against eager."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conv_backend

from _util import rel_err

pytestmark = pytest.mark.cuda


class Block(nn.Module):
    """ResNet's basic block with a strided 1x1 shortcut, then a SiLU head: every epilogue step occurs."""

    def __init__(self, cin=32, cout=64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.down_bn = nn.BatchNorm2d(cout)
        self.head = nn.Conv2d(cout, cout, 1)
        for bn in (self.bn1, self.bn2, self.down_bn):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + self.down_bn(self.down(x)))
        return F.silu(self.head(y))


def _tolerance(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 3e-3


def _reference(model, x):
    """The model in float64 on x, leaving the model as it was."""
    import copy
    return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_through_inductor(dtype):
    model = Block().cuda().eval()
    x = torch.randn(8, 32, 28, 28, device="cuda")
    with torch.no_grad():
        ref = _reference(model, x)
        m = model.to(dtype).to(memory_format=torch.channels_last)
        out = torch.compile(m, backend="tritonconv")(x.to(dtype).to(memory_format=torch.channels_last))
    assert rel_err(out, ref) < _tolerance(dtype)
    epilogues = sorted(d.epilogue for d in conv_backend.last_report().decisions)
    assert epilogues == ["bn", "bn+add+relu", "bn+relu", "silu"]


def test_reduce_overhead_replays_on_new_inputs():
    model = Block().cuda().eval().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="tritonconv", mode="reduce-overhead")
    with torch.no_grad():
        for step in range(5):  # CUDA graphs record on a later call; every call must match eager
            x = torch.randn(4, 32, 28, 28, device="cuda").to(memory_format=torch.channels_last)
            out = compiled(x).clone()
            assert rel_err(out, _reference(model, x)) < 3e-3, f"step {step}"


def test_default_replays_inference_in_cuda_graphs_and_keeps_earlier_results(kernel_launches):
    # ResNet's stem (conv, batch norm, ReLU, max pool) before the block: the whole graph must be captured
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1), Block()).cuda().eval().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="tritonconv")
    inputs = [torch.randn(4, 32, 56, 56, device="cuda").to(memory_format=torch.channels_last) for _ in range(6)]
    with torch.no_grad():
        outs = [compiled(x) for x in inputs[:3]]  # warm-up, recording, first replay
        assert kernel_launches.names, "the warm-up runs our kernels"
        kernel_launches.clear()
        outs += [compiled(x) for x in inputs[3:]]  # held, not cloned: a later replay must not overwrite them
        refs = [_reference(model, x) for x in inputs]
    assert kernel_launches.names == [], "a replay launches nothing from Python: every convolution is in the graph"
    for step, (out, ref) in enumerate(zip(outs, refs)):
        assert rel_err(out, ref) < 3e-3, f"step {step}"
    assert conv_backend.last_report().cuda_graphs


def test_training_graphs_and_cudagraphs_false_run_kernel_by_kernel():
    model = Block().cuda()
    x = torch.randn(4, 32, 28, 28, device="cuda")
    torch.compile(model.train(), backend="tritonconv")(x).sum().backward()
    assert not conv_backend.last_report().cuda_graphs
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model.eval(), backend="tritonconv", options={"cudagraphs": False})(x)
    assert not conv_backend.last_report().cuda_graphs
    assert rel_err(out, _reference(model, x)) < 3e-3


def test_changed_weights_are_used_also_under_cuda_graphs():
    model = Block().cuda().eval()
    x = torch.randn(4, 32, 28, 28, device="cuda")
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="tritonconv", mode=mode)
        with torch.no_grad():
            for _ in range(3):
                compiled(x)
            model.bn2.running_mean.add_(0.3)
            model.conv1.weight.mul_(0.7)
            model.head.bias.add_(1.0)
            out = compiled(x).clone()
            assert rel_err(out, _reference(model, x)) < 3e-3, mode


def test_training_step_matches_eager():
    torch.manual_seed(0)
    model, twin = Block().cuda().train(), Block().cuda().train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 32, 28, 28, device="cuda")
    # exact fp32 on both sides: eager's cuDNN (and the backward's convolution_backward) would use TF32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = torch.compile(model, backend="tritonconv", options={"input_precision": "ieee"})(x)
        ref = twin(x)
        out.square().mean().backward()
        ref.square().mean().backward()
    assert rel_err(out, ref) < 1e-4
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-3, name
