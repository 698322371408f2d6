"""Helpers shared by the benchmark scripts in bench/ (no torch/triton import at module level).

The scripts call `init_runtime()` before anything imports triton, so that
`--smoke` on a machine without a GPU can switch Triton to its CPU interpreter
(TRITON_INTERPRET=1 is read when a kernel is decorated, i.e. when
conv_backend's kernel modules are imported).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
SMOKE_DIR = Path("/tmp/tritonconv_bench_smoke")


class Interrupted(Exception):
    """Raised from the SIGTERM handler (e.g. `timeout`): write what we have and stop."""


def install_sigterm_handler() -> None:
    def handler(signum, frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def init_runtime(smoke: bool) -> str:
    """Pick the device ("cuda" or "cpu") and, for a CPU smoke run, turn the Triton interpreter on.

    Must run before conv_backend (and so triton kernels) is imported.
    """
    if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO))
    import torch  # importing torch does not decorate any Triton kernel
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "on", "yes"):
        return "cuda"
    if not smoke:
        sys.exit("this benchmark needs a CUDA GPU; use --smoke for a small CPU run through the Triton interpreter")
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def set_fp32_precision(ieee: bool) -> str:
    """TF32 on for cuDNN and matmul (what cuDNN users get by default), or exact fp32 everywhere."""
    import torch
    torch.backends.cudnn.allow_tf32 = not ieee
    torch.backends.cuda.matmul.allow_tf32 = not ieee
    from conv_backend.runtime import cudnn_conv_allows_tf32
    tf32 = cudnn_conv_allows_tf32()
    if tf32 == ieee:
        raise RuntimeError("could not set the fp32 precision policy (torch.backends flags disagree)")
    return "ieee" if ieee else "tf32"


def kernel_precision(dtype, device: str) -> str:
    """The tl.dot input_precision the backend's "auto" policy gives (as launch_conv2d resolves it)."""
    import torch
    from conv_backend.runtime import resolve_input_precision
    try:
        return resolve_input_precision("auto", dtype, torch.device(device))
    except TypeError:  # older signature without the device
        return resolve_input_precision("auto", dtype)


def threshold(dtype_name: str, precision: str) -> float:
    """Relative-error limits of issue 3: TF32 2e-3, exact fp32 1e-5, bf16/fp16 1e-2."""
    if dtype_name in ("bf16", "fp16"):
        return 1e-2
    return 1e-5 if precision == "ieee" else 2e-3


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def versions(device: str) -> dict:
    import torch
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "python": sys.version.split()[0]}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        v = torch.backends.cudnn.version()
        info["cudnn_version"] = cudnn_version_string(v) if v else None
        cap = torch.cuda.get_device_capability(0)
        info["capability"] = f"{cap[0]}.{cap[1]}"
    else:
        info["gpu"] = "cpu (smoke run, TRITON_INTERPRET=1)"
        info["cuda"] = None
        info["cudnn_version"] = None
        info["capability"] = None
    return info


def cudnn_version_string(v: int) -> str:
    if v >= 90000:  # cuDNN 9: major*10000 + minor*100 + patch
        return f"{v // 10000}.{(v % 10000) // 100}.{v % 100}"
    return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"


