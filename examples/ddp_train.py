#!/usr/bin/env python3
"""Data-parallel training of a torchvision ResNet with the tritonconv backend, timed against eager DDP.

    torchrun --nproc_per_node=2 examples/ddp_train.py                     # every rank on its own GPU
    torchrun --nproc_per_node=8 examples/ddp_train.py --arch resnet50 --dtype bfloat16 --channels-last
    torchrun --nproc_per_node=2 examples/ddp_train.py --device cpu --steps 2 --size 32 --batch 2

Each rank (one process per GPU, started by torchrun) wraps the model in
DistributedDataParallel, trains it with SGD on random data (each rank its own
batches; random weights, nothing downloaded) for --steps steps eagerly, then
the same steps from the same weights with torch.compile(backend="tritonconv").
Under DDP, Dynamo splits the model's graph at the gradient buckets and our
backend compiles each piece. Rank 0 prints the per-step time of each run (the
median over the steps after --warmup), the ratio, how many graph pieces the
backend compiled with how many convolutions on Triton, and a check: the
losses of the first --check-steps steps and the weights after them, of the
compiled and the eager run, against a float64 eager DDP run (relative error;
the compiled run may be off by the dtype's bound or by twice eager's own
error, whichever is larger). Without a GPU the ranks run on CPU through Triton's interpreter and
talk through gloo; on a tiny input that checks the setup, and its times
measure the interpreter, not the kernels. Exits with status 1 when the check
fails.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from _common import add_common_args, fp32_math, rel_err, setup_example

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
GPU_INPUT = (32, 224)  # batch per rank, image size
CPU_INPUT = (2, 32)
CLASSES = 1000
# Allowed relative error against the float64 run, per math mode (or twice eager's own, where larger: on
# tiny inputs batch norm over a few values makes training ill-conditioned).
TOLERANCE = {"ieee": 1e-4, "tf32": 1e-2, "bfloat16": 5e-2, "float16": 5e-2}


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])


def train(model, steps: int, check_steps: int, args, rank: int, device: str, dtype, memory_format, batch: int,
          size: int, say, name: str):
    """SGD steps on this rank's random batches: per-step losses and seconds, the weights after check_steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    on_gpu = torch.device(device).type == "cuda"
    losses, seconds, checked_weights = [], [], None
    for step in range(steps):
        data = torch.Generator().manual_seed(args.seed + 1000 * step + rank)  # the same batches in every run
        x = torch.randn(batch, 3, size, size, generator=data).to(device=device, dtype=dtype,
                                                                   memory_format=memory_format)
        labels = torch.randint(0, CLASSES, (batch,), generator=data).to(device)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).to(torch.promote_types(dtype, torch.float32)), labels)
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step + 1 == check_steps:
            checked_weights = flat_weights(model)
        say(f"  {name} step {step + 1}/{steps}: loss {losses[-1]:.4f}, {1e3 * seconds[-1]:.1f} ms", flush=True)
    return losses, seconds, checked_weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHS, default="resnet18")
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run (default 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps left out of the timing (default 3; at most --steps - 1): the compiled run's "
                             "first step traces, compiles and tunes")
    parser.add_argument("--check-steps", type=int, default=3,
                        help="steps checked against a float64 eager DDP run of the same steps (default 3)")
    parser.add_argument("--batch", type=int, help=f"batch size per rank (default {GPU_INPUT[0]}; "
                                                  f"{CPU_INPUT[0]} on CPU)")
    parser.add_argument("--size", type=int, help=f"image height and width (default {GPU_INPUT[1]}; "
                                                 f"{CPU_INPUT[1]} on CPU)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.check_steps < 1:
        parser.error("--steps and --check-steps must be at least 1 and --warmup at least 0")
    if "RANK" not in os.environ:
        parser.error("launch through torchrun, e.g. torchrun --nproc_per_node=2 examples/ddp_train.py")

    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    say = print if rank == 0 else (lambda *a, **k: None)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # setup_example prints the environment: once is enough
    device, dtype, memory_format = setup_example(args)  # sets TRITON_INTERPRET=1 for CPU, before triton is imported
    import torchvision  # noqa: E402
    import conv_backend  # noqa: E402

    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            sys.exit(f"error: local rank {local_rank}, but this host has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        torch.backends.cudnn.benchmark = True  # let eager cuDNN pick its fastest algorithms
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return run(args, rank, world_size, device, dtype, memory_format, torchvision, conv_backend, say)
    finally:
        dist.destroy_process_group()


def run(args, rank, world_size, device, dtype, memory_format, torchvision, conv_backend, say) -> int:
    on_gpu = device.startswith("cuda")
    default_batch, default_size = GPU_INPUT if on_gpu else CPU_INPUT
    batch, size = args.batch or default_batch, args.size or default_size
    warmup = min(args.warmup, args.steps - 1)
    say(f"model: torchvision {args.arch} (random weights, train mode), DDP over {world_size} rank(s), "
        f"input {batch}x3x{size}x{size} per rank {args.dtype}{', channels_last' if args.channels_last else ''}, "
        f"options {args.options or {}}, {args.steps} steps ({warmup} warm-up)")
    if not on_gpu:
        say("NOTE: no GPU in use, so the ranks run on CPU through Triton's interpreter, on a small input; "
            "the times below measure the interpreter, not the kernels.")

    initial = getattr(torchvision.models, args.arch)(weights=None, num_classes=CLASSES)
    device_ids = [torch.device(device).index] if on_gpu else None
    reports = []
    backend = functools.partial(conv_backend.tritonconv_backend, options=args.options or None,
                                report_sink=reports.append)
    check_steps = min(args.check_steps, args.steps)
    runs = {}
    for name, run_dtype, steps in (("float64", torch.float64, check_steps), ("eager", dtype, args.steps),
                                   ("tritonconv", dtype, args.steps)):
        model = copy.deepcopy(initial).to(device=device, dtype=run_dtype, memory_format=memory_format)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        step = torch.compile(ddp, backend=backend) if name == "tritonconv" else ddp
        runs[name] = train(step, steps, check_steps, args, rank, device, run_dtype, memory_format, batch, size, say,
                           name)

    (ref_losses, _, ref_weights), (eager_losses, eager_s, eager_weights) = runs["float64"], runs["eager"]
    losses, seconds, weights = runs["tritonconv"]
    say(f"first step: tritonconv {seconds[0]:.1f} s (trace, compile{', tune' if on_gpu else ''}, run), "
        f"eager {eager_s[0]:.2f} s")
    t_ours, t_eager = (1e3 * statistics.median(s[warmup:]) for s in (seconds, eager_s))
    say(f"time per training step (median of {args.steps - warmup} step(s) after {warmup} warm-up, rank 0): "
        f"tritonconv {t_ours:.2f} ms, eager DDP {t_eager:.2f} ms -> speed-up {t_eager / t_ours:.2f}x")
    forward = [d for r in reports for d in r.decisions if d.graph.startswith("forward")]
    replaced = sum(d.replaced for d in forward)
    say(f"graph pieces compiled by the backend (DDPOptimizer splits at gradient buckets): {len(reports)}; "
        f"forward convolutions on Triton: {replaced} of {len(forward)}")
    for d in forward:
        if not d.replaced:
            say(f"  kept on ATen: {d.describe()}")

    math = args.dtype if dtype != torch.float32 else fp32_math(args.options, "cuda" if on_gpu else "cpu")
    ref = torch.tensor(ref_losses, dtype=torch.float64)
    ok = True
    for what, ours, eager, reference in (
            (f"losses of steps 1-{check_steps}", torch.tensor(losses[:check_steps]),
             torch.tensor(eager_losses[:check_steps]), ref),
            (f"weights after step {check_steps}", weights, eager_weights, ref_weights)):
        err, eager_err = rel_err(ours, reference), rel_err(eager, reference)
        tol = max(TOLERANCE[math], 2 * eager_err)
        ok = ok and err <= tol
        say(f"check: {what} against float64 eager DDP: relative error tritonconv {err:.2e}, eager {eager_err:.2e} "
            f"(math: {math}; allowed {tol:.1e}) -> {'PASS' if err <= tol else 'FAIL'}")
    opts = conv_backend.BackendOptions.from_mapping(args.options)
    if opts.enabled and opts.algorithm == "auto" and not replaced:
        say("FAIL: the backend kept every convolution on ATen; ResNet's convolutions should run on Triton")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
