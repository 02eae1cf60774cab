"""kernels/rmsnorm.py against kernels/reference.py: output and every gradient.

fp32 is checked with the fp32 tolerance against the fp32 reference; fp16 / bf16 with the
FlashAttention rule against the reference run on the same values upcast to fp32 (the reference
run in the low precision sets the error budget). No tl.dot, so bf16 runs in the interpreter too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule

from kernels.reference import add_rms_norm_ref, rms_norm_ref
from kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_bwd, rms_norm_fwd

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (x dtype, weight dtype): the same dtype, and the mixed case of an fp32 weight with bf16 activations.
DTYPES = [
    pytest.param((F32, F32), id="fp32"),
    pytest.param((F16, F16), id="fp16"),
    pytest.param((BF16, BF16), id="bf16"),
    pytest.param((BF16, F32), id="bf16_w_fp32"),
]
SHAPES = [
    pytest.param((1, 1), id="row1_c1"),
    pytest.param((5, 1), id="rows5_c1"),
    pytest.param((1, 7, 96), id="b1_t7_c96"),
    pytest.param((2, 3, 1000), id="b2_t3_c1000"),
    pytest.param((37, 1000), id="rows37_c1000"),  # several row tiles per backward program, ragged end
    pytest.param((299, 96), id="rows299_c96"),  # packed rows: 32 rows per tile
    pytest.param((3, 4097), id="rows3_c4097"),
    pytest.param((2, 1, 8192), id="b2_t1_c8192"),
]
EPS = 1e-6


def _randn(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def _run(fn, inputs: list[torch.Tensor], upstream: list[torch.Tensor], *args):
    """(outputs, grads of every input) of fn(*inputs, *args) with the given upstream gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, *args)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    grads = torch.autograd.grad(outs, leaves, upstream)
    return [o.detach() for o in outs], list(grads)


def _compare(fn, ref, inputs: list[torch.Tensor], upstream: list[torch.Tensor], names: list[str], *args) -> None:
    """Outputs and input gradients of fn vs ref: the fp32 tolerance when every input is fp32, else
    the FA rule (also for fp32 results of low-precision inputs, e.g. an fp32 residual's gradient,
    which passes through the bf16 h)."""
    exact = all(t.dtype == torch.float32 for t in inputs + upstream)
    outs, grads = _run(fn, inputs, upstream, *args)
    lp_outs, lp_grads = _run(ref, inputs, upstream, *args)
    hp_outs, hp_grads = _run(ref, [t.float() for t in inputs], [u.float() for u in upstream], *args)
    got = list(zip(outs + grads, lp_outs + lp_grads, hp_outs + hp_grads))
    assert len(got) == len(names)
    for (out, lp, hp), name in zip(got, names):
        assert out.dtype == lp.dtype and out.shape == lp.shape, f"{name}: {out.dtype} {out.shape} vs {lp.shape}"
        if exact:
            assert_close(out, hp, name=name)
        else:
            assert_fa_rule(out, lp, hp, name=name)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtypes):
    xdt, wdt = dtypes
    gen = torch.Generator().manual_seed(0)
    x, w, dy = _randn(shape, gen, xdt), _randn(shape[-1], gen, wdt), _randn(shape, gen, xdt)
    _compare(rms_norm, rms_norm_ref, [x, w], [dy], ["y", "grad_x", "grad_w"], EPS)


# (x dtype, residual dtype, weight dtype): an fp32 residual stream with bf16 branch outputs is mixed.
ADD_DTYPES = [
    pytest.param((F32, F32, F32), id="fp32"),
    pytest.param((F16, F16, F16), id="fp16"),
    pytest.param((BF16, BF16, BF16), id="bf16"),
    pytest.param((BF16, F32, F32), id="bf16_res_w_fp32"),
]


