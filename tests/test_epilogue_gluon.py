"""Host-side rules of the Gluon kernels' fused epilogue (epilogue_gluon.py), on any machine. The kernels'
code is compiled for sm_90 in test_warp_specialized.py and run on a Hopper GPU in test_gluon_epilogue_cuda.py."""
from __future__ import annotations

import pytest
import torch

import conv_backend.kernels.epilogue_gluon as eg
import conv_backend.kernels.warp_specialized as ws
from conv_backend.epilogue import ACTIVATIONS, IDENTITY, Epilogue, EpilogueTensors
from conv_backend.tuning import Candidate

needs_gluon = pytest.mark.skipif(eg.gluon is None, reason="this Triton has no Gluon")


def test_flat_residual_strides():
    """A 1x1 problem into a dense channels_last output is one row of N*H*W pixels: a residual follows only
    where its pixel p = (n*H + h)*W + w sits at p*s for one s."""
    shape = (2, 8, 3, 5)
    dense = torch.empty(shape).to(memory_format=torch.channels_last)
    assert eg.flat_residual_strides(shape, dense.stride()) == (0, 1, 0, 8)
    # A channel slice of a wider channels_last tensor: pixels 16 elements apart, channels still 1.
    wide = torch.empty(2, 16, 3, 5).to(memory_format=torch.channels_last)[:, 4:12]
    assert eg.flat_residual_strides(shape, wide.stride()) == (0, 1, 0, 16)
    # NCHW: pixels are 1 apart within a plane, but images are C planes apart.
    assert eg.flat_residual_strides(shape, torch.empty(shape).stride()) is None
    # A column slice breaks the spacing of rows.
    cols = torch.empty(2, 8, 3, 7).to(memory_format=torch.channels_last)[..., :5]
    assert eg.flat_residual_strides(shape, cols.stride()) is None
    # Size-1 axes may carry any stride; one image of NCHW with one row is one run of pixels.
    assert eg.flat_residual_strides((1, 8, 1, 5), (999, 5, 777, 1)) == (0, 5, 0, 1)
    # A residual broadcast across pixels (stride 0) is evenly spaced too.
    assert eg.flat_residual_strides(shape, (0, 1, 0, 0)) == (0, 1, 0, 0)


def test_residual_needs_int64():
    assert not eg.residual_needs_int64((2, 8, 3, 5), (120, 15, 5, 1))
    assert eg.residual_needs_int64((2, 8, 3, 5), (2**31, 15, 5, 1))


def test_epilogue_pointers_stand_in_the_output_for_steps_that_are_off():
    y = torch.empty(2, 4, 3, 3)
    assert all(t is y for t in eg.epilogue_pointers(IDENTITY, EpilogueTensors(), y))
    residual = torch.randn(2, 4, 3, 3)
    got = eg.epilogue_pointers(Epilogue(residual=True), EpilogueTensors(residual=residual), y)
    assert all(t is y for t in got[:4]) and got[4] is residual
    # Batch-norm vectors are read by channel index: a strided one arrives as a contiguous copy of its values.
    strided = torch.randn(8)[::2]
    vectors = EpilogueTensors(strided, torch.rand(4), torch.randn(4), torch.randn(4))
    got = eg.epilogue_pointers(Epilogue(batch_norm=True, bn_eps=1e-5), vectors, y)
    assert got[0].is_contiguous() and torch.equal(got[0], strided) and got[1] is vectors.bn_var and got[4] is y


def test_epilogue_pointers_refuse_missing_tensors():
    y = torch.empty(2, 4, 3, 3)
    with pytest.raises(ValueError, match="bn_mean"):
        eg.epilogue_pointers(Epilogue(batch_norm=True), EpilogueTensors(bn_mean=torch.zeros(4)), y)
    with pytest.raises(ValueError, match="residual"):
        eg.epilogue_pointers(Epilogue(residual=True), EpilogueTensors(), y)


def test_kernel_arguments_of_an_epilogue():
    epilogue = Epilogue(batch_norm=True, bn_eps=1e-3, residual=True, activation="hardtanh",
                        activation_params=(-1, 2))
    assert eg.epilogue_constexprs(epilogue) == dict(HAS_BN=True, HAS_RESIDUAL=True, ACTIVATION="hardtanh",
                                                    ROUND_TF32=False)
    assert eg.epilogue_scalars(epilogue) == (1e-3, -1.0, 2.0)
    assert eg.epilogue_constexprs(IDENTITY) == dict(HAS_BN=False, HAS_RESIDUAL=False, ACTIVATION="none",
                                                    ROUND_TF32=False)
    rounded = eg.epilogue_constexprs(Epilogue(activation="relu", round_tf32=True))
    assert rounded == dict(HAS_BN=False, HAS_RESIDUAL=False, ACTIVATION="relu", ROUND_TF32=True)


@needs_gluon
def test_gluon_takes_every_activation():
    """Gluon has exp, erf and rsqrt, and reaches libdevice's tanh: every activation fuses (Triton 3.6 and 3.8)."""
    for activation, count in ACTIVATIONS.items():
        assert eg.gluon_takes_epilogue(Epilogue(activation=activation, activation_params=(0.5,) * count))


