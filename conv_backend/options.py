"""Backend options, as passed through `torch.compile(..., options={...})`."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from .tuning import AUTOTUNE_LEVELS

PRECISIONS = ("auto", "tf32", "tf32_round", "tf32x3", "ieee")
INNER_COMPILERS = ("inductor", "aten")
ALGORITHMS = ("auto", "gemm", "gemm_tma", "gemm_pointer", "gemm_nchw", "depthwise", "seed")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Every option the backend takes.

    enabled:          replace supported convolutions (False keeps every one on ATen).
    input_precision:  fp32 math: "auto" follows cuDNN's TF32 setting at run time (torch.backends.cudnn), using
                      rounded TF32 in compute-bound layers and "tf32x3" elsewhere (runtime.choose_fp32_precision);
                      "tf32" forces TF32 (Triton's: operands truncated), "tf32_round" TF32 on operands rounded to
                      the nearest TF32 value (cuDNN's), "tf32x3" three TF32 products (about fp32's accuracy),
                      "ieee" exact fp32.
    algorithm:        "auto" picks per problem; "gemm" is the implicit GEMM (TMA where it
                      applies), "gemm_tma" / "gemm_pointer" force one of its load paths,
                      "gemm_nchw" its kernel that reads and writes NCHW in place,
                      "depthwise" the direct depthwise kernel, "seed" the baseline kernel.
                      A forced algorithm that cannot take a convolution leaves it on ATen.
    channels_last:    keep activations channels_last between replaced convolutions
                      (through batch norm, pooling and adds too in inference graphs;
                      graph outputs keep eager's strides).
    verbose:          log every decision at INFO instead of DEBUG.
    inner:            what compiles the rest of the graph: "inductor" (as torch.compile's
                      default backend does: fused pointwise kernels, CUDA graphs with
                      mode="reduce-overhead", freezing) or "aten" (every other op runs as
                      an eager ATen call).
    fusion:           fold batch norm (eval), a residual add and an activation that follow a
                      convolution into its kernel (conv_backend.fusion).
    cudagraphs:       replay inference graphs on CUDA in CUDA graphs (Inductor's CUDA-graph trees, as
                      mode="reduce-overhead" does), so a forward costs one graph launch instead of a
                      launch per kernel; the outputs are copied out of the graphs' memory before they
                      are returned, so a later call never overwrites a result the caller holds (what
                      mode="reduce-overhead" leaves to the user). Applies only with inner="inductor",
                      no torch.compile mode and no "triton.cudagraphs" setting, which decide instead;
                      never for training graphs, dynamic shapes or the cudaMallocAsync allocator.
                      False: kernel by kernel, as torch.compile's default.
    autotune:         how a convolution's kernel is chosen the first time its shapes are seen:
                      "none" by rule without timing, "fast" by timing a short list of the best
                      ranked candidates, "exhaustive" by timing every candidate (default: the
                      TRITONCONV_AUTOTUNE environment variable, else "fast").
    """

    enabled: bool = True
    input_precision: str = "auto"
    algorithm: str = "auto"
    channels_last: bool = True
    verbose: bool = False
    inner: str = "inductor"
    fusion: bool = True
    cudagraphs: bool = True
    autotune: str = dataclasses.field(default_factory=lambda: os.environ.get("TRITONCONV_AUTOTUNE", "fast"))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        """Our options from `options`; any other name is an error (see split_options for Inductor's)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ValueError(f"tritonconv: unknown option(s) {unknown}; valid options are {cls.names()} "
                             "(and, with inner='inductor', torch._inductor.config settings)")
        parsed = cls(**options)
        parsed._validate()
        return parsed

    @classmethod
    def names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    def _validate(self) -> None:
        for name in ("enabled", "channels_last", "verbose", "fusion", "cudagraphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"tritonconv: option {name!r} must be a bool, got {getattr(self, name)!r}")
        if self.input_precision not in PRECISIONS:
            raise ValueError(f"tritonconv: option 'input_precision' must be one of {PRECISIONS}, "
                             f"got {self.input_precision!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"tritonconv: option 'algorithm' must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.inner not in INNER_COMPILERS:
            raise ValueError(f"tritonconv: option 'inner' must be one of {INNER_COMPILERS}, got {self.inner!r}")
        if self.autotune not in AUTOTUNE_LEVELS:
            raise ValueError(f"tritonconv: option 'autotune' must be one of {AUTOTUNE_LEVELS}, got {self.autotune!r}")


def split_options(options: Mapping[str, Any] | None) -> tuple:
    """(our options, the rest): the rest are Inductor settings, as torch.compile(options=...) takes them for
    its default backend; the backend hands them to Inductor, which rejects names it does not know."""
    from torch._inductor import list_options

    options = dict(options or {})
    ours = {k: v for k, v in options.items() if k in BackendOptions.names()}
    rest = {k: v for k, v in options.items() if k not in ours}
    unknown = sorted(k for k in rest if k.replace("-", "_") not in list_options())
    if unknown:
        raise ValueError(f"tritonconv: unknown option(s) {unknown}; valid options are {BackendOptions.names()} "
                         "and the settings of torch._inductor.config (torch._inductor.list_options())")
    return BackendOptions.from_mapping(ours), rest
