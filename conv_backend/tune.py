"""Pre-tune a model's convolutions, so that its first compiled call in production tunes nothing.

    python -m conv_backend.tune --model torchvision.models:resnet50 --batch 32 --dtype bfloat16 \
        --channels-last --size 224 --level exhaustive --cache-file out.json

builds the model (`module:callable`, called with no arguments: torchvision's models then have
random weights and download nothing), compiles it with the tritonconv backend and runs it once
under no_grad at the chosen autotune level. The choices land in the tuning cache (or in
--cache-file); copy that file to $XDG_CACHE_HOME/tritonconv/ on a machine with the same GPU and
software versions, or point TRITONCONV_CACHE_FILE at it. With --device cpu the model runs through
Triton's interpreter, which times nothing and stores nothing: a check that the model compiles.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import tuning
from .backend import explain
from .runtime import interpreter_enabled

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m conv_backend.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="module:callable that returns the model, e.g. "
                                                       "torchvision.models:resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--level", default=None, help="autotune level: none, fast or exhaustive (default: "
                                                      "TRITONCONV_AUTOTUNE, else fast)")
    parser.add_argument("--cache-file", type=Path, help="write the choices to this file (default: the tuning cache)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when a GPU is visible, else cpu (Triton's interpreter)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        level = tuning.validate_autotune_level(args.level) if args.level else tuning.current_autotune_level()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu")
    if device == "cpu" and not interpreter_enabled():
        # Triton reads TRITON_INTERPRET when the kernels are defined, which importing this package did.
        os.execve(sys.executable, [sys.executable, "-m", "conv_backend.tune", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})

    logging.basicConfig(format="%(message)s")
    logging.getLogger("conv_backend").setLevel(logging.INFO)  # one line per problem tuned
    with CacheFileRedirect(args.cache_file) as path:
        report = _run(args, device, level)
        entries = _count_entries(path)
    print(str(report).splitlines()[0] if str(report) else "no convolutions")
    print(f"tuning cache: {args.cache_file or path} ({entries} entries)")
    if device == "cpu":
        print("note: the interpreter times nothing and stores nothing; tune on the GPU the model will run on")
    return 0


def _count_entries(path: Path) -> int:
    try:
        return len(json.loads(path.read_text()).get("entries", {}))
    except (OSError, ValueError, AttributeError):
        return 0


def _run(args, device: str, level: str):
    """Build the model and its input, compile it and run it once at `level`; the backend's report."""
    module_name, _, attr = args.model.partition(":")
    if not attr:
        raise SystemExit(f"--model must be module:callable, got {args.model!r}")
    model = getattr(importlib.import_module(module_name), attr)()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = getattr(torch, args.dtype)
    model = model.eval().to(device=device, dtype=dtype, memory_format=memory_format)
    x = torch.randn(args.batch, args.in_channels, args.size, args.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    print(f"tritonconv tune: {args.model} input {tuple(x.shape)} {args.dtype}"
          f"{' channels_last' if args.channels_last else ''} on {device}, autotune level {level!r}")
    return explain(model, x, options={"autotune": level})


class CacheFileRedirect:
    """Point the tuning cache at `target` for the run: through TRITONCONV_CACHE_FILE where cache_path() reads
    it, else through a private XDG_CACHE_HOME whose file (seeded with `target`'s entries) is copied back."""

    def __init__(self, target):
        self.target, self.saved, self.scratch = target, {}, None

    def _set(self, name, value):
        self.saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def __enter__(self) -> Path:
        if self.target is None:
            return tuning.cache_path()
        self.target = self.target.resolve()
        self._set("TRITONCONV_CACHE_FILE", str(self.target))
        if tuning.cache_path() == self.target:
            return self.target
        self.scratch = tempfile.mkdtemp(prefix="tritonconv-tune-")
        self._set("XDG_CACHE_HOME", self.scratch)
        path = tuning.cache_path()
        if self.target.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.target, path)
        return path

    def __exit__(self, *exc):
        if self.scratch is not None:
            path = tuning.cache_path()
            if path.exists():
                self.target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.target)
            shutil.rmtree(self.scratch, ignore_errors=True)
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return False


if __name__ == "__main__":
    sys.exit(main())
