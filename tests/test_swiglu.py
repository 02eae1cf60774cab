"""kernels/swiglu.py against kernels/reference.py: output and both gradients.

fp32 is checked with the fp32 tolerance against the fp32 reference; fp16 / bf16 with the
FlashAttention rule against the reference run on the same values upcast to fp32. No tl.dot, so
bf16 runs in the interpreter too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_close, assert_fa_rule

from kernels.reference import swiglu_ref
from kernels.swiglu import SwiGLUFunction, swiglu

SHAPES = [
    pytest.param((1, 1), id="row1_f1"),
    pytest.param((5, 1), id="rows5_f1"),
    pytest.param((1, 7, 96), id="b1_t7_f96"),
    pytest.param((2, 3, 1000), id="b2_t3_f1000"),
    pytest.param((3, 4097), id="rows3_f4097"),  # two column blocks, ragged tail
    pytest.param((2, 1, 11008), id="b2_t1_f11008"),
]


def _run(fn, gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor):
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(g, u)
    dg, du = torch.autograd.grad(out, [g, u], dy)
    return [out.detach(), dg, du]


def _compare(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> None:
    exact = all(t.dtype == torch.float32 for t in (gate, up, dy))
    got = _run(swiglu, gate, up, dy)
    lp = _run(swiglu_ref, gate, up, dy)
    hp = _run(swiglu_ref, gate.float(), up.float(), dy.float())
    for o, l, h, name in zip(got, lp, hp, ("out", "grad_gate", "grad_up")):
        assert o.dtype == l.dtype and o.shape == l.shape, f"{name}: {o.dtype} {o.shape} vs {l.dtype} {l.shape}"
        if exact:
            assert_close(o, h, name=name)
        else:
            assert_fa_rule(o, l, h, name=name)


def _randn(shape, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    # gate spans the sigmoid's saturated tails as well as its middle.
    _compare(_randn(shape, gen, dtype, 3.0), _randn(shape, gen, dtype), _randn(shape, gen, dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_extreme_gates(dtype):
    # exp(-gate) overflows for very negative gates: silu -> 0 and its gradient -> 0, never NaN.
    gen = torch.Generator().manual_seed(1)
    gate = torch.tensor([-1e4, -200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0], device=DEVICE)
    gate = gate.repeat(3, 1).to(dtype)
    up, dy = _randn(gate.shape, gen, dtype), _randn(gate.shape, gen, dtype)
    out, dg, du = _run(swiglu, gate, up, dy)
    assert torch.isfinite(out).all() and torch.isfinite(dg).all() and torch.isfinite(du).all()
    _compare(gate, up, dy)


def test_swiglu_strided_halves_of_fused_projection():
    # gate and up as the two halves of one fused w13 output: strided rows, no copy needed.
    gen = torch.Generator().manual_seed(2)
    h = _randn((2, 5, 2 * 48), gen, torch.float32, 2.0)
    gate, up = h.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dy = _randn((48, 5, 2), gen, torch.float32).permute(2, 1, 0)  # non-contiguous upstream gradient
    _compare(gate, up, dy)


def test_swiglu_mixed_dtypes():
    # bf16 gate with an fp32 up: y in gate's dtype, each gradient in its input's dtype.
    gen = torch.Generator().manual_seed(3)
    gate, up, dy = _randn((3, 40), gen, torch.bfloat16, 3.0), _randn((3, 40), gen, torch.float32), \
        _randn((3, 40), gen, torch.bfloat16)
    _compare(gate, up, dy)


def test_backward_saves_only_the_inputs():
    # The forward saves gate and up themselves (no silu(gate) or y copy held for the backward).
    gate = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    y = swiglu(gate, up)
    assert y.grad_fn.__class__.__name__ == f"{SwiGLUFunction.__name__}Backward"
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == gate.data_ptr() and saved[1].data_ptr() == up.data_ptr()


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="shape"):
        swiglu(torch.randn(2, 8, device=DEVICE), torch.randn(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        swiglu(torch.randn(2, 8, device=DEVICE).double(), torch.randn(2, 8, device=DEVICE).double())
