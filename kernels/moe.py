"""Routed SwiGLU experts (dropless Mixture-of-Experts) as grouped GEMMs in Triton.

x (N, d); w_gate, w_up (E, F, d); w_down (E, d, F); topk_idx (N, k); topk_weight (N, k):
  out_n = sum_j w_nj * E_{e_nj}(x_n),   E_e(x) = W_down[e] (silu(W_gate[e] x) * (W_up[e] x)).

The N*k (token, slot) pairs are sorted by expert (stable, so the order is deterministic) into R = N*k "rows"; expert e
owns the contiguous segment [seg_start[e], seg_end[e]) of rows. Row tiles of BLOCK_M rows never straddle two experts,
and the tile list is built on the device with an upper bound on its length (R // BLOCK_M + min(E, R)), so nothing
waits for the host: unused tiles exit at once. That is also the decode path: with a handful of tokens each active
expert gets one 16-row tile, every active expert's weights are read once, and the launch is CUDA-graph friendly.

Forward, two grouped GEMMs:
  1. gate+up: per tile, g = x[tok] W_gate[e]^T, u = x[tok] W_up[e]^T share the loads of x; the epilogue writes
     h = silu(g) * u (and g, u for the backward).
  2. down: y = h W_down[e]^T; the epilogue multiplies by the routing weight and scatter-adds into the fp32 output
     row of the token (atomics; with k <= 2 the sum 0 + a + b is the same in either order, so it is deterministic;
     with k > 2 under torch's deterministic mode the rows are stored and summed in a fixed order instead).
Backward (a = dy[tok] W_down[e], s = sigmoid(g)):
  3. dh: a per tile; epilogue: dw_nj = <a, h> (per F-block partial sums), dh = w * a,
     dg = dh * u * s * (1 + g (1 - s)), du = dh * g * s.
  4. dx: dg W_gate[e] + du W_up[e], scatter-added into the token rows like 2.
  5. dW_gate[e] = dg_e^T x_e, dW_up[e] = du_e^T x_e, dW_down[e] = (w dy)_e^T h_e: one program per (expert, output
     tile) looping over the expert's rows; an expert with no rows gets exact zeros.
Accumulation is fp32 (fp32 inputs use IEEE dots, not TF32); stored tensors take x's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase, rows_contiguous

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs would run as TF32 (10-bit mantissa) on a GPU by default; the reference is fp32.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_rows(e, tile_row0_ptr, seg_end_ptr, BLOCK_M: tl.constexpr):
    # int64 sorted-row indices and row mask of this program's tile (axis 0 of the grid), which
    # belongs to expert e < n_experts: rows past the expert's segment are masked off.
    row0 = tl.load(tile_row0_ptr + tl.program_id(0))
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows < tl.load(seg_end_ptr + e)


@triton.jit
def _gate_up_fwd_kernel(
    x_ptr,  # (N, d) tokens; rows are gathered through pair_ptr
    wg_ptr,  # (E, F, d) gate weights, contiguous
    wu_ptr,  # (E, F, d) up weights, contiguous (same layout as wg)
    h_ptr,  # (R, F) out: silu(g) * u per sorted row, x's dtype
    g_ptr,  # (R, F) out when SAVE: gate pre-activation, x's dtype
    u_ptr,  # (R, F) out when SAVE: up pre-activation
    pair_ptr,  # (R,) int32: flat (token * k + slot) index of each sorted row
    tile_expert_ptr,  # (n_tiles,) int32: expert of each row tile, n_experts for unused tiles
    tile_row0_ptr,  # (n_tiles,) int32: first sorted row of each tile
    seg_end_ptr,  # (E,) int32: one past the last sorted row of each expert
    n_experts, d, F,  # sizes
    TOPK: tl.constexpr,  # k: token of a row = pair // k
    stride_x,  # row stride of x
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # rows, F columns, d chunk
    SAVE: tl.constexpr,  # write g and u for the backward
    IEEE: tl.constexpr,  # fp32 dots without TF32
):
    e = tl.load(tile_expert_ptr + tl.program_id(0))
    if e >= n_experts:  # the grid is an upper bound on the tile count
        return
    rows, rmask = _tile_rows(e, tile_row0_ptr, seg_end_ptr, BLOCK_M)
    tok = (tl.load(pair_ptr + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    w_off = e.to(tl.int64) * F * d + cols[None, :].to(tl.int64) * d  # (1, BLOCK_N): W[e, col, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d
        a = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & cmask[None, :]
        bg = tl.load(wg_ptr + w_off + ks[:, None], mask=bmask, other=0.0)  # (BLOCK_K, BLOCK_N) = W_gate[e]^T
        bu = tl.load(wu_ptr + w_off + ks[:, None], mask=bmask, other=0.0)
        acc_g = _dot(a, bg, acc_g, IEEE)
        acc_u = _dot(a, bu, acc_u, IEEE)
    # h from g and u rounded to the storage dtype, as a dense bf16 MLP computes it; the backward
    # recomputes exactly this h from the saved g and u.
    g = acc_g.to(h_ptr.dtype.element_ty)
    u = acc_u.to(h_ptr.dtype.element_ty)
    gf = g.to(tl.float32)
    h = gf / (1.0 + tl.exp(-gf)) * u.to(tl.float32)
    offs = rows[:, None] * F + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(g_ptr + offs, g, mask=mask)
        tl.store(u_ptr + offs, u, mask=mask)


@triton.jit
def _scatter_gemm_kernel(
    a1_ptr,  # (R, K) sorted rows, contiguous: h (forward) or dg (backward)
    b1_ptr,  # expert weights; element [e, kk, n] at e * stride_be + kk * stride_bk + n * stride_bn
    a2_ptr,  # (R, K) second operand pair when TWO (du)
    b2_ptr,  # second weights when TWO (W_up), same strides as b1
    w_ptr,  # (N * k,) routing weights (read when SCALE)
    out_ptr,  # ATOMIC: (N, Dout) fp32, zero-initialized, scatter-added; else (N * k, Dout) fp32 per pair
    pair_ptr, tile_expert_ptr, tile_row0_ptr, seg_end_ptr,  # the schedule (see _gate_up_fwd_kernel)
    n_experts, K, Dout,  # reduction width, output width
    TOPK: tl.constexpr,  # k
    stride_be, stride_bk, stride_bn,  # weight strides (elements)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TWO: tl.constexpr,  # out = a1 b1 + a2 b2
    SCALE: tl.constexpr,  # multiply each row by its routing weight
    ATOMIC: tl.constexpr,  # scatter-add into token rows (else store per pair)
    IEEE: tl.constexpr,
):
    # out[tok(row)] += w(row) * (a1[row] @ B1[e] (+ a2[row] @ B2[e])) for the rows of one tile.
    e = tl.load(tile_expert_ptr + tl.program_id(0))
    if e >= n_experts:
        return
    rows, rmask = _tile_rows(e, tile_row0_ptr, seg_end_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < Dout
    b_off = e.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        amask = rmask[:, None] & kmask[None, :]
        bmask = kmask[:, None] & cmask[None, :]
        a = tl.load(a1_ptr + rows[:, None] * K + ks[None, :], mask=amask, other=0.0)
        b = tl.load(b1_ptr + b_off + ks[:, None].to(tl.int64) * stride_bk, mask=bmask, other=0.0)
        acc = _dot(a, b, acc, IEEE)
        if TWO:
            a = tl.load(a2_ptr + rows[:, None] * K + ks[None, :], mask=amask, other=0.0)
            b = tl.load(b2_ptr + b_off + ks[:, None].to(tl.int64) * stride_bk, mask=bmask, other=0.0)
            acc = _dot(a, b, acc, IEEE)
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0).to(tl.int64)
    if SCALE:
        acc = acc * tl.load(w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)[:, None]
    mask = rmask[:, None] & cmask[None, :]
    if ATOMIC:
        tok = pair // TOPK
        tl.atomic_add(out_ptr + tok[:, None] * Dout + cols[None, :], acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + pair[:, None] * Dout + cols[None, :], acc, mask=mask)


@triton.jit
def _down_bwd_kernel(
    dy_ptr,  # (N, d) gradient of the output, rows gathered through pair_ptr
    wd_ptr,  # (E, d, F) down weights, contiguous
    g_ptr, u_ptr,  # (R, F) saved gate / up pre-activations
    w_ptr,  # (N * k,) routing weights
    dg_ptr, du_ptr,  # (R, F) out: gradients of g and u, x's dtype
    dw_part_ptr,  # (R, n_col_blocks) fp32 out: partial sums of <a, h> per F block
    pair_ptr, tile_expert_ptr, tile_row0_ptr, seg_end_ptr,  # the schedule
    n_experts, d, F,
    TOPK: tl.constexpr,
    stride_dy,  # row stride of dy
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # rows, F columns, d chunk
    IEEE: tl.constexpr,
):
    e = tl.load(tile_expert_ptr + tl.program_id(0))
    if e >= n_experts:
        return
    rows, rmask = _tile_rows(e, tile_row0_ptr, seg_end_ptr, BLOCK_M)
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = pair // TOPK
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    w_off = e.to(tl.int64) * d * F + cols[None, :]  # W_down[e, kk, col] at w_off + kk * F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # a = dy[tok] @ W_down[e]
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d
        a = tl.load(dy_ptr + tok[:, None] * stride_dy + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wd_ptr + w_off + ks[:, None].to(tl.int64) * F, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
    offs = rows[:, None] * F + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    # h as the forward stored it (rounded to the storage dtype), so dw = <dy, y_e> exactly.
    h = (g * s * u).to(g_ptr.dtype.element_ty).to(tl.float32)
    n_blocks = tl.num_programs(1)
    tl.store(dw_part_ptr + rows * n_blocks + pid_n, tl.sum(acc * h, axis=1), mask=rmask)
    dh = acc * tl.load(w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * g * s).to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_kernel(
    a1_ptr,  # DOWN: dy (N, d) gathered by token and scaled by w; else dg (R, P) sorted rows
    a2_ptr,  # DOWN: unused; else du (R, P)
    b_ptr,  # DOWN: g (R, Q) (h is recomputed from g and u); else x (N, Q) gathered by token
    u_ptr,  # DOWN: u (R, Q)
    w_ptr,  # (N * k,) routing weights (DOWN)
    dw1_ptr,  # (E, P, Q) out: dW_down (DOWN) or dW_gate, weight dtype
    dw2_ptr,  # (E, P, Q) out: dW_up (not DOWN)
    pair_ptr,  # (R,) int32 flat pair index of each sorted row
    seg_start_ptr, seg_end_ptr,  # (E,) int32 row segment of each expert
    P, Q,  # output tile dims per expert
    TOPK: tl.constexpr,
    stride_tok,  # row stride of the token-indexed operand (dy or x)
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,  # rows per step, output tile
    DOWN: tl.constexpr,  # which gradient (see above)
    IEEE: tl.constexpr,
):
    # dW[e] = A_e^T B_e, summed over expert e's rows in BLOCK_M steps; no rows -> exact zeros.
    e = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask, qmask = ps < P, qs < Q
    start = tl.load(seg_start_ptr + e)
    end = tl.load(seg_end_ptr + e)
    acc1 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < end
        pair = tl.load(pair_ptr + rows, mask=rmask, other=0).to(tl.int64)
        tok = pair // TOPK
        amask = pmask[:, None] & rmask[None, :]  # A^T tile (BLOCK_P, BLOCK_M)
        bmask = rmask[:, None] & qmask[None, :]  # B tile (BLOCK_M, BLOCK_Q)
        if DOWN:
            dy = tl.load(a1_ptr + tok[None, :] * stride_tok + ps[:, None], mask=amask, other=0.0)
            w = tl.load(w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
            at = (dy.to(tl.float32) * w[None, :]).to(dy.dtype)
            g = tl.load(b_ptr + rows[:, None] * Q + qs[None, :], mask=bmask, other=0.0)
            u = tl.load(u_ptr + rows[:, None] * Q + qs[None, :], mask=bmask, other=0.0).to(tl.float32)
            gf = g.to(tl.float32)
            h = (gf / (1.0 + tl.exp(-gf)) * u).to(g.dtype)
            acc1 = _dot(at, h, acc1, IEEE)
        else:
            xb = tl.load(b_ptr + tok[:, None] * stride_tok + qs[None, :], mask=bmask, other=0.0)
            a1 = tl.load(a1_ptr + rows[None, :] * P + ps[:, None], mask=amask, other=0.0)
            a2 = tl.load(a2_ptr + rows[None, :] * P + ps[:, None], mask=amask, other=0.0)
            acc1 = _dot(a1, xb, acc1, IEEE)
            acc2 = _dot(a2, xb, acc2, IEEE)
    offs = e * P * Q + ps[:, None].to(tl.int64) * Q + qs[None, :]
    mask = pmask[:, None] & qmask[None, :]
    tl.store(dw1_ptr + offs, acc1.to(dw1_ptr.dtype.element_ty), mask=mask)
    if not DOWN:
        tl.store(dw2_ptr + offs, acc2.to(dw2_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


class Schedule(NamedTuple):
    """Pairs sorted by expert and cut into row tiles; every field lives on the device."""

    pair: Tensor  # (R,) int32: flat (token * k + slot) index of each sorted row
    seg_start: Tensor  # (E,) int32: first sorted row of each expert
    seg_end: Tensor  # (E,) int32: one past its last row
    tile_expert: Tensor  # (n_tiles,) int32: expert of each BLOCK_M-row tile (E for unused tiles)
    tile_row0: Tensor  # (n_tiles,) int32: first row of each tile
    block_m: int
    top_k: int


class _Blocks(NamedTuple):
    m: int  # rows per tile (grouped GEMMs)
    n_gate_up: int  # F columns per program of the gate+up GEMM (two accumulators)
    n: int  # output columns per program of the other row-tile GEMMs
    k: int  # reduction chunk
    p: int  # dW tile rows
    q: int  # dW tile columns
    r: int  # rows per reduction step of the dW GEMMs
    warps: int
    stages: int


def schedule(topk_idx: Tensor, n_experts: int, block_m: int) -> Schedule:
    """Sort the N*k (token, slot) pairs by expert (stable) and tile each expert's rows.

    No host synchronization: segment bounds come from searchsorted over the sorted expert ids (ids outside [0, E) fall
    outside every segment and are skipped, as in the reference), and the tile list has the static length R // block_m +
    min(E, R) >= sum_e ceil(count_e / block_m).
    """
    R, k = topk_idx.numel(), topk_idx.shape[1]
    dev = topk_idx.device
    sorted_e, order = torch.sort(topk_idx.reshape(-1).long(), stable=True)
    experts = torch.arange(n_experts, device=dev)
    seg_start = torch.searchsorted(sorted_e, experts)
    seg_end = torch.searchsorted(sorted_e, experts, right=True)
    tiles = (seg_end - seg_start + block_m - 1) // block_m  # (E,)
    tile_end = tiles.cumsum(0)
    t = torch.arange(R // block_m + min(n_experts, R), device=dev)
    tile_expert = torch.searchsorted(tile_end, t, right=True)  # E past the last used tile
    e = tile_expert.clamp(max=n_experts - 1)
    row0 = seg_start[e] + (t - (tile_end[e] - tiles[e])) * block_m
    i32 = torch.int32
    return Schedule(order.to(i32), seg_start.to(i32), seg_end.to(i32), tile_expert.to(i32), row0.to(i32),
                    block_m, k)


def _blocks(rows: int, n_experts: int, x: Tensor) -> _Blocks:
    """Tile sizes for x's dtype and device (see `_gpu_blocks`); few wide tiles under the interpreter."""
    if not x.is_cuda:  # TRITON_INTERPRET=1: each program costs ~10 ms of Python; few, wide tiles
        m = _gpu_blocks(rows, n_experts, x.dtype).m
        return _Blocks(m=min(m, 32), n_gate_up=128, n=128, k=64, p=128, q=128, r=32, warps=4, stages=1)
    return _gpu_blocks(rows, n_experts, x.dtype)


