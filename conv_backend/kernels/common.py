"""Pieces shared by the GEMM-style kernels."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ..epilogue import IDENTITY, NO_TENSORS
from ..runtime import interpreter_enabled
from ..tuning import compiling_only, problem_signature, select
from .epilogue_tl import check_tensors, epilogue_key, round_to_tf32

try:  # Gluon ships with Triton >= 3.4; the Hopper kernels written in it (halo.py, warp_specialized.py) import
    # it from here, and without it (gluon is None) they are simply not offered.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = GluonTensorDescriptor = None

INT32_MAX = 2**31 - 1


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST computes in fp32: Triton's CPU interpreter multiplies
    bfloat16 dot operands as raw integer bits, so tests on CPU need it; GPUs never do.
    "tf32_round" is TF32 on operands rounded to the nearest TF32 value (round_to_tf32)."""
    # One branch per case, no early returns: Triton's compiler (not its interpreter) also builds the code
    # after a returning constexpr branch, and would reject input_precision="tf32_round" there.
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif INPUT_PRECISION == "tf32_round":
        acc = tl.dot(round_to_tf32(a), round_to_tf32(b), acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def tile_origin(tile, OH, OW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(map, first output row, first output column) of pixel tile `tile` of BLOCK_H x BLOCK_W pixels:
    tiles run along W, then H, then from one map to the next."""
    tiles_w = tl.cdiv(OW, BLOCK_W)
    tiles_hw = tl.cdiv(OH, BLOCK_H) * tiles_w
    return tile // tiles_hw, (tile % tiles_hw) // tiles_w * BLOCK_H, (tile % tiles_w) * BLOCK_W


if gluon is not None:
    @gluon.jit
    def gluon_tile_origin(t, num_pid_n, OH, OW, BLOCK_B: gl.constexpr, BLOCK_H: gl.constexpr,
                          BLOCK_W: gl.constexpr, BLOCK_N: gl.constexpr):
        """tile_origin for the Gluon kernels, which cannot call a `tl` function: (first image, first output
        row, first output column, first output channel) of tile t, whose num_pid_n channel tiles of one
        pixel box come one after another (they share the input in L2); a box spans BLOCK_B images."""
        box = t // num_pid_n
        tiles_w = gl.cdiv(OW, BLOCK_W)
        tiles_hw = gl.cdiv(OH, BLOCK_H) * tiles_w
        return (box // tiles_hw * BLOCK_B, (box % tiles_hw) // tiles_w * BLOCK_H, (box % tiles_w) * BLOCK_W,
                (t % num_pid_n) * BLOCK_N)


def fit_box(bb: int, bh: int, bw: int, batch: int, out_h: int, out_w: int) -> tuple:
    """A BLOCK_B x BLOCK_H x BLOCK_W pixel box fitted to the maps, keeping its pixel count where it can: a
    narrow map gets a taller box, and a map smaller than that box gets several images per box."""
    pixels = bb * bh * bw
    bw = min(bw, max(8, triton.next_power_of_2(out_w)))
    bh = min(pixels // (bb * bw), max(1, triton.next_power_of_2(out_h)))
    bb = min(pixels // (bh * bw), max(1, triton.next_power_of_2(batch)))
    return bb, bh, bw


def needs_dot_upcast(dtype: torch.dtype) -> bool:
    return interpreter_enabled() and dtype == torch.bfloat16


def box_row_channels(channels: int, dtype: torch.dtype) -> int:
    """Channels per row of a TMA box: one 128-byte swizzle row, or, where the channels take less, all of
    them rounded up to a power of two and at least 16 (the copy engine zero-fills past the last)."""
    elem = dtype.itemsize
    return min(128 // elem, max(16, triton.next_power_of_2(channels)))


def strided_input_view(n: int, in_h: int, in_w: int, c: int, stride) -> tuple:
    """(shape, strides) of a dense NHWC input read as [N, H/sh, sh, W/sw, sw*C], as the TMA and warp-specialized
    kernels' boxes read it: input row ih = sh*q + r is (q, r), so the rows that consecutive output rows read at
    one tap are consecutive q; along W the phase r selects a run of C channels. At stride 1 it is NHWC with a
    unit axis. The strides must divide H and W (tma_reason)."""
    sh, sw = stride
    return [n, in_h // sh, sh, in_w // sw, sw * c], [in_h * in_w * c, sh * in_w * c, in_w * c, sw * c, 1]


def gluon_sm90_reason(has_gluon: bool, x, stride, groups, input_precision, any_stride: bool = False) -> str | None:
    """Why the Gluon kernels for Hopper (groups 1, stride 1 unless `any_stride`, TF32 or 16-bit operands) can't
    take this convolution, or None; each kernel adds its own conditions."""
    if not has_gluon:
        return "this Triton has no Gluon"
    if interpreter_enabled() or x.device.type != "cuda":
        return "Gluon kernels run on CUDA devices only (not in the interpreter)"
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return "warpgroup MMA needs compute capability 9.x (Hopper)"
    if groups != 1:
        return "groups 1 only"
    if tuple(stride) != (1, 1) and not any_stride:
        return "stride 1 only"
    if x.dtype == torch.float32 and input_precision != "tf32":
        return f"fp32 math {input_precision!r} (wgmma multiplies fp32 as TF32 only)"
    return None


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset of any tensor can pass int32."""
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if span > INT32_MAX:
            return True
    return False


def tuned_plan(kind: str, x, weight, bias, y, stride, padding, dilation, groups, candidates, make, extra_key="",
               epilogue=IDENTITY, epi=NO_TENSORS):
    """Choose among `candidates` for this problem (timing them into `y`); return
    run(x, weight, bias, epi=NO_TENSORS) -> y.

    `make(candidate)` returns launch(x, weight, bias, out, epi). The tuning key holds
    everything a launch depends on: shapes and strides of the operands and of the
    output, the convolution's arguments, dtype, bias, the fused epilogue (with the
    residual's strides; epilogue_tl.epilogue_key) and what the caller adds. `epi`
    holds example tensors of the epilogue, which the timing runs read.
    """
    key = (f"{kind}|x{tuple(x.shape)}{tuple(x.stride())}|w{tuple(weight.shape)}{tuple(weight.stride())}"
           f"|y{tuple(y.stride())}|s{tuple(stride)}p{tuple(padding)}d{tuple(dilation)}g{groups}|{x.dtype}"
           f"|b{bias is not None}|{extra_key}")
    if not epilogue.is_identity:  # unfused keys stay as they were
        check_tensors(epilogue, epi, y)
        key += f"|{epilogue_key(epilogue, epi)}"
    signature = problem_signature(x.shape, weight.shape, stride, padding, dilation, groups, x.dtype)
    launch = make(select(key, signature, x.device, candidates,
                         lambda cand: functools.partial(make(cand), x, weight, bias, y, epi)))
    y_size, y_stride = tuple(y.shape), y.stride()

    def run(x, weight, bias, epi=NO_TENSORS):
        out = torch.empty_strided(y_size, y_stride, dtype=x.dtype, device=x.device)
        launch(x, weight, bias, out, epi)
        return out
    return run


def _hook_active(hook) -> bool:
    """Triton keeps launch hooks as None or, in newer versions, as a chain that may be empty."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _launch_hooks_set() -> bool:
    """Whether a profiler (e.g. Triton's proton) hooks launches; the JIT path then runs its hooks."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime is not None and (_hook_active(getattr(runtime, "launch_enter_hook", None))
                                    or _hook_active(getattr(runtime, "launch_exit_hook", None)))


def _current_device() -> int:
    return triton.runtime.driver.active.get_current_device()


def _current_stream(device: int):
    return triton.runtime.driver.active.get_current_stream(device)


class KernelLauncher:
    """One Triton kernel with its grid, trailing scalars and constexprs fixed; call it with the leading arguments.

    The first call goes through the JIT, which compiles (or finds) the kernel
    specialized for these arguments. Later calls hand the compiled kernel
    straight to its launcher and skip the JIT's per-call argument binding and
    cache lookup, which dominates the host cost of a launch on small problems.
    That is sound because everything the JIT specializes on is fixed per
    launcher: the scalars and constexprs here, and the pointers' 16-byte
    alignment, which is part of every plan's key (dispatch.py).
    """

    def __init__(self, kernel, grid, scalars=(), **meta):
        self.kernel, self.grid, self.scalars, self.meta = kernel, tuple(grid), tuple(scalars), meta
        self._direct = None  # (run, grid, function, metadata, device, constexpr values) once compiled

    def __call__(self, *leading):
        args = leading + self.scalars
        if compiling_only.get():  # the tuner compiles ahead (tuning._compile_ahead): no launch
            self.kernel.warmup(*args, grid=self.grid, **self.meta)
            return
        direct = self._direct
        if direct is not None and not _launch_hooks_set():
            run, grid, function, metadata, device, constexprs = direct
            run(*grid, _current_stream(device), function, metadata, None, None, None, *args, *constexprs)
            return
        compiled = self.kernel[self.grid](*args, **self.meta)
        if direct is None:
            self._direct = self._adopt(compiled, len(args))

    def _adopt(self, compiled, n_args: int):
        """The direct-launch state for `compiled`, or None where only the JIT path can launch it
        (the interpreter, or a Triton whose compiled kernels lack this interface)."""
        names = getattr(self.kernel, "arg_names", None)
        if interpreter_enabled() or names is None or not all(
                hasattr(compiled, attr) for attr in ("run", "function", "packed_metadata")):
            return None
        try:
            constexprs = tuple(self.meta[name] for name in names[n_args:])
        except KeyError:  # a parameter left to its default: only the JIT knows its value
            return None
        grid = (self.grid + (1, 1))[:3]
        return compiled.run, grid, compiled.function, compiled.packed_metadata, _current_device(), constexprs


def packed_weight(weight: torch.Tensor, block_k: int) -> torch.Tensor:
    """Weight as [OC, KH*KW*CPAD], channels innermost, each tap padded with zeros to a multiple of BLOCK_K.

    A channels_last weight whose channel count is a multiple of BLOCK_K is read in place: the result
    shares its memory but is not a view of it, so holding the result does not keep the weight object
    (a model's parameter) alive.
    """
    oc, cg, kh, kw = weight.shape
    cpad = triton.cdiv(cg, block_k) * block_k
    if cpad == cg:
        packed = weight.permute(0, 2, 3, 1).contiguous()
        if packed.data_ptr() != weight.data_ptr():
            return packed.view(oc, kh * kw * cg)  # a copy
        if packed.data_ptr() % 16:
            return packed.reshape(oc, kh * kw * cg).clone()  # TMA needs a 16-byte aligned base
        return packed.new_empty(0).set_(packed.untyped_storage(), packed.storage_offset(), (oc, kh * kw * cg),
                                        (kh * kw * cg, 1))
    packed = weight.new_zeros((oc, kh, kw, cpad))
    packed[..., :cg] = weight.permute(0, 2, 3, 1)
    return packed.view(oc, kh * kw * cpad)


class WeightDescriptors:
    """`descriptor(weight)`: the TMA descriptor of a weight as [OC, KH*KW*CPAD], made by `make(packed)`.

    A weight read in place keeps its descriptor for as long as the weight lives: layers
    of one shape share a plan, so it is kept per weight tensor, in a dict whose keys are
    held weakly (a plan outlives the models it served and must not keep their weights
    alive), and rebuilt when the weight's memory moved (`param.data = ...`). A weight
    that needs repacking is repacked on every call: its values may have changed.
    """

    def __init__(self, block_k: int, make):
        self.block_k, self.make = block_k, make
        self._in_place = WeakIdKeyDictionary()

    def __call__(self, weight: torch.Tensor):
        cached = self._in_place.get(weight)
        if cached is not None and cached[0] == weight.data_ptr():
            return cached[1]
        packed = packed_weight(weight, self.block_k)
        desc = self.make(packed)
        if packed.data_ptr() == weight.data_ptr():
            self._in_place[weight] = (weight.data_ptr(), desc)
        return desc


def gluon_dtype(dtype: torch.dtype):
    """The Gluon element type of a torch dtype."""
    return getattr(gl, str(dtype).removeprefix("torch."))


def gluon_weight_descriptors(weight_shape, dtype: torch.dtype, block_n: int, block_k: int) -> WeightDescriptors:
    """WeightDescriptors for the Gluon kernels: the weight packed as [OC, KH*KW*CPAD], read in
    [block_n, block_k] boxes in the default NVMMA shared layout."""
    oc, c, kernel_h, kernel_w = weight_shape
    row = kernel_h * kernel_w * triton.cdiv(c, block_k) * block_k
    box = [block_n, block_k]
    layout = gl.NVMMASharedLayout.get_default_for(box, gluon_dtype(dtype))
    return WeightDescriptors(block_k, lambda packed: GluonTensorDescriptor(packed, [oc, row], [row, 1], box, layout))
