"""The kernels' shared Triton helpers through Triton's GPU compiler, on CPU: no GPU needed to compile for one.

The CPU suite runs every kernel through Triton's interpreter, which executes Python and so accepts code that
the compiler rejects. mma's "tf32_round" branch was such code: an early return left a `tl.dot` with
input_precision="tf32_round" after it, which the interpreter never reached and the compiler refused, so every
fp32 candidate failed to compile on a GPU. These tests compile, for Hopper (sm_90) and Ampere (sm_80), a small
kernel around each helper at every setting the kernels use, and every `tl` kernel family as its plan builder
launches it (arguments recorded under the interpreter) for each dtype, fp32 precision and epilogue, with 32-
and 64-bit offsets, in a subprocess without TRITON_INTERPRET. (The Gluon kernels never run in the interpreter;
their GPU tests cover them.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conv_backend.epilogue import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("tf32", "tf32_round", "tf32x3", "ieee")

COMPILER = textwrap.dedent('''
    import importlib, json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from conv_backend.kernels.common import mma
    from conv_backend.kernels.epilogue_tl import fused_epilogue

    @triton.jit
    def mma_kernel(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        r = tl.arange(0, 32)
        tile = r[:, None] * 32 + r[None, :]
        acc = mma(tl.load(a_ptr + tile), tl.load(b_ptr + tile), tl.zeros((32, 32), tl.float32), PRECISION, UPCAST)
        tl.store(c_ptr + tile, acc)

    @triton.jit
    def epilogue_kernel(acc_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, res_ptr, y_ptr, eps, p0, p1,
                        ACTIVATION: tl.constexpr, ROUND_TF32: tl.constexpr):
        r = tl.arange(0, 32)
        tile = r[:, None] * 32 + r[None, :]
        oc = r[None, :]
        acc = fused_epilogue(tl.load(acc_ptr + tile), oc, oc < 32, tile < 1024, mean_ptr, var_ptr, gamma_ptr,
                             beta_ptr, res_ptr + tile, eps, p0, p1, True, True, ACTIVATION, ROUND_TF32)
        tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty))

    def kernel(ref):
        if ":" not in ref:
            return {"mma": mma_kernel, "epilogue": epilogue_kernel}[ref]
        module, name = ref.split(":")
        return getattr(importlib.import_module(module), name)

    failures = {}
    for name, ref, signature, constexprs, options, arch in json.loads(open(sys.argv[1]).read()):
        try:
            triton.compile(ASTSource(fn=kernel(ref), signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not only the first
            cause = exc.__cause__ or exc
            failures[name] = f"{type(cause).__name__}: {str(cause)[-400:]}"
    print(json.dumps(failures))
''')


def _compile(jobs: list, tmp_path: Path) -> dict:
    """{job name: error} for the jobs that failed to compile."""
    script = tmp_path / "compile_helpers.py"  # @triton.jit needs its source in a file
    script.write_text(COMPILER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier run's cache
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(script), str(job_file)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", [90, 80])
def test_mma_compiles_for_every_precision_and_dtype(arch, tmp_path):
    jobs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for precision in PRECISIONS if dtype == "fp32" else ("ieee",):  # what dispatch passes for 16-bit
            for upcast in (False, True):
                signature = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32",
                             "PRECISION": "constexpr", "UPCAST": "constexpr"}
                jobs.append((f"sm{arch} {dtype} {precision} upcast={upcast}", "mma", signature,
                             {"PRECISION": precision, "UPCAST": upcast}, {}, arch))
    assert _compile(jobs, tmp_path) == {}


def test_fused_epilogue_compiles_for_every_activation(tmp_path):
    jobs = []
    for activation in ACTIVATIONS:
        for out, round_tf32 in (("fp32", False), ("fp32", True), ("bf16", False)):
            signature = {"acc_ptr": "*fp32", "mean_ptr": "*fp32", "var_ptr": "*fp32", "gamma_ptr": "*fp32",
                         "beta_ptr": "*fp32", "res_ptr": f"*{out}", "y_ptr": f"*{out}", "eps": "fp32",
                         "p0": "fp32", "p1": "fp32", "ACTIVATION": "constexpr", "ROUND_TF32": "constexpr"}
            jobs.append((f"{activation} {out}{' rounded' if round_tf32 else ''}", "epilogue", signature,
                         {"ACTIVATION": activation, "ROUND_TF32": round_tf32}, {}, 90))
    assert _compile(jobs, tmp_path) == {}


# ---------------------------------------------------------------- every tl kernel family, as launched

TRITON_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int32": "i32",
                 "torch.int64": "i64", "torch.int8": "i8", "torch.uint8": "u8", "torch.float64": "fp64"}
# What the interpreter needs and a GPU does not (common.needs_dot_upcast): compile what a GPU would run.
GPU_CONSTEXPRS = {"UPCAST_DOT": False}


def _arg_type(value) -> str:
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(value, torch.Tensor):
        return "*" + TRITON_DTYPES[str(value.dtype)]
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{TRITON_DTYPES[str(value.base.dtype)]}{list(value.block_shape)}>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def record_launches(monkeypatch) -> dict:
    """Make the interpreter record each launch as a compile job (signature, constexprs, options) instead of
    running it; returns {job key: job}."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    jobs = {}

    def record(self, *args, grid, warmup=False, **kwargs):
        params = inspect.signature(self.fn).parameters
        signature, constexprs, options = {}, {}, {}
        for name, value in [*zip(params, args), *kwargs.items()]:
            if name not in params:
                options[name] = value  # num_warps, num_stages
            elif value is None or "constexpr" in str(params[name].annotation):
                signature[name], constexprs[name] = "constexpr", GPU_CONSTEXPRS.get(name, value)
            else:
                signature[name] = _arg_type(value)
        ref = f"{self.fn.__module__}:{self.fn.__name__}"
        key = json.dumps([ref, signature, constexprs, options], sort_keys=True, default=str)
        jobs[key] = (f"{self.fn.__name__} {json.dumps(constexprs, default=str)}", ref, signature, constexprs,
                     options)
    monkeypatch.setattr(InterpretedFunction, "run", record)
    return jobs