def test_gluon_takes_nothing_without_gluon(monkeypatch):
    monkeypatch.setattr(eg, "gluon", None)
    assert not eg.gluon_takes_epilogue(IDENTITY)


@needs_gluon
def test_flat_problem_refuses_a_residual_it_cannot_follow():
    """The warp-specialized kernel sees a 1x1 convolution into channels_last as one row of all pixels; a
    residual whose pixels are not evenly spaced (NCHW) cannot follow that row: a clear error, not a wrong
    answer."""
    cand = Candidate.make("igemm_ws", 4, 4, BLOCK_B=1, BLOCK_H=1, BLOCK_W=128, BLOCK_N=64, BLOCK_K=32,
                          CONSUMERS=1, PIXELS_AS_N=False, SPLIT_TILE=False)
    y = torch.empty(2, 64, 5, 7).to(memory_format=torch.channels_last)
    flags = dict(HAS_BIAS=False, USE_INT64=False, bias_stride=0, epilogue=Epilogue(residual=True),
                 residual_strides=torch.empty(2, 64, 5, 7).stride())
    with pytest.raises(ValueError, match="evenly spaced"):
        ws.ws_launcher(cand, (1, 1, 70, 1, 70), torch.empty(64, 32, 1, 1), y, (1, 1), (0, 0), (1, 1), flags)


def test_one_kernel_launcher_per_alignment_of_the_epilogue_tensors():
    """A launcher launches what the JIT specialized on its first call, 16-byte alignment included: a residual
    that is an offset view on a later call must not reuse a kernel specialized for an aligned one."""
    made = []
    kernel_for = eg.by_alignment(lambda: made.append(object()) or made[-1])
    base = torch.empty(64)
    aligned, offset = (base, base, base, base, base[:32]), (base, base, base, base, base[1:33])
    first = kernel_for(aligned)
    assert kernel_for(offset) is not first and kernel_for(aligned) is first and len(made) == 2


@needs_gluon
def test_launchers_refuse_an_activation_this_gluon_cannot_compute(monkeypatch):
    """Without libdevice's tanh, tanh and gelu_tanh are not fused (gluon_takes_epilogue, which the candidate
    offer asks), and a launcher asked for one anyway says so instead of failing to compile."""
    monkeypatch.setattr(eg, "libdevice", None)
    assert not eg.gluon_takes_epilogue(Epilogue(activation="tanh"))
    assert not eg.gluon_takes_epilogue(Epilogue(activation="gelu_tanh"))
    assert eg.gluon_takes_epilogue(Epilogue(activation="gelu")) and eg.gluon_takes_epilogue(IDENTITY)
    cand = Candidate.make("igemm_ws", 4, 4, BLOCK_B=1, BLOCK_H=8, BLOCK_W=8, BLOCK_N=64, BLOCK_K=32,
                          CONSUMERS=1, PIXELS_AS_N=False, SPLIT_TILE=False)
    flags = dict(HAS_BIAS=False, USE_INT64=False, bias_stride=0, epilogue=Epilogue(activation="tanh"))
    with pytest.raises(ValueError, match="cannot fuse tanh"):
        ws.ws_launcher(cand, (2, 9, 9, 9, 9), torch.empty(64, 32, 3, 3), torch.empty(2, 64, 9, 9), (1, 1), (1, 1),
                       (1, 1), flags)


def test_epilogue_pointers_refuse_a_residual_unlike_the_planned_one():
    """The residual's strides are kernel scalars fixed when the launch is built: a call whose residual has
    other strides (or another shape) gets a clear error, not reads at the wrong places."""
    y = torch.empty(1, 4, 3, 3)
    epilogue = Epilogue(residual=True)
    planned = torch.empty(1, 4, 3, 3).stride()
    eg.epilogue_pointers(epilogue, EpilogueTensors(residual=torch.randn(1, 4, 3, 3)), y, planned)
    # A size-1 axis may carry any stride.
    eg.epilogue_pointers(epilogue, EpilogueTensors(residual=torch.randn(4, 3, 3).unsqueeze(0).expand(1, 4, 3, 3)),
                         y, (0,) + planned[1:])
    with pytest.raises(ValueError, match="strides"):
        other = torch.randn(1, 4, 3, 3).to(memory_format=torch.channels_last)
        eg.epilogue_pointers(epilogue, EpilogueTensors(residual=other), y, planned)
    with pytest.raises(ValueError, match="shape"):
        eg.epilogue_pointers(epilogue, EpilogueTensors(residual=torch.randn(1, 4, 3, 4)), y, planned)


def test_same_strides():
    """Where the residual's strides are the output's, the kernels reuse the store's offsets for it."""
    shape = (1, 4, 3, 3)
    nchw, nhwc = torch.empty(shape).stride(), torch.empty(shape).to(memory_format=torch.channels_last).stride()
    assert eg.same_strides(shape, nchw, nchw) and not eg.same_strides(shape, nchw, nhwc)
    assert eg.same_strides(shape, (999,) + nchw[1:], nchw)  # a size-1 axis may carry any stride