def _gpu_blocks(rows: int, n_experts: int, dtype: torch.dtype) -> _Blocks:
    """GPU tiles: small row tiles for decode (a handful of rows per expert), large for training.

    Sized by the ahead-of-time compile check (benchmarks/NOTES.md): the earlier 128-column tiles with 64-wide reduction
    chunks spilled registers in most kernels (up to ~9 KB in the gate+up GEMM, whose two accumulators and gathered
    operand tiles live together), so every GEMM tile is at most 64 x 64 with a 32-wide chunk (128-row tiles still
    spilled 48-116 B in the gate+up and down-backward GEMMs), and the dW tiles 64 x 64 over 32-row steps. fp32 ("ieee",
    FMA) dots hold their operands per thread: 16-wide chunks, row tiles of at most 32, 8 warps, no pipelining.
    """
    per_expert = rows / max(1, n_experts)
    m = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    if dtype == torch.float32:
        m = min(m, 32)
        return _Blocks(m=m, n_gate_up=64, n=64, k=16, p=32, q=64, r=16, warps=8, stages=1)
    return _Blocks(m=m, n_gate_up=64, n=64, k=32, p=64, q=64, r=32, warps=8 if m >= 64 else 4, stages=3)


def aot_cases() -> list[AotCase]:
    """Every variant `_gpu_blocks` and the launchers can run (per row-tile size and dtype; top-k 2), for kernels.aot."""
    i32, f32, cases = torch.int32, torch.float32, []
    sched = {n: i32 for n in ("pair_ptr", "tile_expert_ptr", "tile_row0_ptr", "seg_start_ptr", "seg_end_ptr")}
    for dtype in _DTYPES:
        ieee, name = dtype == f32, DTYPE_NAMES[dtype]
        for per_expert in (1, 17, 100):
            bl = _gpu_blocks(per_expert, 1, dtype)
            label = f"{name} BLOCK_M={bl.m}"
            mk = dict(BLOCK_M=bl.m, BLOCK_K=bl.k, TOPK=2, IEEE=ieee)
            ptrs, w, st = dict(sched, w_ptr=f32, out_ptr=f32, dw_part_ptr=f32), bl.warps, bl.stages
            cases += [AotCase(_gate_up_fwd_kernel, dict(mk, BLOCK_N=bl.n_gate_up, SAVE=save), w, st, dtype, label,
                              ptrs=sched) for save in (False, True)]
            cases += [AotCase(_scatter_gemm_kernel, dict(mk, BLOCK_N=bl.n, TWO=two, SCALE=not two, ATOMIC=atomic), w,
                              min(st, 2) if two else st, dtype, label, ptrs=ptrs)
                      for two in (False, True) for atomic in (True, False)]
            cases.append(AotCase(_down_bwd_kernel, dict(mk, BLOCK_N=bl.n), w, st, dtype, label, ptrs=ptrs))
            cases += [AotCase(_dw_kernel, dict(BLOCK_M=bl.r, BLOCK_P=bl.p, BLOCK_Q=bl.q, TOPK=2, DOWN=down, IEEE=ieee),
                              w, st, dtype, label, ptrs=ptrs) for down in (False, True)]
    return cases