@pytest.mark.parametrize("dtypes", ADD_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_reference(shape, dtypes):
    xdt, rdt, wdt = dtypes
    gen = torch.Generator().manual_seed(1)
    x, r, w = _randn(shape, gen, xdt), _randn(shape, gen, rdt), _randn(shape[-1], gen, wdt)
    dh, dy = _randn(shape, gen, xdt), _randn(shape, gen, xdt)  # gradients reach both h and y
    _compare(add_rms_norm, add_rms_norm_ref, [x, r, w], [dh, dy], ["h", "y", "grad_x", "grad_residual", "grad_w"],
             EPS)


def test_add_rms_norm_h_is_the_rounded_sum():
    # y must normalize h as stored (rounded to bf16), not the unrounded fp32 sum.
    gen = torch.Generator().manual_seed(2)
    x, r, w = _randn((4, 96), gen, BF16), _randn((4, 96), gen, BF16), _randn(96, gen, F32)
    h, y = add_rms_norm(x, r, w)
    assert torch.equal(h, (x.float() + r.float()).to(BF16))
    assert_fa_rule(y, rms_norm_ref(h, w), rms_norm_ref(h.float(), w), name="y")


@pytest.mark.parametrize("residual", [pytest.param(False, id="plain"), pytest.param(True, id="add")])
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")])
@pytest.mark.parametrize("shape", [pytest.param((3, 200), id="rows3_c200"), pytest.param((1, 2, 129), id="b1_c129")])
def test_streamed_wide_rows_match_reference(shape, dtype, residual):
    # Rows wider than the register block are streamed in chunks; force that path with a 64-wide block.
    gen = torch.Generator().manual_seed(3)
    x, w, dy = _randn(shape, gen, dtype), _randn(shape[-1], gen, F32), _randn(shape, gen, dtype)
    r = _randn(shape, gen, dtype) if residual else None
    dh = _randn(shape, gen, dtype) if residual else None
    y, h, rstd = rms_norm_fwd(x, w, EPS, residual=r, max_block_c=64)
    dx, dw = rms_norm_bwd(dy, h if residual else x, w, rstd, dh=dh, max_block_c=64)
    if residual:
        outs, grads = _run(add_rms_norm_ref, [x, r, w], [dh, dy], EPS)
        assert torch.equal(h, outs[0])
        outs, grads = [outs[1]], [grads[0], grads[2]]
    else:
        outs, grads = _run(rms_norm_ref, [x, w], [dy], EPS)
    tol = dict(dtype=dtype)
    assert_close(y, outs[0], name="y", **tol)
    assert_close(dx, grads[0], name="grad_x", **tol)
    assert_close(dw, grads[1], name="grad_w", dtype=F32)
    # The one-pass path agrees with the streamed one.
    y1, _, rstd1 = rms_norm_fwd(x, w, EPS, residual=r)
    assert_close(rstd, rstd1, name="rstd")
    assert_close(y, y1, name="y one-pass", **tol)


def test_strided_inputs_and_gradients():
    # Rows with a stride (a slice of a wider buffer), a 4-D qk-norm-like view that reshape must copy,
    # and a transposed upstream gradient.
    gen = torch.Generator().manual_seed(4)
    buf = _randn((6, 100), gen, F32)
    x = buf[:, :96]
    w = _randn(96, gen, F32)
    dy = _randn((96, 6), gen, F32).t()
    _compare(rms_norm, rms_norm_ref, [x, w], [dy], ["y", "grad_x", "grad_w"], EPS)
    qkv = _randn((2, 3, 5 * 16), gen, F32)
    q = qkv[..., : 3 * 16].view(2, 3, 3, 16)
    wq = _randn(16, gen, F32)
    dq = _randn((2, 3, 3, 16), gen, F32)
    _compare(rms_norm, rms_norm_ref, [q, wq], [dq], ["y", "grad_x", "grad_w"], EPS)


@pytest.mark.parametrize("max_block_c", [pytest.param(16384, id="one_pass"), pytest.param(16, id="streamed")])
def test_eps_is_used(max_block_c):
    # Rows of tiny values: eps dominates mean(x^2), so a kernel ignoring eps is far off.
    gen = torch.Generator().manual_seed(5)
    x = _randn((3, 64), gen, F32) * 1e-4
    w = _randn(64, gen, F32)
    y, _, _ = rms_norm_fwd(x, w, 1e-5, max_block_c=max_block_c)
    assert_close(y, rms_norm_ref(x, w, 1e-5), name="y")


def test_bad_inputs_raise_value_error():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.randn(7, device=DEVICE))
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.randn(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm(x, torch.randn(4, 9, device=DEVICE), torch.randn(8, device=DEVICE))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        rms_norm(x.double(), torch.randn(8, device=DEVICE))
