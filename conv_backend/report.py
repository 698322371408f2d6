"""What the backend did with every convolution it saw, for people and for tests."""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

log = logging.getLogger("conv_backend")


def _register_with_torch_logging() -> None:
    """Name our logger "tritonconv" in torch._logging, for torch._logging.set_logs(modules=...).

    TORCH_LOGS is parsed when torch is imported, before this runs, so from the
    environment use the module name: TORCH_LOGS="+conv_backend".
    """
    try:
        from torch._logging import _internal
        _internal.register_log("tritonconv", "conv_backend")
    except Exception:  # private API: without it plain Python logging still works
        pass


_register_with_torch_logging()


def _fmt_shape(shape) -> str:
    """2x3x224x224; a symbolic size (dynamic shapes) is bracketed: 2x3x[s0]x[s1]."""
    if shape is None:
        return "?"
    return "x".join(str(s) if str(s).isdigit() else f"[{str(s).replace(' ', '')}]" for s in shape)


@dataclasses.dataclass
class ConvDecision:
    """One convolution node: replaced by our op, or kept on ATen and why."""

    graph: str
    node: str
    replaced: bool
    reason: str = ""
    input_shape: Optional[tuple] = None
    weight_shape: Optional[tuple] = None
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    dtype: str = ""
    device: str = ""
    algorithm: str = ""
    epilogue: str = ""  # the ops fused into the convolution's kernel, e.g. "bn+add+relu"

    def describe(self) -> str:
        what = (f"{self.graph}/{self.node}: in {_fmt_shape(self.input_shape)} w {_fmt_shape(self.weight_shape)} "
                f"s{list(self.stride)} p{list(self.padding)} d{list(self.dilation)} g{self.groups} "
                f"{self.dtype} {self.device}")
        if self.replaced:
            fused = f" + {self.epilogue}" if self.epilogue else ""
            return f"{what} -> tritonconv::conv2d{fused} ({self.kernel_choice()})"
        return f"{what} -> ATen: {self.reason}"

    def kernel_choice(self) -> str:
        """The kernel and config the tuner chose for this problem, once it has run."""
        from .tuning import chosen_kernels
        choices = chosen_kernels(self.input_shape, self.weight_shape, self.stride, self.padding,
                                 self.dilation, self.groups, self.dtype)
        if not choices:
            return f"algorithm={self.algorithm}, chosen at first run"
        return "; ".join(sorted(set(choices)))


@dataclasses.dataclass
class Report:
    """All decisions of one compilation (forward, backward and inference graphs)."""

    decisions: list = dataclasses.field(default_factory=list)
    cuda_graphs: bool = False  # the backend turned on Inductor's CUDA graphs for a graph (options.cudagraphs)

    @property
    def replaced(self) -> list:
        return [d for d in self.decisions if d.replaced]

    @property
    def kept(self) -> list:
        return [d for d in self.decisions if not d.replaced]

    def add(self, decision: ConvDecision, verbose: bool = False) -> None:
        self.decisions.append(decision)
        log.log(logging.INFO if verbose else logging.DEBUG, "%s", decision.describe())

    def extend(self, other: "Report") -> None:
        self.decisions.extend(other.decisions)
        self.cuda_graphs = self.cuda_graphs or other.cuda_graphs

    def __str__(self) -> str:
        lines = [f"tritonconv report: {len(self.decisions)} convolution node(s), "
                 f"{len(self.replaced)} on Triton, {len(self.kept)} on ATen"
                 + ("; CUDA graphs on for its inference graphs (options cudagraphs)" if self.cuda_graphs else "")]
        lines += ["  " + d.describe() for d in self.decisions]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"decisions": [dataclasses.asdict(d) for d in self.decisions], "cuda_graphs": self.cuda_graphs}


_last_report: Optional[Report] = None


def set_last_report(report: Report) -> None:
    global _last_report
    _last_report = report


def last_report() -> Optional[Report]:
    """The report of the most recent graph compiled by the tritonconv backend."""
    return _last_report
