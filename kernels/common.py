"""Helpers shared by the kernel files: @triton.jit building blocks, launcher utilities, and the
description of a compile configuration (`AotCase`) that each kernel file enumerates for the
ahead-of-time check (`python -m kernels.aot`).

Kernel files import shared code from here only, never from each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # scores are kept in base 2: exp(x) = exp2(x * log2(e))


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def rne_cast(x, ptr):
    # x (fp32 tile) cast to ptr's element type, rounding to nearest even. A plain .to() does
    # exactly that on a GPU, but the interpreter truncates fp32 -> bf16 (up to one bf16 ulp off,
    # failing the FlashAttention rule on CPU), so bf16 rounds in integer arithmetic: add half an
    # ulp (plus the tie-to-even bit) to the fp32 bits and keep the top 16. NaNs are passed through.
    # Costs a few integer ops per element, nothing next to the memory traffic.
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x != x, x.to(tl.bfloat16), r)
    else:
        y = x.to(ptr.dtype.element_ty)
    return y


@triton.jit
def query_tile_key_range(m0, off, S, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # Key blocks a tile of queries [m0, m0 + BLOCK_M) at positions m0 + off ... visits, as block-aligned
    # bounds lo <= a <= z <= hi: [lo, a) is cut by the window, [a, z) is fully seen by every query of the
    # tile (no mask arithmetic), [z, hi) is cut by the causal diagonal or the end of the keys.
    # off = S - T (bottom-right causal alignment); W: window length (read only when WINDOW).
    hi = S
    full_hi = S
    if CAUSAL:
        hi = tl.minimum(S, m0 + BLOCK_M + off)
        full_hi = tl.minimum(S, m0 + off + 1)
    hi = tl.maximum(hi, 0)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = (tl.maximum(m0 + off - W + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + off - W, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    z = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, z, hi


@triton.jit
def key_block_query_range(n0, off, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # The transpose of query_tile_key_range: query blocks (step BLOCK_M) that see any key of the block
    # [n0, n0 + BLOCK_N), as lo <= a <= z <= hi with [a, z) the blocks that see all of its keys.
    lo = 0
    full_lo = 0
    if CAUSAL:
        lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    hi = T
    full_hi = T
    if WINDOW:
        hi = tl.minimum(T, n0 + BLOCK_N - 1 + W - off)
        full_hi = tl.minimum(T, n0 + W - off)
    hi = tl.maximum(hi, 0)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    z = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, z, hi


@triton.jit
def doc_query_tile_key_range(start_row_ptr, m0, T, lo, a, z, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # query_tile_key_range narrowed by a document mask (packed rows, S == T, causal): start_row_ptr holds
    # each token's document start (non-decreasing along the row), so the tile's first query bounds what any
    # row sees (key tiles before its document start are skipped: the FLOPs saved) and its last query what
    # every row fully sees. Returns lo <= a <= z (hi unchanged); keys in [lo, a) and [z, hi) are masked.
    first = tl.load(start_row_ptr + m0)
    last = tl.load(start_row_ptr + tl.minimum(m0 + BLOCK_M, T) - 1)
    lo = tl.minimum(tl.maximum(lo, (first // BLOCK_N) * BLOCK_N), hi)
    a = tl.maximum(tl.minimum(tl.maximum(a, tl.cdiv(last, BLOCK_N) * BLOCK_N), hi), lo)
    z = tl.maximum(z, a)
    return lo, a, z


@triton.jit
def doc_key_block_query_range(end_row_ptr, n0, S, lo, a, z, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The transpose, for a key block [n0, n0 + BLOCK_N): end_row_ptr holds each token's document end
    # (exclusive). Only queries before the end of the block's last key's document see it (query blocks past
    # it are skipped); query blocks before the end of its first key's document see all of it.
    # Returns a <= z <= hi (lo unchanged).
    end_first = tl.load(end_row_ptr + n0)
    end_last = tl.load(end_row_ptr + tl.minimum(n0 + BLOCK_N, S) - 1)
    hi = tl.minimum(hi, end_last)
    z = tl.maximum(tl.minimum(z, (end_first // BLOCK_M) * BLOCK_M), lo)
    a = tl.minimum(a, z)
    return a, z, hi


@triton.jit
def decode_query_tile(q_ptr, len_ptr, stride_qb, stride_qt, stride_qh, Tq, G, S_max, n_gc, n_qc,
                      HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, G_BLOCK: tl.constexpr, TQ_BLOCK: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    # The query tile of a split-KV decode program (decode and paged decode): grid (B, Hkv * n_gc * n_qc,
    # n_splits). Row r of the tile is query head hk*G + gc*G_BLOCK + r // TQ_BLOCK of token
    # qc*TQ_BLOCK + r % TQ_BLOCK, so the heads of one kv group share every K/V load.
    # Returns (b64, hk, qc, L, h, t, row_ok, pos, offs_d, d_ok, q): L the row's length clamped to [0, S_max]
    # (never read outside the cache), pos each row's absolute position, q (BLOCK_M, BLOCK_D).
    b = tl.program_id(0)
    pid1 = tl.program_id(1)
    qc = pid1 % n_qc
    gc = (pid1 // n_qc) % n_gc
    hk = pid1 // (n_qc * n_gc)
    L = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 0), S_max)
    b64 = b.to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    gl = r // TQ_BLOCK
    g = gc * G_BLOCK + gl
    t = qc * TQ_BLOCK + r % TQ_BLOCK
    row_ok = (gl < G_BLOCK) & (g < G) & (t < Tq)
    h = hk * G + g
    pos = L - Tq + t
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(q_ptr + b64 * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return b64, hk, qc, L, h, t, row_ok, pos, offs_d, d_ok, q


@triton.jit
def online_softmax_step(qk, m_i, l_i):
    # One key step of the online softmax (base 2), qk (BLOCK_M, BLOCK_N) masked with -inf:
    # returns (p, alpha, new running max, new running sum); the caller rescales acc by alpha and adds p @ v.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2 -> 0, not NaN
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(qk - m_shift[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def store_decode_partial(o_part_ptr, lse_part_ptr, acc, m_i, l_i, b64, h, t, row_ok, offs_d, d_ok, H, Tq,
                         n_splits, HEAD_D: tl.constexpr):
    # A split's normalised partial output and its log-sum-exp (-inf when it saw no key: weight 0 in the
    # combine), laid out (B, H, Tq, n_splits, D) so the combine reads one contiguous slab per output.
    empty = l_i == 0.0  # split beyond this row's length, outside its window, or in its causal future
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    part = ((b64 * H + h) * Tq + t) * n_splits + tl.program_id(2)
    tl.store(lse_part_ptr + part, lse, mask=row_ok)
    tl.store(o_part_ptr + part[:, None] * HEAD_D + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def decode_combine_kernel(o_part_ptr, lse_part_ptr, out_ptr,
                          Tq, H, n_splits,  # new tokens, query heads, splits per output row
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_S: tl.constexpr):  # splits handled per step
    # Split-KV decoding's second pass (kernels/decode.py, kernels/paged_decode.py), one program per
    # (row, head, token): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max) over the normalised
    # fp32 partials o_part (B, H, Tq, n_splits, HEAD_D) and their base-2 lse_part (-inf: saw no key).
    row = tl.program_id(0).to(tl.int64)  # index into the partials' (B, H, Tq) rows
    t = row % Tq
    h = (row // Tq) % H
    b = row // (Tq * H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        lse = tl.load(lse_part_ptr + row * n_splits + s0 + offs_s, mask=s0 + offs_s < n_splits,
                      other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse)
    m = tl.max(m_vec, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: all weights 0, output 0
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s_ok = s0 + offs_s < n_splits
        lse = tl.load(lse_part_ptr + row * n_splits + s0 + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.exp2(lse - m)
        o = tl.load(o_part_ptr + (row * n_splits + s0 + offs_s[:, None]) * HEAD_D + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * o
        den += w
    total = tl.sum(den, 0)
    out = tl.sum(acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + ((b * Tq + t) * H + h) * HEAD_D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


COMBINE_BLOCK_S = 32  # splits per combine step; fewer are masked (one compiled combine per head dim)


def decode_tile_rows(block_d: int) -> int:
    """Most tile rows (query heads x tokens) of a split-KV decode program (kernels/decode.py,
    kernels/paged_decode.py): 128, and 64 at head dim 256, so the fp32 accumulator (rows, BLOCK_D)
    plus the resident q tile fit 8 warps' registers (128 rows at D=256 spilled)."""
    return max(16, min(128, 16384 // block_d))


DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_GPU_DTYPES = (torch.float16, torch.bfloat16)  # fp32 decode kernels: interpreter only (their GPU tiles spill)
DECODE_MAX_TQ_BLOCK = 16  # tokens per tile (more tokens run as several token chunks)
DECODE_MIN_SPLIT = 256  # keys per split at least, so each program runs several pipelined K/V steps
DECODE_MAX_SPLITS = 256


def decode_tile(Tq: int, G: int, D: int) -> dict:
    """The split-KV decode tile (decode and paged decode): TQ_BLOCK tokens x G_BLOCK heads of one kv group,
    BLOCK_M = their product (at least 16 for tl.dot), bounded by decode_tile_rows so registers stay bounded
    for wide MQA groups; BLOCK_D the head dim's power-of-two pad."""
    tq_block = min(triton.next_power_of_2(Tq), DECODE_MAX_TQ_BLOCK)
    block_d = max(16, triton.next_power_of_2(D))
    g_block = min(triton.next_power_of_2(G), max(1, decode_tile_rows(block_d) // tq_block))
    return dict(HEAD_D=D, BLOCK_D=block_d, G_BLOCK=g_block, TQ_BLOCK=tq_block, BLOCK_M=max(16, g_block * tq_block))


def decode_splits(x: Tensor, programs: int, S_max: int) -> int:
    """Key splits per row by default: about two waves of programs on the device's SMs, at most S_max /
    DECODE_MIN_SPLIT and DECODE_MAX_SPLITS (each row cuts its own length that many ways in the kernel)."""
    n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    return max(1, min(triton.cdiv(2 * n_sm, programs), triton.cdiv(S_max, DECODE_MIN_SPLIT), DECODE_MAX_SPLITS))


def decode_warps(block_m: int, block_d: int) -> int:
    """Warps of a split-KV decode program: 4 up to 32 accumulator values per thread, else 8 (ptxas:
    128 x 64 and wider tiles at 4 warps spilled 4-256 B on sm_80/sm_90)."""
    return 4 if block_m * block_d <= 4096 else 8


# ----------------------------------------------------------------------------- launcher helpers


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_gpu_dtype(op: str, x: Tensor, gpu_dtypes: tuple[torch.dtype, ...]) -> None:
    """Refuse a dtype whose kernel is not compiled for GPUs (fp32 attention and decoding: their tiles
    spill at every size); the interpreter still runs it on CPU. llm.ops sends such tensors to the
    reference instead."""
    if x.dtype not in gpu_dtypes and not interpreting():
        names = ", ".join(DTYPE_NAMES.get(d, str(d)) for d in gpu_dtypes)
        raise ValueError(f"{op}: the Triton kernel does not run {DTYPE_NAMES.get(x.dtype, x.dtype)} on a GPU "
                         f"(only {names}); use kernels.reference (llm.ops does so for kernels='auto')")


def doc_bounds(segments: Tensor | None, q: Tensor, k: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Each token's document [start, end) from segment ids (B, T): int32 (B, T) each, on the device with no
    host sync (a new document wherever the id changes, as `kernels.reference.doc_runs_ref`). Without
    segments: two one-element placeholders the kernels never read (DOC=False)."""
    if segments is None:
        none = torch.zeros(1, dtype=torch.int32, device=q.device)
        return none, none
    B, T = q.shape[:2]
    if k.shape[1] != T or tuple(segments.shape) != (B, T) or segments.device != q.device:
        raise ValueError(f"document masking needs self-attention (S == T) and segments (B, T) = {(B, T)} on "
                         f"{q.device}, got S={k.shape[1]} and segments {tuple(segments.shape)} on {segments.device}")
    if not causal:
        raise ValueError("document masking is causal (each token sees the earlier tokens of its document)")
    idx = torch.arange(T, device=q.device)
    new = torch.ones((B, T), dtype=torch.bool, device=q.device)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.where(new, idx, 0).cummax(1).values
    last = torch.ones((B, T), dtype=torch.bool, device=q.device)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, idx + 1, T).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def rows_contiguous(x: Tensor) -> Tensor:
    """Kernels take any leading strides but need unit stride along the last dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def pow2_range(lo: int, hi: int) -> list[int]:
    """Powers of two lo, 2 lo, ..., hi (both powers of two)."""
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------- ahead-of-time cases


@dataclass(frozen=True)
class AotCase:
    """One compile of one kernel: what a launcher or autotuner can run on a GPU.

    kernel: the @triton.jit function; consts: its constexpr arguments; num_warps / num_stages as
    launched; ptrs: dtype of every pointer argument (names end in `_ptr`) not given `dtype`;
    dtype: default pointer dtype; scalars: example values of non-pointer arguments where the
    default stand-in (4096 for strides, 1000 otherwise: no divisibility-by-16 specialisation of
    sizes, as on a generic call) is not right (floats must be given as floats); archs: the GPU
    majors (8 = sm_80, 9 = sm_90) this configuration can be picked on; label: what the kernel
    computes with it (dtype, head dim, ...), for the report.
    """

    kernel: object
    consts: dict
    num_warps: int
    num_stages: int
    dtype: torch.dtype
    label: str
    archs: tuple[int, ...] = (8, 9)
    ptrs: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)

    def config_str(self) -> str:
        c = " ".join(f"{k}={v}" for k, v in self.consts.items())
        return f"{c} w{self.num_warps} s{self.num_stages}"
