"""kernels/distill.py (fused chunked linear + distillation loss) against kernels/reference.py's linear_distill_ref:
loss, stats and the gradients of the student's hidden states and head, on awkward shapes (V not a power of two,
several chunks with a partial last one, widths that differ between teacher and student, ignored rows), every
divergence, temperatures, fp32 and fp16 (FlashAttention rule against the fp32 reference)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule

from kernels.distill import linear_distill, linear_distill_fwd
from kernels.reference import linear_distill_ref

SHAPES = [pytest.param(1, 32, 48, 1000, None, id="N1-V1000"),
          pytest.param(7, 40, 24, 4099, None, id="N7-V4099-two-tiles"),
          pytest.param(19, 16, 20, 3001, 8, id="N19-V3001-chunks8")]
KINDS = ["kl", "reverse-kl", "jsd"]


def _inputs(N, d, dt, V, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen)
    w = torch.randn(V, d, generator=gen) * (2.0 / d ** 0.5)
    tx = torch.randn(N, dt, generator=gen)
    tw = torch.randn(V, dt, generator=gen) * (2.0 / dt ** 0.5)
    y = torch.randint(0, V, (N,), generator=gen)
    if N > 2:
        y[torch.rand(N, generator=gen) < 0.25] = -100
        y[0], y[-1] = -100, 5
    g = float(torch.rand((), generator=gen)) * 1.5 + 0.25
    return [t.to(DEVICE, dtype) for t in (x, w, tx, tw)], y.to(DEVICE), g


def _run(fn, x, w, tx, tw, y, g, *args):
    xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, stats = fn(xl, wl, tx, tw, y, *args)
    (loss * g).backward()
    return loss.detach(), stats, xl.grad, wl.grad


@pytest.mark.parametrize("row_math", ["triton", "torch"])
@pytest.mark.parametrize("kind, T", [("kl", 1.0), ("kl", 2.5), ("reverse-kl", 2.5), ("jsd", 0.7)])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("N, d, dt, V, chunk", SHAPES)
def test_linear_distill_matches_reference(N, d, dt, V, chunk, dtype, kind, T, row_math):
    """The Triton row kernel (interpreter) and the PyTorch row math (the CPU route) in the same chunk loop."""
    (x, w, tx, tw), y, g = _inputs(N, d, dt, V, dtype, seed=N * 31 + V + len(kind))
    args = (0.3, T, kind, -100)
    out = _run(lambda *a: linear_distill(*a, chunk=chunk, row_math=row_math), x, w, tx, tw, y, g, *args)
    hp = _run(linear_distill_ref, x.float(), w.float(), tx.float(), tw.float(), y, g, *args)
    loss, stats, gx, gw = out
    assert loss.dtype == torch.float32 and loss.dim() == 0 and stats.shape == (3,)
    assert gx.dtype == dtype and gw.dtype == dtype and gx.shape == x.shape and gw.shape == w.shape
    if N > 2:
        assert bool((gx[0] == 0).all())  # the ignored row
    if dtype == torch.float32:
        for a, b, name in zip(out, hp, ["loss", "stats", "grad_x", "grad_weight"]):
            assert_close(a, b, name=name)
        return
    lp = _run(linear_distill_ref, x, w, tx, tw, y, g, *args)
    for a, lo, hi, name in zip(out, lp, hp, ["loss", "stats", "grad_x", "grad_weight"]):
        if name == "stats":  # the agreement compares argmaxes of logits rounded the same way as the reference's
            assert_close(a[2], lo[2], name="agree")
            a, lo, hi = a[:2], lo[:2], hi[:2]
        assert_fa_rule(a, lo, hi, name)


def test_alpha_one_is_the_fused_cross_entropy_and_teacher_equal_student_is_zero():
    from kernels.cross_entropy import linear_cross_entropy

    (x, w, tx, tw), y, _ = _inputs(9, 24, 24, 1500, torch.float32, seed=3)
    loss, stats = linear_distill(x, w, tx, tw, y, 1.0, 2.0, "jsd")
    assert_close(loss, linear_cross_entropy(x, w, y), name="alpha=1")
    for kind in KINDS:
        _, st = linear_distill(x, w, x, w, y, 0.0, 1.5, kind)
        assert abs(float(st[1])) < 1e-5 and float(st[2]) == 1.0


def test_compiled_torch_row_math_matches_reference():
    """ops.linear_distill(compiled=True) on CPU (what --compile runs take): row_math="torch-compiled"
    (distill_rows_torch under torch.compile), 600 rows = 3 chunks of 256 with a partial last one, JSD (the longest
    closed form), fp32, against the reference."""
    from llm import ops

    (x, w, tx, tw), y, g = _inputs(600, 16, 20, 3001, torch.float32, seed=11)
    args = (0.3, 0.7, "jsd", -100)
    out = _run(lambda *a: ops.linear_distill(*a, compiled=True), x, w, tx, tw, y, g, *args)
    ref = _run(linear_distill_ref, x, w, tx, tw, y, g, *args)
    for a, b, name in zip(out, ref, ["loss", "stats", "grad_x", "grad_weight"]):
        assert_close(a, b, name=name)


def test_cpu_route_is_the_chunked_torch_row_math():
    """ops.linear_distill on CPU (kernels="auto") runs the chunk loop with row_math="torch": the reference's loss,
    stats and gradients; kernels="torch" is the reference itself; no grad mode leaves the logits buffers alone."""
    from llm import ops

    (x, w, tx, tw), y, g = _inputs(700, 24, 16, 1500, torch.float32, seed=5)  # 3 chunks of 256: last partial
    args = (0.4, 1.5, "jsd", -100)
    out = _run(lambda *a: ops.linear_distill(*a), x, w, tx, tw, y, g, *args)
    ref = _run(lambda *a: ops.linear_distill(*a, kernels="torch"), x, w, tx, tw, y, g, *args)
    for a, b, name in zip(out, ref, ["loss", "stats", "grad_x", "grad_weight"]):
        assert_close(a, b, name=name)
    with torch.no_grad():
        loss, stats = ops.linear_distill(x, w, tx, tw, y, *args)
    assert_close(loss, ref[0], name="no-grad loss")
    assert_close(stats, ref[1], name="no-grad stats")


def test_no_full_logits_and_bad_input_is_refused():
    (x, w, tx, tw), y, _ = _inputs(40, 16, 16, 1000, torch.float32, seed=4)
    loss, stats, gx, gw = linear_distill_fwd(x, w, tx, tw, y, chunk=8)
    ref_loss, ref_stats = linear_distill_ref(x, w, tx, tw, y)
    assert_close(loss, ref_loss, name="loss") and gx is not None and gw is not None
    with pytest.raises(ValueError, match="unknown distillation loss"):
        linear_distill(x, w, tx, tw, y, kind="mse")
    with pytest.raises(ValueError, match="vocabulary"):
        linear_distill(x, w, tx, tw[:999], y)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_distill(x, w, tx, tw, torch.full_like(y, 1000))
    with pytest.raises(ValueError, match="temperature"):
        linear_distill(x, w, tx, tw, y, temperature=0.0)
    with pytest.raises(ValueError, match="row_math"):
        linear_distill(x, w, tx, tw, y, row_math="numpy")