def gpu_slug(gpu: str) -> str:
    s = gpu.lower().replace("nvidia", "")
    s = re.sub(r"\(.*?\)", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def result_stem(info: dict, smoke: bool, suffix: str = "") -> str:
    slug = "cpu-smoke" if info["gpu"].startswith("cpu") else gpu_slug(info["gpu"])
    if smoke and not slug.endswith("smoke"):
        slug += "-smoke"
    return f"{info['date']}-{slug}{suffix}"


def default_out(smoke: bool) -> Path:
    return SMOKE_DIR if smoke else RESULTS_DIR


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def make_timer(device: str, warmup_ms: float, rep_ms: float, cpu_reps: int = 2):
    """fn -> median milliseconds. CUDA: triton.testing.do_bench; CPU (smoke): time.perf_counter."""
    if device == "cuda":
        import triton.testing

        def timer(fn):
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        return timer

    def cpu_timer(fn):
        times = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_timer


def host_us(fn, calls: int = 200, warmup: int = 20) -> float:
    """Host microseconds per call of `fn` (a CUDA launch path), the GPU drained before and after."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def conv_weight(oc: int, icg: int, kh: int, kw: int, dtype, device: str):
    """Random weight scaled like nn.Conv2d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    import torch
    bound = 1.0 / math.sqrt(icg * kh * kw)
    w = (torch.rand(oc, icg, kh, kw, device=device) * 2 - 1) * bound
    return w.to(dtype)


def reference_conv(x, w, b, stride, padding, dilation, groups, chunk_elems: int = 1 << 27):
    """float64 ATen convolution, computed a few images at a time (bounded temporaries).

    cudnn.benchmark is turned off meanwhile: no algorithm search (and its workspaces) for float64.
    """
    import torch
    import torch.nn.functional as F
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        w64 = w.double()
        b64 = b.double() if b is not None else None
        first = F.conv2d(x[:1].double(), w64, b64, stride, padding, dilation, groups)
        ref = torch.empty((x.shape[0],) + tuple(first.shape[1:]), dtype=torch.float64, device=x.device)
        ref[:1] = first
        del first
        per = max(1, chunk_elems // max(1, max(x[0].numel(), ref[0].numel())))
        for i in range(1, x.shape[0], per):
            ref[i:i + per] = F.conv2d(x[i:i + per].double(), w64, b64, stride, padding, dilation, groups)
        return ref
    finally:
        torch.backends.cudnn.benchmark = old


def vector_norm(t, chunk_elems: int = 1 << 27) -> float:
    import torch
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    per = max(1, chunk_elems // max(1, t[0].numel()))
    for i in range(0, t.shape[0], per):
        total += torch.linalg.vector_norm(t[i:i + per].double()) ** 2
    return float(total.sqrt())


def rel_err(out, ref, ref_norm: float, chunk_elems: int = 1 << 27) -> float:
    """||out - ref|| / ||ref|| in float64, a few images at a time; NaN/inf give inf."""
    import torch
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    total = torch.zeros((), dtype=torch.float64, device=ref.device)
    per = max(1, chunk_elems // max(1, ref[0].numel()))
    for i in range(0, ref.shape[0], per):
        total += torch.linalg.vector_norm(out[i:i + per].double() - ref[i:i + per]) ** 2
    err = float(total.sqrt()) / ref_norm if ref_norm > 0 else float(total.sqrt())
    return err if math.isfinite(err) else math.inf


def fmt_ms(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v >= 0.1 else f"{v:.4f}")


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_err(v) -> str:
    return "n/a" if v is None else ("inf" if v == math.inf else f"{v:.1e}")


def text_table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def md_table(headers, rows) -> str:
    def esc(c):
        return str(c).replace("|", "\\|")
    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_default(o):
    return str(o)


def clean_json(v):
    """Replace non-finite floats (not valid JSON) by None, recursively; keep 6 significant digits."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_json(x) for x in v]
    return v


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


class LogCapture:
    """Collects conv_backend log records that say a call fell back to ATen."""

    def __init__(self):
        import logging
        self.messages = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                try:
                    msg = record.getMessage()
                except Exception:
                    return
                if "falls back" in msg or "fall back" in msg:
                    outer.messages.append(msg)

        if not logging.getLogger().handlers:  # keep warnings visible (our handler hides lastResort)
            stderr = logging.StreamHandler()
            stderr.setLevel(logging.WARNING)
            stderr.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
            logging.getLogger().addHandler(stderr)
        self.logger = logging.getLogger("conv_backend")
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(_Handler(level=logging.INFO))

    def clear(self):
        self.messages = []
