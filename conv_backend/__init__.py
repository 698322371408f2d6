"""tritonconv: a torch.compile backend that runs 2D convolutions on Triton kernels.

    model = torch.compile(model, backend="tritonconv", options={"input_precision": "ieee"})

Unsupported convolutions stay on ATen; `explain()` and `last_report()` say which and why.
"""
from .backend import explain, tritonconv_backend
from .graph_pass import replace_convolutions
from .ops import conv2d
from .options import ALGORITHMS, PRECISIONS, BackendOptions
from .report import ConvDecision, Report, last_report

__all__ = [
    "ALGORITHMS", "PRECISIONS", "BackendOptions", "ConvDecision", "Report", "conv2d", "explain",
    "last_report", "replace_convolutions", "tritonconv_backend",
]
__version__ = "0.1.0"
