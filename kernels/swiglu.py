"""SwiGLU activation (Shazeer 2020) in Triton: y = silu(gate) * up, elementwise over (..., F).

With s = sigmoid(gate) and silu(gate) = gate * s:
  d up   = dy * silu(gate)
  d gate = dy * up * s * (1 + gate * (1 - s))
The backward recomputes s from gate, so only gate and up are saved (never silu(gate) or y: the
MLP's largest activations are not stored twice). Math is fp32; y takes gate's dtype, each
gradient its input's dtype. gate and up may be strided views (e.g. halves of a fused w13
projection): only the last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase, pow2_range, rne_cast

# Elements per program tile ([BLOCK_R, BLOCK_F]); narrow rows are packed several to a tile.
TILE = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,  # (N, F) gate pre-activation, columns contiguous
    up_ptr,  # (N, F) up projection
    y_ptr,  # (N, F) out, gate's dtype
    n_rows,  # N
    n_cols,  # F, any value >= 1 (tails are masked)
    stride_g, stride_u, stride_y,  # row strides in elements
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_F: tl.constexpr,  # columns per tile (power of two)
):
    # int64 rows: row * stride passes 2^31 once N * F does (e.g. 256k tokens x 14336).
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # 1 / (1 + exp(-g)): exp overflows to inf for g < -88 and s becomes 0, the right limit.
    s = 1.0 / (1.0 + tl.exp(-g))
    y = g * s * u
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], rne_cast(y, y_ptr), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,  # (N, F) gradient of y
    gate_ptr,  # (N, F) saved gate
    up_ptr,  # (N, F) saved up
    dgate_ptr,  # (N, F) out: gradient of gate, gate's dtype
    dup_ptr,  # (N, F) out: gradient of up, up's dtype
    n_rows,  # N
    n_cols,  # F
    stride_dy, stride_g, stride_u, stride_dg, stride_du,  # row strides in elements
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_F: tl.constexpr,  # columns per tile
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))  # recomputed: cheaper than storing and re-reading silu(gate)
    silu = g * s
    du = dy * silu
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + rows[:, None] * stride_dg + cols[None, :], rne_cast(dg, dgate_ptr), mask=mask)
    tl.store(dup_ptr + rows[:, None] * stride_du + cols[None, :], rne_cast(du, dup_ptr), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _rows(t: Tensor, n_cols: int) -> Tensor:
    """View t as (N, F) rows with contiguous columns, copying only when no such view exists."""
    t2 = t.reshape(-1, n_cols)
    if n_cols > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _config(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_R, BLOCK_F, num_warps) for an (N, F) elementwise problem. The tile is always TILE
    elements (rows beyond N are masked), so the configurations are one per BLOCK_F."""
    block_f = min(max(16, triton.next_power_of_2(n_cols)), TILE)
    block_r = TILE // block_f
    # 8 elements per thread: at 16 (8 warps) the bf16 backward of a 4096-wide row spilled 8 B on sm_80.
    num_warps = min(16, max(1, block_r * block_f // 256))
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_f)), block_r, block_f, num_warps


def aot_cases() -> list[AotCase]:
    """Every `_config` tile, per dtype, forward and backward, for `python -m kernels.aot`."""
    cases = []
    for dtype in _DTYPES:
        for cols in pow2_range(16, TILE):
            _, block_r, block_f, warps = _config(1, cols)
            for kernel in (_swiglu_fwd_kernel, _swiglu_bwd_kernel):
                cases.append(AotCase(kernel, dict(BLOCK_R=block_r, BLOCK_F=block_f), warps, 3, dtype,
                                     DTYPE_NAMES[dtype]))
    return cases


def _check(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    if gate.dim() < 1:
        raise ValueError("swiglu: inputs must have at least one dimension (..., F)")
    if gate.dtype not in _DTYPES or up.dtype not in _DTYPES:
        raise ValueError(f"swiglu: gate and up must be fp32/fp16/bf16, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """y = silu(gate) * up, shape of gate, gate's dtype."""
    _check(gate, up)
    n_cols = gate.shape[-1]
    g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)
    n_rows = g2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel() > 0:
        grid, block_r, block_f, num_warps = _config(n_rows, n_cols)
        _swiglu_fwd_kernel[grid](g2, u2, y, n_rows, n_cols, g2.stride(0), u2.stride(0), y.stride(0),
                                 BLOCK_R=block_r, BLOCK_F=block_f, num_warps=num_warps)
    return y.view(gate.shape)


def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up) for y = silu(gate) * up."""
    if dy.shape != gate.shape:
        raise ValueError(f"swiglu backward: gradient shape {tuple(dy.shape)} != input shape {tuple(gate.shape)}")
    n_cols = gate.shape[-1]
    dy2, g2, u2 = _rows(dy, n_cols), _rows(gate, n_cols), _rows(up, n_cols)
    n_rows = g2.shape[0]
    dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dg.numel() > 0:
        grid, block_r, block_f, num_warps = _config(n_rows, n_cols)
        _swiglu_bwd_kernel[grid](dy2, g2, u2, dg, du, n_rows, n_cols, dy2.stride(0), g2.stride(0), u2.stride(0),
                                 dg.stride(0), du.stride(0), BLOCK_R=block_r, BLOCK_F=block_f, num_warps=num_warps)
    return dg.view(gate.shape), du.view(up.shape)


# ----------------------------------------------------------------------------- autograd


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy: Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise. gate, up (..., F); math in fp32, result in gate's dtype."""
    return SwiGLUFunction.apply(gate, up)
