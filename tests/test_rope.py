"""kernels/rope.py against kernels/reference.py: output and the gradient of x.

fp32 is checked with the fp32 tolerance against the fp32 reference; fp16 / bf16 with the
FlashAttention rule against the reference run on the same values upcast to fp32. No tl.dot, so
bf16 runs in the interpreter too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_close, assert_fa_rule

from kernels.reference import rope_ref
from kernels.rope import rope
from llm.layers import rope_tables

# (B, T, H, D): T = 1 (decode), odd T, head dims 2 / 6 / 64 / 80 / 96 / 128, one head and many.
SHAPES = [
    pytest.param((1, 1, 1, 2), id="b1_t1_h1_d2"),
    pytest.param((2, 5, 3, 6), id="b2_t5_h3_d6"),
    pytest.param((1, 7, 4, 64), id="b1_t7_h4_d64"),
    pytest.param((2, 3, 2, 80), id="b2_t3_h2_d80"),
    pytest.param((3, 2, 5, 96), id="b3_t2_h5_d96"),
    pytest.param((1, 3, 33, 128), id="b1_t3_h33_d128"),  # more heads than one program's block
]
MAX_LEN = 64


def _positions(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(T,) from 0; (T,) from an offset (a KV-cache chunk); (B, T) with a different offset per row."""
    if kind == "range":
        return torch.arange(T, device=DEVICE)
    if kind == "offset":
        return torch.arange(T, device=DEVICE) + 17
    starts = torch.randint(0, MAX_LEN - T + 1, (B, 1), generator=gen)
    return (starts + torch.arange(T)).to(DEVICE, torch.int32)


POSITIONS = [pytest.param(k, id=k) for k in ("range", "offset", "per_row")]


def _run(fn, x: torch.Tensor, dy: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, *args)
    (dx,) = torch.autograd.grad(out, leaf, dy)
    return out.detach(), dx


def _compare(x: torch.Tensor, dy: torch.Tensor, cos, sin, pos) -> None:
    out, dx = _run(rope, x, dy, cos, sin, pos)
    lp_out, lp_dx = _run(rope_ref, x, dy, cos, sin, pos)
    hp_out, hp_dx = _run(rope_ref, x.float(), dy.float(), cos, sin, pos)
    for got, lp, hp, name in ((out, lp_out, hp_out, "out"), (dx, lp_dx, hp_dx, "grad_x")):
        assert got.dtype == x.dtype and got.shape == x.shape, f"{name}: {got.dtype} {got.shape}"
        if x.dtype == torch.float32:
            assert_close(got, hp, name=name)
        else:
            assert_fa_rule(got, lp, hp, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(shape, positions, dtype):
    B, T, H, D = shape
    gen = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(D, MAX_LEN, device=DEVICE)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    _compare(x, dy, cos, sin, _positions(positions, B, T, gen))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_head,n_kv_head", [pytest.param(8, 2, id="gqa8_2"), pytest.param(6, 1, id="mqa6_1")])
def test_rope_gqa_q_and_k_from_fused_qkv(n_head, n_kv_head, dtype):
    # As the model calls it: q and k are strided (B, T, H, D) views of one fused qkv projection,
    # with different head counts, rotated by separate calls at KV-cache positions.
    B, T, D = 2, 5, 16
    gen = torch.Generator().manual_seed(1)
    cos, sin = rope_tables(D, MAX_LEN, theta=500000.0, device=DEVICE)
    qkv = torch.randn(B, T, (n_head + 2 * n_kv_head) * D, generator=gen).to(DEVICE, dtype)
    q, k, _ = qkv.split([n_head * D, n_kv_head * D, n_kv_head * D], dim=-1)
    q, k = q.view(B, T, n_head, D), k.view(B, T, n_kv_head, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    pos = _positions("per_row", B, T, gen)
    for x in (q, k):
        dy = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
        _compare(x, dy, cos, sin, pos)


def test_rope_non_contiguous_upstream_gradient():
    gen = torch.Generator().manual_seed(2)
    B, T, H, D = 2, 3, 4, 8
    cos, sin = rope_tables(D, MAX_LEN, device=DEVICE)
    x = torch.randn(B, T, H, D, generator=gen).to(DEVICE)
    dy = torch.randn(D, H, T, B, generator=gen).to(DEVICE).permute(3, 2, 1, 0)  # no stride is 1 on the last dim
    _compare(x, dy, cos, sin, torch.arange(T, device=DEVICE) + 5)


def test_rope_is_a_rotation_and_backward_inverts_it():
    # Norms of each (i, i + D/2) pair are preserved, and the backward (rotation by -angle)
    # applied to the output gives the input back.
    gen = torch.Generator().manual_seed(3)
    cos, sin = rope_tables(32, MAX_LEN, device=DEVICE)
    x = torch.randn(2, 6, 3, 32, generator=gen).to(DEVICE).requires_grad_()
    pos = torch.arange(6, device=DEVICE) + 40
    out = rope(x, cos, sin, pos)
    pair_norm = lambda t: t[..., :16] ** 2 + t[..., 16:] ** 2
    assert_close(pair_norm(out), pair_norm(x.detach()), name="pair norms")
    assert not torch.allclose(out, x)
    (back,) = torch.autograd.grad(out, x, out.detach())
    assert_close(back, x.detach(), name="inverse rotation")


def test_bad_inputs_raise_value_error():
    cos, sin = rope_tables(8, 16, device=DEVICE)
    x = torch.randn(1, 4, 2, 8, device=DEVICE)
    pos = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(1, 4, 2, 7, device=DEVICE), cos, sin, pos)
    with pytest.raises(ValueError, match="cos/sin"):
        rope(x, cos[:, :3], sin[:, :3], pos)
    with pytest.raises(ValueError, match="positions must be"):
        rope(x, cos, sin, torch.arange(5, device=DEVICE))
    with pytest.raises(ValueError, match="int32/int64"):
        rope(x, cos, sin, pos.float())
    with pytest.raises(ValueError, match=r"\(B, T, H, D\)"):
        rope(x[0], cos, sin, pos)
