"""The examples run end to end (on CPU through the interpreter) and pass their own checks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.interpreter
@pytest.mark.parametrize("options", ["{}", '{"algorithm": "seed"}'])
def test_kernelbench_example(options):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "examples/kernelbench_conv.py", "--device", "cpu", "--options", options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "-> PASS" in proc.stdout and "1 on Triton" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.interpreter
def test_example_rejects_unknown_option():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "examples/kernelbench_conv.py", "--options", '{"bogus": 1}'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "unknown option" in proc.stderr and "input_precision" in proc.stderr


def test_ddp_example_asks_for_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "examples/ddp_train.py", "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "torchrun --nproc_per_node" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.cuda
def test_ddp_example_on_two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs ({torch.cuda.device_count()} visible)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "examples/ddp_train.py", "--steps", "5", "--warmup", "2", "--batch", "8", "--size", "64"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-> PASS" in proc.stdout and "speed-up" in proc.stdout, proc.stdout[-3000:]
