"""Backend options, as passed through `torch.compile(..., options={...})`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PRECISIONS = ("auto", "tf32", "tf32x3", "ieee")
ALGORITHMS = ("auto", "gemm", "gemm_tma", "gemm_pointer", "gemm_nchw", "depthwise", "seed")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Every option the backend takes.

    enabled:          replace supported convolutions (False keeps every one on ATen).
    input_precision:  fp32 math: "auto" follows cuDNN's TF32 setting at run time (torch.backends.cudnn), using
                      TF32 in compute-bound layers and "tf32x3" elsewhere (runtime.choose_fp32_precision);
                      "tf32" forces TF32, "tf32x3" three TF32 products (about fp32's accuracy), "ieee" exact fp32.
    algorithm:        "auto" picks per problem; "gemm" is the implicit GEMM (TMA where it
                      applies), "gemm_tma" / "gemm_pointer" force one of its load paths,
                      "gemm_nchw" its kernel that reads and writes NCHW in place,
                      "depthwise" the direct depthwise kernel, "seed" the baseline kernel.
                      A forced algorithm that cannot take a convolution leaves it on ATen.
    channels_last:    keep activations channels_last between replaced convolutions
                      (through batch norm, pooling and adds too in inference graphs;
                      graph outputs keep eager's strides).
    verbose:          log every decision at INFO instead of DEBUG.
    """

    enabled: bool = True
    input_precision: str = "auto"
    algorithm: str = "auto"
    channels_last: bool = True
    verbose: bool = False

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"tritonconv: unknown option(s) {unknown}; valid options are {valid}")
        parsed = cls(**options)
        parsed._validate()
        return parsed

    def _validate(self) -> None:
        for name in ("enabled", "channels_last", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"tritonconv: option {name!r} must be a bool, got {getattr(self, name)!r}")
        if self.input_precision not in PRECISIONS:
            raise ValueError(f"tritonconv: option 'input_precision' must be one of {PRECISIONS}, "
                             f"got {self.input_precision!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"tritonconv: option 'algorithm' must be one of {ALGORITHMS}, got {self.algorithm!r}")
