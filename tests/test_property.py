"""Random convolutions through the op and the backend, each against float64 ATen.

Every run draws the same cases from one seed: TRITONCONV_PROPERTY_SEED, or
DEFAULT_SEED. Shapes, strides, padding, dilation, groups, depthwise channel
multipliers, dtypes, input and weight layouts (contiguous, channels_last,
sliced and strided views) and bias come from `_util.draw_case`. A failure
names the seed and every failing case in full, so that
`TRITONCONV_PROPERTY_SEED=<seed> pytest tests/test_property.py` reproduces it.
"""
from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
import torch.nn.functional as F

import conv_backend
from conv_backend import last_report

from _util import draw_case, reference, rel_err, tolerance

DEFAULT_SEED = 20261207
SEED = int(os.environ.get("TRITONCONV_PROPERTY_SEED", DEFAULT_SEED))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATHS = ("auto", "depthwise")  # draw_case's "auto" draws groups 1-3 (depthwise now and then); "depthwise" multipliers
IEEE = {"input_precision": "ieee"}
CPU_CASES, CPU_BACKEND_CASES, CPU_MAX_HW = 200, 10, 7
# On a GPU every new problem is tuned (its candidates compiled and timed): a few seconds each.
GPU_CASES, GPU_BACKEND_CASES = 64, 8


def draw_cases(count: int, salt: str, max_hw: int = 0) -> list:
    """`count` cases; with max_hw, one image of at most max_hw x max_hw (the interpreter's time grows with its
    pixels)."""
    rng = random.Random(f"{SEED}-{salt}")
    cases = []
    while len(cases) < count:
        case = draw_case(rng, rng.choice(PATHS), rng.choice(DTYPES))
        if max_hw:
            case = dataclasses.replace(case, n=1, h=min(case.h, max_hw), w=min(case.w, max_hw))
        if min(case.out_hw()) >= 1:
            cases.append(case)
    return cases


def case_tensors(case, index: int, device: str):
    torch.manual_seed(SEED * 1000 + index)  # each case's tensors reproducible on their own
    return case.tensors(device)


def check_cases(cases: list, run, device: str = "cpu") -> None:
    """run(case, x, w, b) -> y for every case; one assertion naming the seed and every failing case."""
    failures = []
    for index, case in enumerate(cases):
        x, w, b = case_tensors(case, index, device)
        ref = reference(x, w, b, *case.args())
        try:
            y = run(case, x, w, b)
            err = rel_err(y, ref) if y.shape == ref.shape and y.dtype == x.dtype else float("inf")
            problem = "" if err <= tolerance(case.dtype) else (
                f"relative error {err:.2e} > {tolerance(case.dtype):.0e} (output {tuple(y.shape)} {y.dtype}, "
                f"expected {tuple(ref.shape)} {x.dtype})")
        except Exception as exc:  # a crash is a failing case too: report it with the others
            problem = f"raised {type(exc).__name__}: {exc}"
        if problem:
            failures.append(f"case {index}: {case}: {problem}")
    assert not failures, (f"TRITONCONV_PROPERTY_SEED={SEED}: {len(failures)} of {len(cases)} case(s) failed:\n"
                          + "\n".join(failures))


def through_op(case, x, w, b):
    return conv_backend.conv2d(x, w, b, *case.args())


def through_backend(case, x, w, b):
    torch._dynamo.reset()  # a fresh compilation per case, never the recompile limit's eager fallback
    stride, padding, dilation, groups = case.args()

    def conv(x, w, b):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    with torch.no_grad():
        y = torch.compile(conv, backend="tritonconv", options=IEEE)(x, w, b)
    report = last_report()
    if report is None or len(report.decisions) != 1 or not report.decisions[0].replaced:
        raise AssertionError(f"the convolution was not replaced: {report}")
    return y


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.interpreter
def test_random_convolutions_through_the_op():
    check_cases(draw_cases(CPU_CASES, "op", CPU_MAX_HW), through_op)


@pytest.mark.interpreter
def test_random_convolutions_through_the_backend(fresh_dynamo):
    check_cases(draw_cases(CPU_BACKEND_CASES, "backend", CPU_MAX_HW), through_backend)


def gpu_sized(case, rng: random.Random):
    """The same kind of problem at GPU size: wider channels (groups scaled alike) and larger maps."""
    scale = rng.choice([1, 4, 16])
    return dataclasses.replace(case, n=rng.randint(1, 4), c=case.c * scale, oc=case.oc * scale,
                               groups=case.groups * scale if case.groups == case.c else case.groups,
                               h=rng.randint(8, 80), w=rng.randint(8, 80))


@pytest.mark.cuda
def test_random_convolutions_through_the_op_cuda():
    rng = random.Random(f"{SEED}-cuda")
    cases = [gpu_sized(case, rng) for case in draw_cases(GPU_CASES, "cuda-op")]
    check_cases(cases, lambda case, x, w, b: conv_backend.conv2d(x, w, b, *case.args(), input_precision="ieee"),
                device="cuda")


@pytest.mark.cuda
def test_random_convolutions_through_the_backend_cuda(fresh_dynamo):
    rng = random.Random(f"{SEED}-cuda-backend")
    cases = [gpu_sized(case, rng) for case in draw_cases(GPU_BACKEND_CASES, "cuda-backend")]
    check_cases(cases, through_backend, device="cuda")
