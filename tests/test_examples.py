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
