"""The kernels' shared Triton helpers through Triton's GPU compiler, on CPU: no GPU needed to compile for one.

The CPU suite runs every kernel through Triton's interpreter, which executes Python and so accepts code that
the compiler rejects. mma's "tf32_round" branch was such code: an early return left a `tl.dot` with
input_precision="tf32_round" after it, which the interpreter never reached and the compiler refused, so every
fp32 candidate failed to compile on a GPU. These tests compile, for Hopper (sm_90) and Ampere (sm_80), a small
kernel around each helper at every setting the kernels use, in a subprocess without TRITON_INTERPRET.
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
    import json, sys
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
                        ACTIVATION: tl.constexpr):
        r = tl.arange(0, 32)
        tile = r[:, None] * 32 + r[None, :]
        oc = r[None, :]
        acc = fused_epilogue(tl.load(acc_ptr + tile), oc, oc < 32, tile < 1024, mean_ptr, var_ptr, gamma_ptr,
                             beta_ptr, res_ptr + tile, eps, p0, p1, True, True, ACTIVATION)
        tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty))

    failures = {}
    for name, fn, signature, constexprs, arch in json.loads(sys.argv[1]):
        fn = {"mma": mma_kernel, "epilogue": epilogue_kernel}[fn]
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32))
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
    done = subprocess.run([sys.executable, str(script), json.dumps(jobs)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", [90, 80])
def test_mma_compiles_for_every_precision_and_dtype(arch, tmp_path):
    jobs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for precision in PRECISIONS if dtype == "fp32" else ("tf32",):
            for upcast in (False, True):
                signature = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32",
                             "PRECISION": "constexpr", "UPCAST": "constexpr"}
                jobs.append((f"sm{arch} {dtype} {precision} upcast={upcast}", "mma", signature,
                             {"PRECISION": precision, "UPCAST": upcast}, arch))
    assert _compile(jobs, tmp_path) == {}


def test_fused_epilogue_compiles_for_every_activation(tmp_path):
    jobs = []
    for activation in ACTIVATIONS:
        for out in ("fp32", "bf16"):
            signature = {"acc_ptr": "*fp32", "mean_ptr": "*fp32", "var_ptr": "*fp32", "gamma_ptr": "*fp32",
                         "beta_ptr": "*fp32", "res_ptr": f"*{out}", "y_ptr": f"*{out}", "eps": "fp32",
                         "p0": "fp32", "p1": "fp32", "ACTIVATION": "constexpr"}
            jobs.append((f"{activation} {out}", "epilogue", signature, {"ACTIVATION": activation}, 90))
    assert _compile(jobs, tmp_path) == {}
