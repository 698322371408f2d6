"""What a fused convolution does to its output after the multiply, and the ATen reference for it.

The graph pass folds the ops that follow a convolution into the convolution's
kernel when each intermediate has no other use, so the activation is written
once instead of once per op. The order is fixed, the one networks use:

    y = activation((acc + bias - mean) * rsqrt(var + eps) * bn_weight + bn_bias + residual)

every step optional and computed in fp32 on the accumulator, then cast to the
output dtype once. An fp32 output that a TF32 convolution reads next can be
stored rounded to the nearest TF32 value (`round_tf32`, see conv_backend.tf32).
Batch norm reads the live running statistics and affine parameters on every
call (never values folded at compile time), so a user who changes weights or
statistics after compiling gets the new answer, also under CUDA-graph replay. The residual is any tensor of the output's shape and dtype,
in any strides.

`Epilogue` is the static part (a plan's key and the kernels' constexprs);
`EpilogueTensors` the tensors a call passes.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Activation name -> number of float parameters it takes (the order is that of the ATen op).
ACTIVATIONS = {
    "none": 0,
    "relu": 0,
    "hardtanh": 2,      # (min_val, max_val); ReLU6 is hardtanh(0, 6)
    "leaky_relu": 1,    # (negative_slope,)
    "silu": 0,
    "gelu": 0,          # erf form
    "gelu_tanh": 0,     # tanh approximation
    "hardswish": 0,
    "hardsigmoid": 0,
    "sigmoid": 0,
    "tanh": 0,
}


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """The static description of a fused epilogue (see the module docstring for the order)."""

    batch_norm: bool = False
    bn_eps: float = 0.0
    residual: bool = False
    activation: str = "none"
    activation_params: tuple = ()
    round_tf32: bool = False  # store the (fp32) result rounded to the nearest TF32 value

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"tritonconv: activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        params = tuple(float(p) for p in self.activation_params)
        if len(params) != ACTIVATIONS[self.activation]:
            raise ValueError(f"tritonconv: activation {self.activation!r} takes {ACTIVATIONS[self.activation]} "
                             f"parameter(s), got {list(self.activation_params)}")
        object.__setattr__(self, "activation_params", params)
        object.__setattr__(self, "bn_eps", float(self.bn_eps))

    @property
    def is_identity(self) -> bool:
        return not self.batch_norm and not self.residual and self.activation == "none" and not self.round_tf32

    @property
    def param0(self) -> float:
        """First activation parameter (0.0 where there is none): leaky_relu's slope, hardtanh's min."""
        return self.activation_params[0] if self.activation_params else 0.0

    @property
    def param1(self) -> float:
        """Second activation parameter (0.0 where there is none): hardtanh's max."""
        return self.activation_params[1] if len(self.activation_params) > 1 else 0.0

    def describe(self) -> str:
        steps = (["bn"] if self.batch_norm else []) + (["add"] if self.residual else []) + (
            [self.activation] if self.activation != "none" else []) + (["tf32"] if self.round_tf32 else [])
        return "+".join(steps)


IDENTITY = Epilogue()


class EpilogueTensors(NamedTuple):
    """The tensors an epilogue reads on each call (None where its step is off)."""

    bn_mean: Optional[Tensor] = None
    bn_var: Optional[Tensor] = None
    bn_weight: Optional[Tensor] = None
    bn_bias: Optional[Tensor] = None
    residual: Optional[Tensor] = None


NO_TENSORS = EpilogueTensors()


def activation_reference(y: Tensor, activation: str, params: tuple = ()) -> Tensor:
    """The activation through ATen (the same functions eager runs)."""
    if activation == "none":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "hardtanh":
        return F.hardtanh(y, *params)
    if activation == "leaky_relu":
        return F.leaky_relu(y, *params)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "hardswish":
        return F.hardswish(y)
    if activation == "hardsigmoid":
        return F.hardsigmoid(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "tanh":
        return torch.tanh(y)
    raise ValueError(f"tritonconv: unknown activation {activation!r}")


def apply_reference(y: Tensor, epilogue: Epilogue, tensors: EpilogueTensors) -> Tensor:
    """The epilogue on a convolution's output `y` (bias already added) through ATen ops, in y's dtype
    or wider: the ATen fallback of a fused op, and the tests' reference."""
    if epilogue.batch_norm:
        shape = (1, -1, 1, 1)
        inv = torch.rsqrt(tensors.bn_var.to(y.dtype) + epilogue.bn_eps)
        y = (y - tensors.bn_mean.to(y.dtype).view(shape)) * (inv * tensors.bn_weight.to(y.dtype)).view(shape) \
            + tensors.bn_bias.to(y.dtype).view(shape)
    if epilogue.residual:
        y = y + tensors.residual.to(y.dtype)
    y = activation_reference(y, epilogue.activation, epilogue.activation_params)
    return round_to_tf32(y) if epilogue.round_tf32 else y


TF32_DROPPED_BITS = 13  # fp32 keeps 23 mantissa bits, TF32 10
TF32_HALF_ULP = 1 << (TF32_DROPPED_BITS - 1)
TF32_MASK = -(1 << TF32_DROPPED_BITS)  # 0xFFFFE000 as an int32


def round_to_tf32(y: Tensor) -> Tensor:
    """y's values as fp32 rounded to the nearest TF32 value (ties away from zero, as cuDNN's cvt.rna and the
    kernels' round_to_tf32 do), returned in y's dtype. NaNs are kept as they are: adding half an ulp to the
    GPU's canonical NaN (0x7FFFFFFF) would carry into the sign bit and leave -0.0."""
    y32 = y.float()
    rounded = ((y32.view(torch.int32) + TF32_HALF_ULP) & TF32_MASK).view(torch.float32)
    return torch.where(torch.isnan(y32), y32, rounded).to(y.dtype)
