"""Rotary position embedding (Su et al. 2021), "rotate-half" pairing as in Llama / HF, in Triton.

x (B, T, H, D), D even, half = D / 2; for position p = positions[t] (or positions[b, t]):
  out[..., i]        = x[..., i] * cos[p, i] - x[..., i + half] * sin[p, i]
  out[..., i + half] = x[..., i + half] * cos[p, i] + x[..., i] * sin[p, i]
The rotation is orthogonal, so the gradient is the rotation by -angle: the same kernel with sin
negated. One program rotates every head of one (b, t) token (or a block of them), so each cos/sin
row is loaded once and reused across heads; q and k (GQA: different head counts) are separate
calls. x may be a strided view (q/k split from a fused qkv projection): only the last dim must be
contiguous; the output is a fresh contiguous (B, T, H, D) tensor in x's dtype. Math is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase, pow2_range, rne_cast

# Elements per half-tile: BLOCK_H heads x BLOCK_HALF columns. 4k fp32 per half keeps a program's
# working set in registers while moving enough bytes (32 heads x 64 for Llama's q) per program.
TILE = 4096
MAX_BLOCK_H = 64  # heads per program at most: more heads take more programs (grid axis 1)
MAX_HEAD_DIM = 512  # widest head rotated (tiles are compiled ahead of time up to this width)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rope_fwd_kernel(
    x_ptr,  # (B, T, H, D) input; last dim contiguous, other strides arbitrary
    cos_ptr,  # (L, D/2) cos table, contiguous
    sin_ptr,  # (L, D/2) sin table, contiguous
    pos_ptr,  # positions (T,) or (B, T), any int dtype
    out_ptr,  # (B, T, H, D) out, may alias nothing
    T,  # tokens per sequence
    H,  # heads in x
    half,  # D / 2
    n_pos,  # L, rows of the tables: positions outside [0, L) read no memory (they rotate by 0)
    stride_xb, stride_xt, stride_xh,  # x strides in elements
    stride_pb, stride_pt,  # positions strides (stride_pb = 0 for one (T,) vector shared by the batch)
    stride_ob, stride_ot, stride_oh,  # out strides in elements
    sin_sign,  # 1.0, or -1.0 to rotate by -angle (the transpose of the rotation = its gradient); a runtime
    # value rather than a constexpr, so both directions share one compiled kernel
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_HALF: tl.constexpr,  # power of two >= D / 2
):
    tok = tl.program_id(0)
    b = (tok // T).to(tl.int64)  # int64: B * T * H * D passes 2^31 for long batches
    t = (tok % T).to(tl.int64)
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    # The position test is done on a broadcast vector: the interpreter rejects masks built from
    # a scalar comparison.
    pos_v = pos + tl.zeros([BLOCK_HALF], dtype=tl.int64)
    tab_mask = col_mask & (pos_v >= 0) & (pos_v < n_pos)
    c = tl.load(cos_ptr + pos * half + cols, mask=tab_mask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * half + cols, mask=tab_mask, other=0.0).to(tl.float32)
    s = s * sin_sign
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (heads < H)[:, None] & col_mask[None, :]
    x_row = x_ptr + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    o_row = out_ptr + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    tl.store(o_row, rne_cast(o1, out_ptr), mask=mask)
    tl.store(o_row + half, rne_cast(o2, out_ptr), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"rope: x must be (B, T, H, D), got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    if D % 2 or not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"rope: head dim must be even and in (0, {MAX_HEAD_DIM}], got {D}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"rope: x must be fp32/fp16/bf16, got {x.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != D // 2:
        raise ValueError(f"rope: cos/sin must both be (L, {D // 2}) for head dim {D}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not cos.dtype.is_floating_point or not sin.dtype.is_floating_point:
        raise ValueError(f"rope: cos/sin must be floating point, got {cos.dtype} and {sin.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope: positions must be int32/int64, got {positions.dtype}")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"rope: positions must be ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
    for name, t in (("cos", cos), ("sin", sin), ("positions", positions)):
        if t.device != x.device:
            raise ValueError(f"rope: x is on {x.device} but {name} is on {t.device}")


def rope_fwd(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, backward: bool = False) -> Tensor:
    """Rotate x (B, T, H, D) by the angles of `positions`; backward=True rotates by minus them.

    Positions must lie in [0, L); checking that would cost a device sync per call, so it is not
    checked: a position outside the table rotates by angle 0 (no out-of-bounds read).
    """
    _check(x, cos, sin, positions)
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = D // 2
    pos_b = positions.stride(0) if positions.dim() == 2 else 0
    block_h, block_half, num_warps = _config(H, half)
    grid = (B * T, triton.cdiv(H, block_h))
    _rope_fwd_kernel[grid](
        x, cos, sin, positions, out, T, H, half, cos.shape[0],
        x.stride(0), x.stride(1), x.stride(2), pos_b, positions.stride(-1),
        out.stride(0), out.stride(1), out.stride(2), -1.0 if backward else 1.0,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    return out


def _config(H: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): up to MAX_BLOCK_H heads of one token per program, half-rows
    padded to at least 16 columns (narrower heads mask the rest)."""
    block_half = max(16, triton.next_power_of_2(half))
    block_h = max(1, min(triton.next_power_of_2(H), TILE // block_half, MAX_BLOCK_H))
    return block_h, block_half, min(8, max(1, block_h * block_half // 256))


def aot_cases() -> list[AotCase]:
    """Every `_config` tile for head dims up to MAX_HEAD_DIM, any head count, per dtype (fp32 tables,
    int64 positions), for `python -m kernels.aot`."""
    cases = []
    configs = {_config(h, half) for h in pow2_range(1, MAX_BLOCK_H) for half in pow2_range(1, MAX_HEAD_DIM // 2)}
    for dtype in _DTYPES:
        for block_h, block_half, warps in sorted(configs):
            cases.append(AotCase(_rope_fwd_kernel, dict(BLOCK_H=block_h, BLOCK_HALF=block_half), warps, 3, dtype,
                                 DTYPE_NAMES[dtype], ptrs={"cos_ptr": torch.float32, "sin_ptr": torch.float32,
                                                           "pos_ptr": torch.int64}, scalars={"sin_sign": -1.0}))
    return cases


def rope_bwd(dy: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
    """Gradient of x for out = rope(x): dy rotated by -angle."""
    return rope_fwd(dy, cos, sin, positions, backward=True)


# ----------------------------------------------------------------------------- autograd


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin, positions)
        return rope_fwd(x, cos, sin, positions)

    @staticmethod
    def backward(ctx, dy: Tensor):
        cos, sin, positions = ctx.saved_tensors
        return rope_bwd(dy, cos, sin, positions), None, None, None


def rope(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
    """Rotary embedding of x (B, T, H, D); cos/sin (L, D/2); positions (T,) or (B, T) int, < L.

    Gradients flow to x only (the tables are constants).
    """
    return RoPEFunction.apply(x, cos, sin, positions)