@pytest.mark.interpreter
@pytest.mark.parametrize("int64", [False, True], ids=["int32-offsets", "int64-offsets"])
def test_every_tl_kernel_family_compiles_for_hopper(int64, monkeypatch, tmp_path):
    import dataclasses

    import torch

    import conv_backend.kernels.depthwise as depthwise_mod
    import conv_backend.kernels.implicit_gemm as igemm_mod
    import conv_backend.kernels.seed as seed_mod
    from conv_backend.epilogue import IDENTITY
    from test_epilogue_kernels import FAMILIES, epilogue_of, epilogue_tensors, offer, tensors

    if int64:  # what a tensor past 2**31 elements gets
        for module in (igemm_mod, depthwise_mod, seed_mod):
            monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)
    jobs = record_launches(monkeypatch)
    # the precisions dispatch passes (runtime.choose_fp32_precision: fp16 and bf16 get "ieee")
    settings = [(torch.float32, p) for p in PRECISIONS] + [(torch.bfloat16, "ieee"), (torch.float16, "ieee")]
    for family in FAMILIES.values():
        offer(monkeypatch, family, lambda *a, _cand=family.cand, **k: [_cand])
        for dtype, precision in settings:
            case = dataclasses.replace(family.case, dtype=dtype)
            x, w, b = tensors(case)
            fused = epilogue_of(family.activation, batch_norm=True, residual=True)
            # fp32 outputs also stored rounded to TF32 (conv_backend.tf32)
            rounded = [dataclasses.replace(fused, round_tf32=True)] if dtype == torch.float32 else []
            for epilogue in (IDENTITY, fused, *rounded):
                epi = epilogue_tensors(epilogue, (case.n, case.oc, *case.out_hw()), dtype,
                                       residual_layout=family.residual_layout)
                if family.offered_by == "depthwise_candidates":
                    plan = depthwise_mod.depthwise_plan(x, w, b, case.stride, case.padding, case.dilation,
                                                        epilogue=epilogue, epi=epi)
                else:
                    plan = igemm_mod.implicit_gemm_plan(x, w, b, *case.args(), precision, family.load_path,
                                                        epilogue=epilogue, epi=epi)
                plan(x, w, b, epi)
    kernels = {job[1].split(":")[1] for job in jobs.values()}
    assert {f.kernel for f in FAMILIES.values()} <= kernels, "a family launched nothing"
    failures = _compile([(*job, 90) for job in jobs.values()], tmp_path)
    assert failures == {}, f"{len(failures)} of {len(jobs)} launches do not compile for sm_90"
