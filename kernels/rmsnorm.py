"""RMSNorm (Zhang & Sennrich 2019) and fused residual-add + RMSNorm in Triton.

rms_norm:      y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps) over the last dim of x (..., C).
add_rms_norm:  h = round_{x.dtype}(x + residual); y = rms_norm(h). Returns (h, y).

Backward, per row, with xhat = x * rstd and g = dy * w:
  dx = rstd * (g - xhat * mean(g * xhat))
  dw = sum over rows of dy * xhat
For add_rms_norm, dh = dx + (incoming gradient of h) flows unchanged into x and residual.

Math is fp32 whatever the input dtypes; outputs take x's dtype, dw takes the weight's dtype (an
fp32 weight with bf16 activations is the usual mixed-precision case). The forward saves rstd (one
fp32 per row) so the backward needs no reduction over x^2. The backward runs one program per
contiguous block of rows: each keeps its share of dw in registers and writes one fp32 partial row,
and the (programs, C) partials are summed afterwards, so x is read once and dw needs no atomics.
Rows wider than MAX_BLOCK_C (forward) / BWD_MAX_BLOCK_C (backward) are streamed in column chunks
(two passes over the row).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase, pow2_range, rne_cast

# Widest row kept whole in registers (one read of every input). 16k fp32 values over 16 warps is
# 32 per thread per tensor; wider rows spill, so they are streamed in chunks of this many columns.
MAX_BLOCK_C = 16384
# The backward holds about twice the forward's live tiles (x, dy, w, xhat, dw): at 16k columns it spills
# (ptxas, sm_80/sm_90, 16 warps: 44-284 B), at 8k it fits, so wider rows stream in the backward.
BWD_MAX_BLOCK_C = 8192
# Elements per program tile: narrow rows are packed BLOCK_R to a tile so a program moves enough
# bytes to hide latency (a 128-wide qk-norm row alone would leave most lanes idle).
TILE = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_h(x_ptr, res_ptr, h_ptr, rows, cols, mask, stride_x, stride_res, stride_h,
            HAS_RES: tl.constexpr, STORE_H: tl.constexpr):
    # Loads a [BLOCK_R, BLOCK_C] tile of the normalized input as fp32: x itself, or for the
    # fused add h = x + residual rounded to h's dtype (the reference normalizes the rounded sum,
    # which is also what the next residual add reads). STORE_H writes that h tile out.
    # rows: int64 row indices; cols: column indices; mask: valid elements of the tile.
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        x = rne_cast(x.to(tl.float32) + r.to(tl.float32), h_ptr)
        if STORE_H:
            tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (N, C) input rows, columns contiguous
    res_ptr,  # (N, C) residual rows (read only when HAS_RES)
    w_ptr,  # (C,) weight, any float dtype
    y_ptr,  # (N, C) out: normalized rows, x's dtype
    h_ptr,  # (N, C) out: x + residual in x's dtype (written only when HAS_RES)
    rstd_ptr,  # (N,) fp32 out: 1 / rms of each row, saved for the backward
    n_rows,  # N
    n_cols,  # C, any value >= 1 (tails are masked)
    stride_x, stride_res, stride_y, stride_h,  # row strides in elements
    eps,  # added to mean(x^2) before the rsqrt
    HAS_RES: tl.constexpr,  # fused residual add
    ONE_PASS: tl.constexpr,  # the row fits in one BLOCK_C tile: each input is read exactly once
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # columns per tile (power of two >= C when ONE_PASS)
):
    pid = tl.program_id(0)
    # int64 row indices: N * C passes 2^31 for a 16k x 128k activation.
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    if ONE_PASS:
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        h = _load_h(x_ptr, res_ptr, h_ptr, rows, cols, mask, stride_x, stride_res, stride_h, HAS_RES, True)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = h * rstd[:, None] * w[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], rne_cast(y, y_ptr), mask=mask)
    else:
        # Pass 1: sum of squares (and h written out); pass 2: re-read and scale. The second
        # pass recomputes h from x and residual rather than reading h back, so it never depends
        # on this program's own stores being visible.
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            h = _load_h(x_ptr, res_ptr, h_ptr, rows, c, mask, stride_x, stride_res, stride_h, HAS_RES, True)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_C):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            h = _load_h(x_ptr, res_ptr, h_ptr, rows, c, mask, stride_x, stride_res, stride_h, HAS_RES, False)
            w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            y = h * rstd[:, None] * w[None, :]
            tl.store(y_ptr + rows[:, None] * stride_y + c[None, :], rne_cast(y, y_ptr), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (N, C) gradient of y
    x_ptr,  # (N, C) the normalized input (x, or h for the fused add)
    w_ptr,  # (C,) weight
    rstd_ptr,  # (N,) fp32 saved by the forward
    dh_ptr,  # (N, C) incoming gradient of h, added to dx (read only when HAS_DH)
    dx_ptr,  # (N, C) out: gradient of x, x's dtype
    dw_part_ptr,  # (programs, C) fp32 out: this program's share of dw, one row per program
    n_rows,  # N
    n_cols,  # C
    rows_per_prog,  # contiguous rows each program owns (a multiple of BLOCK_R)
    stride_dy, stride_x, stride_dh, stride_dx,  # row strides in elements
    HAS_DH: tl.constexpr,  # fused add: gradient of h also flows into x and residual
    ONE_PASS: tl.constexpr,  # the row fits in one BLOCK_C tile
    BLOCK_R: tl.constexpr,  # rows per step
    BLOCK_C: tl.constexpr,  # columns per tile
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    cols = tl.arange(0, BLOCK_C)
    if ONE_PASS:
        col_mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # dw accumulates as a full tile and is reduced over rows once at the end: no cross-warp
        # reduction inside the loop.
        dw_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / n_cols
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask,
                              other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], rne_cast(dx, dx_ptr),
                     mask=mask)
            dw_acc += dy * xhat
        tl.store(dw_part_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    else:
        # Wide rows (BLOCK_R == 1): pass 1 reduces sum(g * xhat) over the row's chunks, pass 2
        # writes dx and adds into this program's partial dw row (zero-initialized by the
        # launcher; only this program touches it). The barrier orders the previous row's
        # partial-dw stores before this row's loads of the same addresses.
        for r in range(row_start, row_end):
            rows = (r + tl.arange(0, BLOCK_R)).to(tl.int64)
            rstd = tl.load(rstd_ptr + rows)
            dot = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_C):
                cc = start + cols
                mask = (cc < n_cols)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cc[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cc, mask=cc < n_cols, other=0.0).to(tl.float32)
                dot += dy * w[None, :] * x
            c = tl.sum(dot, axis=1) * rstd / n_cols  # mean(g * xhat)
            tl.debug_barrier()
            for start in range(0, n_cols, BLOCK_C):
                cc = start + cols
                mask = (cc < n_cols)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cc[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cc, mask=cc < n_cols, other=0.0).to(tl.float32)
                xhat = x * rstd[:, None]
                dx = (dy * w[None, :] - xhat * c[:, None]) * rstd[:, None]
                if HAS_DH:
                    dx += tl.load(dh_ptr + rows[:, None] * stride_dh + cc[None, :], mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows[:, None] * stride_dx + cc[None, :], rne_cast(dx, dx_ptr),
                         mask=mask)
                part = dw_part_ptr + pid * n_cols + cc
                tl.store(part, tl.load(part, mask=cc < n_cols, other=0.0) + tl.sum(dy * xhat, axis=0),
                         mask=cc < n_cols)


# ----------------------------------------------------------------------------- launchers


def _rows(t: Tensor, n_cols: int) -> Tensor:
    """View t as (N, C) rows with contiguous columns, copying only when no such view exists."""
    t2 = t.reshape(-1, n_cols)
    if n_cols > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _config(n_cols: int, max_block_c: int, bwd: bool = False) -> tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_C, ONE_PASS, num_warps) for rows of C columns. BLOCK_R does not depend on the
    row count (a short batch masks the rows it lacks), so the set of configurations stays small."""
    if not 16 <= max_block_c <= MAX_BLOCK_C:
        raise ValueError(f"max_block_c must lie in [16, {MAX_BLOCK_C}], got {max_block_c}")
    max_block_c = triton.next_power_of_2(max_block_c)
    block_c = min(max(16, triton.next_power_of_2(n_cols)), max_block_c)  # narrower rows mask the rest
    one_pass = block_c >= n_cols
    block_r = max(1, TILE // block_c) if one_pass else 1
    # ~8 elements per thread per tile: 16 per thread spilled in the streamed fused forward and in the
    # packed (2 x 2048) and streamed 4096-wide backward on sm_90 (ptxas settles at 64 / 128 registers).
    # The backward of one whole row keeps 16 per thread: at 16 warps (128 registers each at most) the
    # fused 4096-wide row spilled 4 B on sm_90, at 8 warps it fits (measured, benchmarks/NOTES.md).
    per_warp = 512 if bwd and one_pass and block_r == 1 else 256
    num_warps = min(16, max(4, block_r * block_c // per_warp))
    return block_r, block_c, one_pass, num_warps


def aot_cases() -> list[AotCase]:
    """Every (BLOCK_C, ONE_PASS) `_config` can give, fused or not, per activation dtype (weight fp32),
    for `python -m kernels.aot`."""
    def configs(limit: int, bwd: bool) -> set:
        out = {_config(c, limit, bwd) for c in pow2_range(16, MAX_BLOCK_C)}
        return out | {_config(2 * MAX_BLOCK_C, m, bwd) for m in pow2_range(16, limit)}  # streamed rows

    f32, cases = torch.float32, []
    for dtype in _DTYPES:
        for fused in (False, True):
            label = f"{DTYPE_NAMES[dtype]} w fp32" + (" fused" if fused else "")
            for block_r, block_c, one_pass, warps in sorted(configs(MAX_BLOCK_C, False)):
                consts = dict(ONE_PASS=one_pass, BLOCK_R=block_r, BLOCK_C=block_c)
                cases.append(AotCase(_rms_norm_fwd_kernel, dict(HAS_RES=fused, **consts), warps, 3, dtype, label,
                                     ptrs={"w_ptr": f32, "rstd_ptr": f32}, scalars={"eps": 1e-6}))
            for block_r, block_c, one_pass, warps in sorted(configs(BWD_MAX_BLOCK_C, True)):
                consts = dict(ONE_PASS=one_pass, BLOCK_R=block_r, BLOCK_C=block_c)
                cases.append(AotCase(_rms_norm_bwd_kernel, dict(HAS_DH=fused, **consts), warps, 3, dtype, label,
                                     ptrs={"w_ptr": f32, "rstd_ptr": f32, "dw_part_ptr": f32}))
    return cases


def _check(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> None:
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dimension (..., C)")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: x and weight must be fp32/fp16/bf16, got {x.dtype} and {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim "
                         f"{x.shape[-1]} (expected ({x.shape[-1]},))")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype not in _DTYPES:
            raise ValueError(f"add_rms_norm: residual must be fp32/fp16/bf16, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"add_rms_norm: x is on {x.device} but residual is on {residual.device}")


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None,
                 max_block_c: int = MAX_BLOCK_C) -> tuple[Tensor, Tensor | None, Tensor]:
    """(y, h, rstd): y (..., C) in x's dtype, h = x + residual (None without residual), rstd (N,) fp32."""
    _check(x, weight, residual)
    weight = weight.contiguous()
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    r2 = _rows(residual, n_cols) if residual is not None else x2
    h = torch.empty_like(y) if residual is not None else y
    if n_rows > 0 and n_cols > 0:
        block_r, block_c, one_pass, num_warps = _config(n_cols, max_block_c)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, r2, weight, y, h, rstd, n_rows, n_cols,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), eps,
            HAS_RES=residual is not None, ONE_PASS=one_pass, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=num_warps,
        )
    h_out = h.view(x.shape) if residual is not None else None
    return y.view(x.shape), h_out, rstd


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dh: Tensor | None = None,
                 max_block_c: int = MAX_BLOCK_C) -> tuple[Tensor, Tensor]:
    """(dx, dw) of y = rms_norm(x); dh (gradient of h for the fused add) is added to dx."""
    n_cols = x.shape[-1]
    if dy.shape != x.shape or (dh is not None and dh.shape != x.shape):
        raise ValueError(f"rms_norm backward: gradient shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    weight = weight.contiguous()
    x2, dy2 = _rows(x, n_cols), _rows(dy, n_cols)
    dh2 = _rows(dh, n_cols) if dh is not None else dy2
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    block_r, block_c, one_pass, num_warps = _config(n_cols, min(max_block_c, BWD_MAX_BLOCK_C), bwd=True)
    n_tiles = triton.cdiv(n_rows, block_r)
    # Enough programs to fill the GPU twice over; fewer means fewer partial dw rows to sum.
    max_progs = 2 * _sm_count(x.device.index or 0) if x.is_cuda else 4
    tiles_per_prog = triton.cdiv(n_tiles, min(n_tiles, max_progs))
    n_progs = triton.cdiv(n_tiles, tiles_per_prog)
    alloc = torch.empty if one_pass else torch.zeros  # the streamed path adds into its partial row
    dw_part = alloc((n_progs, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_progs,)](
        dy2, x2, weight, rstd, dh2, dx, dw_part, n_rows, n_cols, tiles_per_prog * block_r,
        dy2.stride(0), x2.stride(0), dh2.stride(0), dx.stride(0),
        HAS_DH=dh is not None, ONE_PASS=one_pass, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- autograd


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, _, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        y, h, rstd = rms_norm_fwd(x, weight, eps, residual=residual)
        ctx.save_for_backward(h, weight, rstd)  # h is an output anyway: saving it costs nothing
        ctx.residual_dtype = residual.dtype
        return h, y

    @staticmethod
    def backward(ctx, dh: Tensor, dy: Tensor):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, h, weight, rstd, dh=dh)
        # d(x + residual) passes the same gradient to both, as torch's own add does.
        dres = dx if ctx.residual_dtype == dx.dtype else dx.to(ctx.residual_dtype)
        return dx, dres, (dw if ctx.needs_input_grad[2] else None), None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim. x (..., C), weight (C,)."""
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(h, y): h = x + residual in x's dtype, y = rms_norm(h). x, residual (..., C), weight (C,)."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)
