"""Data-parallel training with the backend: DistributedDataParallel around a model compiled with tritonconv.

Under DDP, Dynamo's DDPOptimizer splits each captured graph at the gradient
bucket boundaries and compiles every piece with our backend, so that a bucket's
all-reduce can start while the pieces before it are still computing. Each rank
trains the same seeded model for a few steps three times -- eager in float64
(the reference), eager in the test's dtype, and compiled with the backend --
and writes losses, gradients, updated weights and the backend's reports to a
file; the parent process checks them. On CPU the ranks talk through gloo and
the kernels run in Triton's interpreter; the cuda-marked test uses NCCL on
every visible GPU.
"""
from __future__ import annotations

import copy
import datetime
import functools
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.nn as nn
import torch.nn.functional as F

from _util import rel_err, tolerance

STEPS = 3
# About one convolution's parameters per bucket: several graph pieces, most of them with convolutions.
BUCKET_CAP_MB = 1024 / 2**20
PIECES_WITH_CONVS_AT_LEAST = 2
# Backend options for the CPU test (the interpreter); e.g. {"inner": "aten"} to keep the
# non-convolution parts off a C++ compiler.
CPU_OPTIONS: dict = {}
TIMEOUT_S = 600  # the whole run, both ranks; a hung collective must not hang the suite


class ResidualNet(nn.Module):
    """Convolutions with and without bias, batch norm, grouped and depthwise convolutions, residual adds."""

    def __init__(self, in_channels: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8, bias=False)  # channel multiplier 2
        self.bn2 = nn.BatchNorm2d(16)
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.shortcut = nn.Conv2d(8, 8, 1, stride=2, bias=False)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.grouped(y)) + y
        z = self.pointwise(F.relu(self.bn2(self.depthwise(y)))) + self.shortcut(y)
        return self.head(F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))


CONVS = 5  # in ResidualNet


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(model, steps: int, rank: int, device: torch.device, dtype: torch.dtype) -> dict:
    """SGD steps on this rank's batches: per-step losses, the last step's gradients, the final state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        data = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        x = torch.randn(2, 4, 8, 8, generator=data).to(device=device, dtype=dtype)
        labels = torch.randint(0, 10, (2,), generator=data).to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).to(torch.promote_types(dtype, torch.float32)), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    module = model.module
    return {"losses": torch.stack(losses).cpu(),
            "grads": {name: p.grad.detach().cpu() for name, p in module.named_parameters()},
            "state": {name: t.detach().cpu() for name, t in module.state_dict().items()}}


def ddp_rank(rank: int, world_size: int, port: int, device_type: str, dtype: torch.dtype, options: dict,
             out_dir: str) -> None:
    """One rank (run by torch.multiprocessing.spawn): eager float64, eager `dtype` and compiled runs."""
    import conv_backend

    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank if device_type == "cuda" else None)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    # DDPOptimizer takes DDP's default first bucket (1 MiB) and insists it be no larger than the
    # others; lowering it lets a model this small split into several pieces.
    dist._DEFAULT_FIRST_BUCKET_BYTES = int(BUCKET_CAP_MB * 2**20)
    try:
        torch.manual_seed(0)
        initial = ResidualNet()
        device_ids = [rank] if device_type == "cuda" else None
        reports = []
        backend = functools.partial(conv_backend.tritonconv_backend, options=options, report_sink=reports.append)
        results = {}
        for run, run_dtype, compiled in (("float64", torch.float64, False), ("eager", dtype, False),
                                         ("compiled", dtype, True)):
            model = copy.deepcopy(initial).to(device=device, dtype=run_dtype)
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=BUCKET_CAP_MB)
            results[run] = train(torch.compile(ddp, backend=backend) if compiled else ddp, STEPS, rank, device,
                                 run_dtype)
        # Read the reports after training: AOTAutograd may compile a backward graph at its first use.
        results["reports"] = [report.to_dict() for report in reports]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ddp_training(world_size: int, device_type: str, dtype: torch.dtype, options: dict, out_dir) -> list:
    """Train on `world_size` spawned ranks; every rank's results. Kills the ranks past TIMEOUT_S."""
    context = torch.multiprocessing.spawn(
        ddp_rank, args=(world_size, free_port(), device_type, dtype, options, str(out_dir)), nprocs=world_size,
        join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=10):
            if time.monotonic() >= deadline:
                pytest.fail(f"DDP training did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(10)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


def check_against_eager(results: list, dtype: torch.dtype, precision: str) -> None:
    """Compiled within the dtype's bound of float64, or within twice eager's own error where that is larger."""
    for rank, result in enumerate(results):
        reference, eager, compiled = result["float64"], result["eager"], result["compiled"]
        pairs = [("losses", reference["losses"], eager["losses"], compiled["losses"])]
        pairs += [(f"grad {name}", reference["grads"][name], eager["grads"][name], compiled["grads"][name])
                  for name in reference["grads"]]
        pairs += [(name, reference["state"][name], eager["state"][name], compiled["state"][name])
                  for name in reference["state"] if reference["state"][name].is_floating_point()]
        for what, ref, eager_value, ours in pairs:
            bound = max(tolerance(dtype, precision), 2 * rel_err(eager_value, ref))
            err = rel_err(ours, ref)
            assert err <= bound, f"rank {rank}, {what}: relative error {err:.2e} against float64 > {bound:.2e}"
        torch.testing.assert_close(compiled["state"]["bn.num_batches_tracked"], torch.tensor(STEPS))
    # DDP keeps the replicas' parameters equal (batch norm's running statistics are each rank's own).
    for result in results[1:]:
        for name in result["compiled"]["grads"]:
            torch.testing.assert_close(result["compiled"]["state"][name], results[0]["compiled"]["state"][name],
                                       rtol=0, atol=0)


def check_reports(results: list) -> None:
    """DDPOptimizer split the graph, and every forward convolution of every piece runs on Triton."""
    for rank, result in enumerate(results):
        pieces = result["reports"]
        assert len(pieces) > 1, f"rank {rank}: DDPOptimizer did not split the graph"
        forward = [[d for d in piece["decisions"] if d["graph"].startswith("forward")] for piece in pieces]
        assert sum(len(f) for f in forward) == CONVS, f"rank {rank}: {forward}"
        assert sum(1 for f in forward if f) >= PIECES_WITH_CONVS_AT_LEAST, f"rank {rank}: {forward}"
        kept = [d for f in forward for d in f if not d["replaced"]]
        assert not kept, f"rank {rank}: convolutions kept on ATen: {kept}"


@pytest.mark.interpreter
def test_ddp_training_matches_eager_cpu(tmp_path):
    results = run_ddp_training(2, "cpu", torch.float32, CPU_OPTIONS, tmp_path)
    check_against_eager(results, torch.float32, "ieee")  # the interpreter computes exact fp32
    check_reports(results)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddp_training_matches_eager_cuda(dtype, tmp_path):
    world_size = torch.cuda.device_count()
    if world_size < 2 or not dist.is_nccl_available():
        pytest.skip(f"needs two or more GPUs and NCCL ({world_size} GPU(s) visible)")
    results = run_ddp_training(world_size, "cuda", dtype, {}, tmp_path)
    check_against_eager(results, dtype, "auto")  # fp32: TF32 exactly where cuDNN uses it
    check_reports(results)
