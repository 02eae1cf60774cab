"""FlashAttention-2 style softmax attention with grouped-query heads, forward and backward.

Same semantics as `kernels.reference.attention_ref`: q (B, T, H, D), k/v (B, S, Hkv, D), H % Hkv == 0;
query head h reads kv head h // (H // Hkv) (K/V are never repeated in memory). Query i sits at absolute
position i + S - T (bottom-right causal alignment); key j is visible iff j <= pos(i) when causal, and
pos(i) - j < window when a window is given. A query that sees no key returns 0 (as the reference does).

Forward: one program per (BLOCK_M queries, batch, query head) streams K/V blocks with an online softmax
in fp32 (base 2: exp2 is one instruction) and stores the log-sum-exp. Key blocks are visited in three
phases: blocks partly cut by the window, blocks every query of the tile fully sees (no mask arithmetic),
blocks cut by the causal diagonal or the sequence end. Backward recomputes P from the stored lse:
  delta_i = rowsum(dO_i * O_i)                      (preprocess kernel)
  dV_j = sum_i P_ij dO_i ; dK_j = scale * sum_i dS_ij Q_i, dS = P * (dO V^T - delta)
         one program per key block and kv head, looping over the query heads of its group (so dK, dV
         are summed over the group without atomics) and over the query blocks that see the key block;
  dQ_i = scale * sum_j dS_ij K_j                     (one program per query block, like the forward).
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.attention_tiles import fitting, tile_shapes
from kernels.common import (
    DTYPE_NAMES,
    LOG2E,
    AotCase,
    check_gpu_dtype,
    doc_bounds,
    doc_key_block_query_range,
    doc_query_tile_key_range,
    interpreting,
    key_block_query_range,
    query_tile_key_range,
    rows_contiguous,
)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base_ptr, v_base_ptr, stride_ks, stride_vs, pos, starts, lo, hi, S, W,
               qk_scale,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr, DOC: tl.constexpr):
    # acc (BLOCK_M, BLOCK_D) fp32 unnormalised output; l_i, m_i (BLOCK_M,) running sum and max (base 2)
    # q (BLOCK_M, BLOCK_D) this tile's queries; k_base_ptr/v_base_ptr: this (batch, kv head)'s K/V
    # pos (BLOCK_M,) absolute query positions; starts (BLOCK_M,) first key of each query's document (read
    # only when DOC); [lo, hi) key range to visit, step BLOCK_N
    # MASK: apply bounds/causal/window/document masks (False only for blocks every query fully sees)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D  # padded head dims (80, 96) load as 0 and do not change q.k
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASK:
            kv_ok = cols < S
        else:
            kv_ok = cols >= 0  # unmasked blocks lie inside [0, S): only the head-dim padding is masked
        kT = tl.load(k_base_ptr + cols[None, :] * stride_ks + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kT) * qk_scale
        if MASK:
            keep = kv_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= pos[:, None])
            if WINDOW:
                keep = keep & ((pos[:, None] - cols[None, :]) < W)
            if DOC:
                keep = keep & (cols[None, :] >= starts[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet has m_new = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(qk - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base_ptr + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     start_ptr, end_ptr,  # (B, T) int32 document bounds of each token (read only when DOC)
                     stride_qb, stride_qt, stride_qh,  # q (B, T, H, D), last dim contiguous
                     stride_kb, stride_ks, stride_kh,  # k (B, S, Hkv, D)
                     stride_vb, stride_vs, stride_vh,  # v (B, S, Hkv, D)
                     stride_ob, stride_ot, stride_oh,  # o (B, T, H, D)
                     T, S, H, G, W,  # query/key lengths, query heads, heads per kv group, window
                     qk_scale,  # softmax scale * log2(e)
                     seq_bucket,  # unused in the body: autotune key (power-of-two bucket of max(T, S))
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,  # head dim and its power-of-two pad
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query / key tile sizes
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                     DOC: tl.constexpr):  # document mask (packed rows; S == T, causal)
    # Causal tiles near the end have the most keys: launch them first so the tail of the grid is short.
    n_m = tl.cdiv(T, BLOCK_M)
    pid_m = n_m - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // G
    off = S - T  # query i sits at position i + off
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + off
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_D), other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    # Key range any row of the tile sees, and the sub-range every row fully sees (no mask needed).
    lo, a, z, hi = query_tile_key_range(m0, off, S, W, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    starts = pos
    if DOC:  # key tiles before the tile's first document are never visited
        starts = tl.load(start_ptr + b * T + offs_m, mask=offs_m < T, other=0)
        lo, a, z = doc_query_tile_key_range(start_ptr + b * T, m0, T, lo, a, z, hi, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, pos, starts, lo, a, S, W,
                               qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, WINDOW, True, DOC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, pos, starts, a, z, S, W,
                               qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, WINDOW, False, DOC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, pos, starts, z, hi, S, W,
                               qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, WINDOW, True, DOC)

    empty = l_i == 0.0  # rows that see no key (T > S with causal, or a window): output 0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    # lse = +inf for empty rows makes the backward's exp2(s - lse) exactly 0 instead of NaN.
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    m_ok = offs_m < T
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D))


@triton.jit
def _attn_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr,
                                stride_ob, stride_ot, stride_oh,  # o (B, T, H, D)
                                stride_dob, stride_dot, stride_doh,  # dO (B, T, H, D), any row strides
                                T, H,
                                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-Jacobian term of dS, in fp32.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_D)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base_ptr, do_base_ptr, lse_base_ptr, delta_base_ptr, start_base_ptr,
                    stride_qt, stride_dot, cols, lo, hi, T, off, W, qk_scale,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr, DOC: tl.constexpr):
    # dk, dv (BLOCK_N, BLOCK_D) fp32 accumulators; k, v (BLOCK_N, BLOCK_D) this program's key block
    # *_base_ptr: one query head's Q, dO, lse, delta; the row's document starts (DOC); cols (BLOCK_N,) keys
    # [lo, hi) query range, step BLOCK_M; MASK False only for query blocks that fully see the key block
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        if MASK:
            r_ok = rows < T
        else:
            r_ok = rows >= 0  # unmasked query blocks lie inside [0, T)
        qT = tl.load(q_base_ptr + rows[None, :] * stride_qt + offs_d[:, None],
                     mask=r_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
        lse = tl.load(lse_base_ptr + rows, mask=r_ok, other=float("inf"))
        qkT = tl.dot(k, qT) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(qkT - lse[None, :])
        if MASK:
            keep = r_ok[None, :]
            pos = rows + off
            if CAUSAL:
                keep = keep & (cols[:, None] <= pos[None, :])
            if WINDOW:
                keep = keep & ((pos[None, :] - cols[:, None]) < W)
            if DOC:
                keep = keep & (cols[:, None] >= tl.load(start_base_ptr + rows, mask=r_ok, other=0)[None, :])
            pT = tl.where(keep, pT, 0.0)
        do = tl.load(do_base_ptr + rows[:, None] * stride_dot + offs_d[None, :],
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        delta = tl.load(delta_base_ptr + rows, mask=r_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          start_ptr, end_ptr,  # (B, T) int32 document bounds (DOC only)
                          stride_qb, stride_qt, stride_qh,  # q (B, T, H, D)
                          stride_kb, stride_ks, stride_kh,  # k (B, S, Hkv, D)
                          stride_vb, stride_vs, stride_vh,  # v (B, S, Hkv, D)
                          stride_dob, stride_dot, stride_doh,  # dO (B, T, H, D)
                          stride_dkb, stride_dks, stride_dkh,  # dk and dv (B, S, Hkv, D), same layout
                          T, S, H, G, W,  # lengths, query heads, heads per kv group, window
                          qk_scale, sm_scale,  # scale * log2(e) for P, plain scale for dK
                          seq_bucket,  # autotune key only
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    Hkv = H // G
    b = (pid_bk // Hkv).to(tl.int64)
    hk = pid_bk % Hkv
    off = S - T
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < S) & (offs_d[None, :] < HEAD_D)
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)

    # Query rows that see any key of this block, and the sub-range whose blocks see all of them.
    lo, a, z, hi = key_block_query_range(n0, off, T, W, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    if DOC:  # query blocks past the block's last document are never visited
        a, z, hi = doc_key_block_query_range(end_ptr + b * T, n0, S, lo, a, z, hi, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(G):  # the query heads sharing this kv head: their dK/dV contributions add up
        h = hk * G + g
        bh = b * H + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + bh * T
        delta_base = delta_ptr + bh * T
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_ptr + b * T,
                                 stride_qt, stride_dot, cols, lo, a, T, off, W, qk_scale, HEAD_D, BLOCK_D,
                                 BLOCK_M, CAUSAL, WINDOW, True, DOC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_ptr + b * T,
                                 stride_qt, stride_dot, cols, a, z, T, off, W, qk_scale, HEAD_D, BLOCK_D,
                                 BLOCK_M, CAUSAL, WINDOW, False, DOC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_ptr + b * T,
                                 stride_qt, stride_dot, cols, z, hi, T, off, W, qk_scale, HEAD_D, BLOCK_D,
                                 BLOCK_M, CAUSAL, WINDOW, True, DOC)
    out_off = b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :]
    tl.store(dk_ptr + out_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base_ptr, v_base_ptr, stride_ks, stride_vs, pos, starts, lo, hi, S, W,
                  qk_scale,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr, DOC: tl.constexpr):
    # dq (BLOCK_M, BLOCK_D) fp32 accumulator; q, do this tile's rows; lse, delta (BLOCK_M,)
    # [lo, hi) key range, step BLOCK_N; MASK as in the forward
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASK:
            kv_ok = cols < S
        else:
            kv_ok = cols >= 0
        kT = tl.load(k_base_ptr + cols[None, :] * stride_ks + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vT = tl.load(v_base_ptr + cols[None, :] * stride_vs + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if MASK:
            keep = kv_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= pos[:, None])
            if WINDOW:
                keep = keep & ((pos[:, None] - cols[None, :]) < W)
            if DOC:
                keep = keep & (cols[None, :] >= starts[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        start_ptr, end_ptr,  # (B, T) int32 document bounds (DOC only)
                        stride_qb, stride_qt, stride_qh,  # q (B, T, H, D)
                        stride_kb, stride_ks, stride_kh,  # k (B, S, Hkv, D)
                        stride_vb, stride_vs, stride_vh,  # v (B, S, Hkv, D)
                        stride_dob, stride_dot, stride_doh,  # dO (B, T, H, D)
                        stride_dqb, stride_dqt, stride_dqh,  # dq (B, T, H, D)
                        T, S, H, G, W, qk_scale, sm_scale,
                        seq_bucket,  # autotune key only
                        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOC: tl.constexpr):
    n_m = tl.cdiv(T, BLOCK_M)
    pid_m = n_m - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // G
    off = S - T
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + off
    m_ok = offs_m < T
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    lo, a, z, hi = query_tile_key_range(m0, off, S, W, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)  # as the forward
    starts = pos
    if DOC:
        starts = tl.load(start_ptr + b * T + offs_m, mask=m_ok, other=0)
        lo, a, z = doc_query_tile_key_range(start_ptr + b * T, m0, T, lo, a, z, hi, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, pos, starts, lo, a, S, W,
                       qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, WINDOW, True, DOC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, pos, starts, a, z, S, W,
                       qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, WINDOW, False, DOC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, pos, starts, z, hi, S, W,
                       qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, WINDOW, True, DOC)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp32 runs these kernels only under the interpreter (CPU tests). On a GPU, fp32 tiles spill at every size
# (FMA dots; 3xTF32 still spilled at head dim 256 and in dK/dV) and FlashAttention itself is fp16/bf16
# only, so llm.ops sends fp32 CUDA tensors to the reference and the launchers refuse them.
_GPU_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
# Interpreter tiles: small, and BLOCK_M != BLOCK_N, so CPU tests on short sequences cross tile edges and
# reach every masking phase (window-cut, full, causal/end-cut) with tiles misaligned to each other.
_INTERP_TILES = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
_TUNE_KEY = ["seq_bucket", "HEAD_D", "CAUSAL", "WINDOW", "DOC"]
_PRE_M = 64  # rows per program of the backward's delta preprocess
_AOT_HEAD_DIMS = (16, 32, 64, 96, 128, 256)


@functools.cache
def _tuned(kind: str, block_d: int, major: int, dtype: torch.dtype, smem_limit: int, doc: bool = False):
    """The autotuned kernel for (kind, head-dim pad, arch, dtype), its configurations pruned to the device's shared
    memory; built once, CUDA only. Keys bucket the length to a power of two: a new length re-tunes only per bucket."""
    kernel = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
    elem = torch.empty((), dtype=dtype).element_size()
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in fitting(kind, block_d, major, elem, smem_limit, doc)]
    # Kernels only write their own outputs, so re-running candidates during tuning is harmless.
    return triton.autotune(configs=configs, key=_TUNE_KEY)(kernel)


def _launch(kind: str, kernel, grid, args: tuple, consts: dict, device: torch.device) -> None:
    """Run `kernel` with autotuned tiles on CUDA, fixed small tiles under the interpreter."""
    if device.type == "cuda" and not interpreting():
        props = torch.cuda.get_device_properties(device)
        limit = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        _tuned(kind, consts["BLOCK_D"], props.major, args[0].dtype, limit, consts["DOC"])[grid](*args, **consts)
    else:
        bm, bn = _INTERP_TILES[kind]
        kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn)


def _check(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q (B, T, H, D) and k/v (B, S, Hkv, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, S, Hkv, D={D})")
    if H % k.shape[2]:
        raise ValueError(f"n_head {H} is not a multiple of n_kv_head {k.shape[2]}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported (1..{_MAX_HEAD_DIM})")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_gpu_dtype("attention", q, _GPU_DTYPES)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")


def _consts(D: int, causal: bool, window: bool, doc: bool = False) -> dict:
    return dict(HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=bool(causal), WINDOW=bool(window),
                DOC=bool(doc))


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  window: int | None, bounds: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Forward: returns o (B, T, H, D) in q's dtype and lse (B, H, T) fp32, base 2 (+inf: no key seen).
    bounds: `doc_bounds` of a document mask (None: no document mask)."""
    _check(q, k, v, window)
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    W = 0 if window is None else int(window)
    start, end = bounds or doc_bounds(None, q, k, causal)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    args = (q, k, v, o, lse, start, end, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            T, S, H, H // Hkv, W, scale * LOG2E, triton.next_power_of_2(max(T, S, 16)))
    _launch("fwd", _attn_fwd_kernel, grid, args, _consts(q.shape[3], causal, window is not None, bounds is not None),
            q.device)
    return o, lse


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                  scale: float, window: int | None,
                  bounds: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward from the forward's o and lse: returns dq (like q), dk and dv (like k), input dtypes."""
    q, k, v, o, do = (rows_contiguous(x) for x in (q, k, v, o, do))
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    c = _consts(q.shape[3], causal, window is not None, bounds is not None)
    start, end = bounds or doc_bounds(None, q, k, causal)
    W = 0 if window is None else int(window)
    G = H // Hkv
    bucket = triton.next_power_of_2(max(T, S, 16))
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, _PRE_M), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], T, H,
        HEAD_D=D, BLOCK_D=c["BLOCK_D"], BLOCK_M=_PRE_M)
    qkv_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)
    args = (q, k, v, do, lse, delta, dk, dv, start, end, *qkv_strides, *dk.stride()[:3],
            T, S, H, G, W, scale * LOG2E, scale, bucket)
    _launch("dkdv", _attn_bwd_dkdv_kernel, grid, args, c, q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    args = (q, k, v, do, lse, delta, dq, start, end, *qkv_strides, *dq.stride()[:3],
            T, S, H, G, W, scale * LOG2E, scale, bucket)
    _launch("dq", _attn_bwd_dq_kernel, grid, args, c, q.device)
    return dq, dk, dv


def aot_cases() -> list[AotCase]:
    """Every compile the launchers and autotuners can pick, for `python -m kernels.aot`: each dtype, one
    head dim per BLOCK_D pad (plus 96, a padded one), causal with a window (every mask term live), with and
    without the document mask."""
    f32 = torch.float32
    ptrs = {"lse_ptr": f32, "delta_ptr": f32, "start_ptr": torch.int32, "end_ptr": torch.int32}
    scalars = {"qk_scale": 0.18, "sm_scale": 0.125}
    kernels = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
    cases = []
    for dtype, D, doc in itertools.product(_GPU_DTYPES, _AOT_HEAD_DIMS, (False, True)):
        c = _consts(D, causal=True, window=True, doc=doc)
        label = f"{DTYPE_NAMES[dtype]} D={D}" + (" doc" if doc else "")
        if not doc:
            cases.append(AotCase(_attn_bwd_preprocess_kernel, dict(HEAD_D=D, BLOCK_D=c["BLOCK_D"],
                                                                   BLOCK_M=_PRE_M), 4, 3, dtype, label, ptrs=ptrs))
        for kind, kernel in kernels.items():
            archs: dict[tuple, list[int]] = {}
            for major in (8, 9):
                for shape in tile_shapes(kind, c["BLOCK_D"], major, doc):
                    archs.setdefault(shape, []).append(major)
            for (m, n, w, st), majors in archs.items():
                cases.append(AotCase(kernel, dict(c, BLOCK_M=m, BLOCK_N=n), w, st, dtype, label, tuple(majors),
                                     ptrs=ptrs, scalars=scalars))
    return cases


# ----------------------------------------------------------------------------- autograd + public API


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                window: int | None, segments: Tensor | None = None) -> Tensor:
        bounds = None if segments is None else doc_bounds(segments, q, k, causal)
        o, lse = attention_fwd(q, k, v, causal, scale, window, bounds)
        ctx.save_for_backward(q, k, v, o, lse, *(bounds or ()))
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, *bounds = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.window, tuple(bounds) or None)
        return dq, dk, dv, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
              window: int | None = None) -> Tensor:
    """softmax(scale * q k^T + mask) v with grouped-query heads; differentiable.

    q (B, T, H, D); k, v (B, S, Hkv, D) with H % Hkv == 0; any strides with a unit-stride head dim
    (others are copied). Query i sits at position i + S - T; causal: key j visible iff j <= pos(i);
    window w: also pos(i) - j < w. scale defaults to D**-0.5. Returns (B, T, H, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionFunction.apply(q, k, v, causal, scale, window)


def doc_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, causal: bool = True,
                  scale: float | None = None, window: int | None = None) -> Tensor:
    """Document-masked causal attention over packed rows (`kernels.reference.doc_attention_ref`); differentiable.

    q (B, T, H, D), k/v (B, T, Hkv, D); segments (B, T) ints, one value per contiguous document (a new
    document wherever the id changes). Query i sees key j iff j <= i in the same document (and i - j < window).
    Key tiles before a query tile's first document, and query blocks after a key block's last document, are
    skipped, so the work falls with the documents' lengths.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionFunction.apply(q, k, v, causal, scale, window, segments)