def _check(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor, topk_weight: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be (N, d), got shape {tuple(x.shape)}")
    if w_gate.dim() != 3:
        raise ValueError(f"moe_experts: w_gate must be (E, F, d), got shape {tuple(w_gate.shape)}")
    E, F, d = w_gate.shape
    if d != x.shape[1] or w_up.shape != w_gate.shape or w_down.shape != (E, d, F):
        raise ValueError(f"moe_experts: x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, "
                         f"w_down {tuple(w_down.shape)} do not fit (N, d), (E, F, d), (E, F, d), (E, d, F)")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_weight.shape != topk_idx.shape:
        raise ValueError(f"moe_experts: topk_idx {tuple(topk_idx.shape)} and topk_weight {tuple(topk_weight.shape)} "
                         f"must both be (N, k) with N = {x.shape[0]}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_experts: topk_idx must be int32/int64, got {topk_idx.dtype}")
    if x.dtype not in _DTYPES or any(w.dtype != x.dtype for w in (w_gate, w_up, w_down)):
        raise ValueError(f"moe_experts: x and the weights must share one of fp32/fp16/bf16, got {x.dtype}, "
                         f"{w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
    if topk_weight.dtype not in _DTYPES:
        raise ValueError(f"moe_experts: topk_weight must be a float tensor, got {topk_weight.dtype}")
    if len({t.device for t in (x, w_gate, w_up, w_down, topk_idx, topk_weight)}) != 1:
        raise ValueError("moe_experts: all inputs must be on one device")


def _scatter(a1: Tensor, b1: Tensor, a2: Tensor | None, b2: Tensor | None, w: Tensor, sch: Schedule, n_experts: int,
             n_tokens: int, out_dim: int, b_strides: tuple[int, int, int], scale: bool, bl: _Blocks) -> Tensor:
    """fp32 (N, out_dim): sum over each token's rows of (w *) a1[row] @ B1[e] (+ a2[row] @ B2[e])."""
    atomic = sch.top_k <= 2 or not torch.are_deterministic_algorithms_enabled()
    R = sch.pair.numel()
    out = torch.zeros((n_tokens if atomic else R, out_dim), dtype=torch.float32, device=a1.device)
    n_tiles = sch.tile_expert.numel()
    if n_tiles:
        grid = (n_tiles, triton.cdiv(out_dim, bl.n))
        _scatter_gemm_kernel[grid](
            a1, b1, a2 if a2 is not None else a1, b2 if b2 is not None else b1, w, out,
            sch.pair, sch.tile_expert, sch.tile_row0, sch.seg_end, n_experts, a1.shape[1], out_dim, sch.top_k,
            *b_strides, BLOCK_M=bl.m, BLOCK_N=bl.n, BLOCK_K=bl.k, TWO=a2 is not None, SCALE=scale, ATOMIC=atomic,
            IEEE=a1.dtype == torch.float32, num_warps=bl.warps,
            num_stages=bl.stages if a2 is None else min(bl.stages, 2))  # TWO loads twice the tiles
    return out if atomic else out.view(n_tokens, sch.top_k, out_dim).sum(1)


def moe_experts_fwd(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor, topk_weight: Tensor,
                    save: bool = False) -> tuple[Tensor, Schedule, Tensor | None, Tensor | None]:
    """(out (N, d) in x's dtype, schedule, g, u): g, u (R, F) pre-activations when `save`, else None."""
    _check(x, w_gate, w_up, w_down, topk_idx, topk_weight)
    (N, d), (E, F, _) = x.shape, w_gate.shape
    x, w_gate, w_up, w_down = rows_contiguous(x), w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    w = topk_weight.reshape(-1).contiguous()
    bl = _blocks(topk_idx.numel(), E, x)
    sch = schedule(topk_idx, E, bl.m)
    R = topk_idx.numel()
    h = torch.empty((R, F), dtype=x.dtype, device=x.device)
    g = torch.empty_like(h) if save else None
    u = torch.empty_like(h) if save else None
    n_tiles = sch.tile_expert.numel()
    if n_tiles:
        grid = (n_tiles, triton.cdiv(F, bl.n_gate_up))
        _gate_up_fwd_kernel[grid](
            x, w_gate, w_up, h, g if save else h, u if save else h, sch.pair, sch.tile_expert, sch.tile_row0,
            sch.seg_end, E, d, F, sch.top_k, x.stride(0), BLOCK_M=bl.m, BLOCK_N=bl.n_gate_up, BLOCK_K=bl.k,
            SAVE=save, IEEE=x.dtype == torch.float32, num_warps=bl.warps, num_stages=bl.stages)
    out = _scatter(h, w_down, None, None, w, sch, E, N, d, (d * F, 1, F), True, bl)
    return out.to(x.dtype), sch, g, u


def moe_experts_bwd(dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_weight: Tensor,
                    sch: Schedule, g: Tensor, u: Tensor, need_dw_down: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """(dx, dW_gate, dW_up, dW_down or None, d topk_weight) from the forward's schedule and saved g, u."""
    (N, d), (E, F, _) = x.shape, w_gate.shape
    dy, x = rows_contiguous(dy), rows_contiguous(x)
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    w = topk_weight.reshape(-1).contiguous()
    bl = _blocks(sch.pair.numel(), E, x)._replace(m=sch.block_m)
    R = sch.pair.numel()
    ieee = x.dtype == torch.float32
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n_blocks = triton.cdiv(F, bl.n)
    dw_part = torch.zeros((R, n_blocks), dtype=torch.float32, device=x.device)
    n_tiles = sch.tile_expert.numel()
    if n_tiles:
        _down_bwd_kernel[(n_tiles, n_blocks)](
            dy, w_down, g, u, w, dg, du, dw_part, sch.pair, sch.tile_expert, sch.tile_row0, sch.seg_end,
            E, d, F, sch.top_k, dy.stride(0), BLOCK_M=bl.m, BLOCK_N=bl.n, BLOCK_K=bl.k, IEEE=ieee,
            num_warps=bl.warps, num_stages=bl.stages)
    d_weight = torch.zeros(R, dtype=torch.float32, device=x.device).scatter_(0, sch.pair.long(), dw_part.sum(1))
    dx = _scatter(dg, w_gate, du, w_up, w, sch, E, N, d, (F * d, d, 1), False, bl).to(x.dtype)
    dw_gate, dw_up = torch.empty_like(w_gate), torch.empty_like(w_up)
    common = dict(BLOCK_M=bl.r, BLOCK_P=bl.p, BLOCK_Q=bl.q, IEEE=ieee, num_warps=bl.warps, num_stages=bl.stages)
    if E:
        _dw_kernel[(E, triton.cdiv(F, bl.p), triton.cdiv(d, bl.q))](
            dg, du, x, u, w, dw_gate, dw_up, sch.pair, sch.seg_start, sch.seg_end, F, d, sch.top_k, x.stride(0),
            DOWN=False, **common)
    dw_down = None
    if need_dw_down:
        dw_down = torch.empty_like(w_down)
        if E:
            _dw_kernel[(E, triton.cdiv(d, bl.p), triton.cdiv(F, bl.q))](
                dy, dy, g, u, w, dw_down, dw_down, sch.pair, sch.seg_start, sch.seg_end, d, F, sch.top_k,
                dy.stride(0), DOWN=True, **common)
    return dx, dw_gate, dw_up, dw_down, d_weight.view(topk_weight.shape).to(topk_weight.dtype)


# ----------------------------------------------------------------------------- autograd


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor, topk_weight: Tensor):
        out, sch, g, u = moe_experts_fwd(x, w_gate, w_up, w_down, topk_idx, topk_weight, save=True)
        ctx.save_for_backward(x, w_gate, w_up, w_down, topk_weight, g, u, *sch[:5])
        ctx.block_m, ctx.top_k = sch.block_m, sch.top_k
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w_gate, w_up, w_down, topk_weight, g, u, *s = ctx.saved_tensors
        sch = Schedule(*s, ctx.block_m, ctx.top_k)
        dx, dwg, dwu, dwd, dtw = moe_experts_bwd(dy, x, w_gate, w_up, w_down, topk_weight, sch, g, u,
                                                 need_dw_down=ctx.needs_input_grad[3])
        n = ctx.needs_input_grad
        return dx if n[0] else None, dwg if n[1] else None, dwu if n[2] else None, dwd, None, dtw if n[5] else None


def moe_experts(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor,
                topk_weight: Tensor) -> Tensor:
    """Routed SwiGLU experts (dropless) as grouped GEMMs; same contract as kernels.reference.moe_experts_ref.

    x (N, d); w_gate, w_up (E, F, d); w_down (E, d, F); topk_idx (N, k) int; topk_weight (N, k).
    Returns (N, d) in x's dtype. Under autocast x and the weights are cast to the autocast dtype (as the reference's
    matmuls would be); the routing weights keep their dtype.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w_gate, w_up, w_down = (t.to(dt) for t in (x, w_gate, w_up, w_down))
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate, w_up, w_down, topk_weight)):
            return MoEExpertsFunction.apply(x, w_gate, w_up, w_down, topk_idx, topk_weight)
        return moe_experts_fwd(x, w_gate, w_up, w_down, topk_idx, topk_weight)[0]
