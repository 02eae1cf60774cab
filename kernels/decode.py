"""Flash-decoding: a few new query tokens against a KV cache with per-row lengths (inference only).

Same semantics as `kernels.reference.decode_attention_ref`: q (B, Tq, H, D); caches (B, S_max, Hkv, D);
lengths (B,) valid entries per row *including* the Tq new tokens; query t of row b sits at position
lengths[b] - Tq + t and sees keys 0..that position.

Decoding has one query token per head, so a program per (row, head) would leave most of the GPU idle
on long caches. Instead:
  1. `_decode_fwd_kernel`: grid (B, Hkv x head-chunks x token-chunks, splits). Each program takes all the
     query heads of one kv group (and a chunk of the Tq tokens) as the rows of one tile, so every K/V
     element is read once per group, and runs an online softmax over one contiguous split of the keys.
     It writes a normalised partial output and its log-sum-exp (base 2; -inf when it saw no key).
  2. `kernels.common.decode_combine_kernel` (shared with the paged kernel): per (row, head, token),
     out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
The number of splits comes from the SM count (about two waves of programs, capped by the cache capacity
S_max / 256), and each program sizes its split from its own row's length, so a single sequence with a
long cache still fills the GPU, ragged rows are balanced, and no host sync reads `lengths` (the decode
step stays CUDA-graph friendly; a max over lengths on the host would stall every layer of every token).

Any Tq is accepted: Tq > 16 runs the tokens in chunks of 16 (token-chunk grid axis). Prefill-like calls
with every row at one length are sent to `attention` by `llm.ops.kv_attention` before they get here (it
parallelises over query blocks). Only Tq > 16 checks lengths on the host (a prefill call can afford the
sync). No autograd: inputs that require grad are refused. fp32 runs only under the interpreter (its
tiles spill on GPUs; `llm.ops` sends fp32 CUDA tensors to the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import (
    COMBINE_BLOCK_S,
    DECODE_DTYPES,
    DECODE_GPU_DTYPES,
    DECODE_MAX_TQ_BLOCK,
    DECODE_MIN_SPLIT,
    DTYPE_NAMES,
    LOG2E,
    AotCase,
    check_gpu_dtype,
    decode_combine_kernel,
    decode_query_tile,
    decode_splits,
    decode_tile,
    decode_warps,
    interpreting,
    online_softmax_step,
    pow2_range,
    rows_contiguous,
    store_decode_partial,
)


@triton.jit
def _decode_fwd_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_part_ptr, lse_part_ptr,
                       stride_qb, stride_qt, stride_qh,  # q (B, Tq, H, D), last dim contiguous
                       stride_kb, stride_ks, stride_kh,  # k cache (B, S_max, Hkv, D)
                       stride_vb, stride_vs, stride_vh,  # v cache (B, S_max, Hkv, D)
                       Tq, H, G,  # new tokens, query heads, query heads per kv head
                       S_max,  # cache capacity: lengths are clamped to [0, S_max] (never read outside)
                       n_gc, n_qc,  # head chunks per group, token chunks (grid axis 1 = Hkv * n_gc * n_qc)
                       n_splits,  # key splits (grid axis 2)
                       split_size,  # keys per split; 0: each row splits its own length n_splits ways
                       min_split,  # with split_size 0, keys per split at least this (a multiple of BLOCK_N)
                       qk_scale,  # softmax scale * log2(e)
                       HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,  # head dim and its power-of-two pad
                       BLOCK_N: tl.constexpr,  # keys per inner step
                       G_BLOCK: tl.constexpr, TQ_BLOCK: tl.constexpr,  # heads x tokens packed in a tile
                       BLOCK_M: tl.constexpr):  # tile rows: G_BLOCK * TQ_BLOCK, at least 16 for tl.dot
    b64, hk, qc, L, h, t, row_ok, pos, offs_d, d_ok, q = decode_query_tile(
        q_ptr, len_ptr, stride_qb, stride_qt, stride_qh, Tq, G, S_max, n_gc, n_qc,
        HEAD_D, BLOCK_D, G_BLOCK, TQ_BLOCK, BLOCK_M)
    s = tl.program_id(2)

    # Splits are sized per row from its own length (no host-side max): short rows leave late splits empty.
    if split_size > 0:
        keys = split_size
    else:
        keys = tl.maximum(min_split, tl.cdiv(tl.cdiv(L, n_splits), BLOCK_N) * BLOCK_N)
    start = s * keys
    end = tl.minimum(start + keys, L)
    # No row of this token chunk sees past the position of its last token (causal among new tokens).
    end = tl.minimum(end, L - Tq + tl.minimum(qc * TQ_BLOCK + TQ_BLOCK, Tq))
    k_base = k_ptr + b64 * stride_kb + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk * stride_vh
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = cols < end
        kT = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kT) * qk_scale
        qk = tl.where(kv_ok[None, :] & (cols[None, :] <= pos[:, None]), qk, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    store_decode_partial(o_part_ptr, lse_part_ptr, acc, m_i, l_i, b64, h, t, row_ok, offs_d, d_ok, H, Tq, n_splits,
                         HEAD_D)


# ----------------------------------------------------------------------------- launchers



def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor) -> None:
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"decode_attention expects q (B, Tq, H, D) and caches (B, S_max, Hkv, D), got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    B, _, H, D = q.shape
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         f"(B={B}, S_max, Hkv, D={D})")
    if H % k_cache.shape[2]:
        raise ValueError(f"n_head {H} is not a multiple of n_kv_head {k_cache.shape[2]}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim {D} is not supported (1..256)")
    if q.dtype not in DECODE_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share one dtype among {DECODE_DTYPES}, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q and caches must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    check_gpu_dtype("decode_attention", q, DECODE_GPU_DTYPES)
    if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor of shape ({B},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("decode_attention is inference-only (no backward): call it under torch.no_grad(), "
                         "or use kernels.attention.attention for training")


def decode_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float,
                         split_size: int | None = None, num_splits: int | None = None) -> Tensor:
    """Split-KV decode attention, returns (B, Tq, H, D) in q's dtype.

    Splits: by default their number comes from the SM count (about two waves of programs, at most
    S_max / 256) and each row cuts its own length into that many pieces (at least 256 keys each), inside
    the kernel, so no host sync on `lengths` is needed (CUDA-graph friendly). split_size forces a fixed
    number of keys per split, num_splits a number of splits (tests use both to get several on short caches).
    """
    _check(q, k_cache, v_cache, lengths)
    q, k_cache, v_cache = (rows_contiguous(x) for x in (q, k_cache, v_cache))
    B, Tq, H, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    lengths = lengths.to(q.device)
    if Tq > DECODE_MAX_TQ_BLOCK:
        lo, hi = (int(x) for x in torch.stack([lengths.min(), lengths.max()]).tolist())  # host sync
        if lo < 0 or hi > S_max:
            raise ValueError(f"lengths must lie in [0, S_max={S_max}], got min {lo}, max {hi}")

    G = H // Hkv
    on_gpu = q.is_cuda and not interpreting()
    consts, launch = _tiles(Tq, G, D, q.dtype, on_gpu)
    n_qc, n_gc = triton.cdiv(Tq, consts["TQ_BLOCK"]), triton.cdiv(G, consts["G_BLOCK"])
    min_split = consts["BLOCK_N"]
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        n_splits = triton.cdiv(S_max, split_size)
    elif num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        n_splits, split_size = num_splits, 0
    else:
        n_splits = decode_splits(q, B * Hkv * n_gc * n_qc, S_max)
        split_size, min_split = 0, DECODE_MIN_SPLIT

    o_part = torch.empty((B, H, Tq, n_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, Tq, n_splits), dtype=torch.float32, device=q.device)
    _decode_fwd_kernel[(B, Hkv * n_gc * n_qc, n_splits)](
        q, k_cache, v_cache, lengths, o_part, lse_part,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        Tq, H, G, S_max, n_gc, n_qc, n_splits, split_size, min_split, scale * LOG2E, **consts, **launch)
    decode_combine_kernel[(B * H * Tq,)](
        o_part, lse_part, out, Tq, H, n_splits,
        HEAD_D=D, BLOCK_D=consts["BLOCK_D"], BLOCK_S=COMBINE_BLOCK_S)
    return out


def _tiles(Tq: int, G: int, D: int, dtype: torch.dtype, on_gpu: bool) -> tuple[dict, dict]:
    """(constexprs, launch options) of the split kernel for Tq tokens, G heads per group, head dim D."""
    consts = decode_tile(Tq, G, D)
    BLOCK_D = consts["BLOCK_D"]
    elem = torch.empty((), dtype=dtype).element_size()
    # K/V tiles of ~16 KB each: 64 keys at bf16/fp16 head dim 128, fewer for wider rows (fp32, D=256).
    consts["BLOCK_N"] = max(16, min(64, 16384 // (BLOCK_D * elem))) if on_gpu else 16
    # Two pipeline stages at head dim 16 (three spilled 8 B on sm_90 with 64-key blocks).
    launch = dict(num_warps=decode_warps(consts["BLOCK_M"], BLOCK_D),
                  num_stages=2 if BLOCK_D <= 16 or elem == 4 else 3) if on_gpu else {}
    return consts, launch


def aot_cases() -> list[AotCase]:
    """GPU compiles for `python -m kernels.aot`: every tile shape `_tiles` gives for Tq <= 16, any group
    size and each head-dim pad (one (G_BLOCK, TQ_BLOCK) split per distinct BLOCK_M: the packing only
    changes index arithmetic), per dtype; the combine per head dim."""
    f32 = torch.float32
    cases, seen = [], set()
    for dtype in DECODE_GPU_DTYPES:
        for D in (16, 32, 64, 96, 128, 256):
            for Tq in pow2_range(1, DECODE_MAX_TQ_BLOCK):
                for G in pow2_range(1, 256):
                    consts, launch = _tiles(Tq, G, D, dtype, on_gpu=True)
                    key = (dtype, D, consts["BLOCK_M"], consts["BLOCK_N"])
                    if key in seen:
                        continue
                    seen.add(key)
                    cases.append(AotCase(_decode_fwd_kernel, consts, launch["num_warps"], launch["num_stages"], dtype,
                                         f"{DTYPE_NAMES[dtype]} D={D} Tq={Tq} G={G}",
                                         ptrs={"len_ptr": torch.int64, "o_part_ptr": f32, "lse_part_ptr": f32},
                                         scalars={"qk_scale": 0.18}))
            cases.append(AotCase(decode_combine_kernel, dict(HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                                                             BLOCK_S=COMBINE_BLOCK_S), 4, 3, f32,
                                 f"{DTYPE_NAMES[dtype]} D={D}", ptrs={"out_ptr": dtype}))
    return cases


# ----------------------------------------------------------------------------- public API
# Forward only: there is no DecodeAttentionFunction (inference never differentiates through the cache).


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                     scale: float | None = None, split_size: int | None = None,
                     num_splits: int | None = None) -> Tensor:
    """Attention of Tq new tokens per row against a KV cache with per-row lengths (no autograd).

    q (B, Tq, H, D); k_cache, v_cache (B, S_max, Hkv, D), H % Hkv == 0; lengths (B,) int, valid cache
    entries per row including the new tokens, in [0, S_max] (checked only when Tq > 16; otherwise clamped
    in the kernel, since checking would cost a host sync). Query t of row b attends keys
    0..lengths[b] - Tq + t. scale defaults to D**-0.5; split_size / num_splits force the split-KV
    partition (for tests). Returns (B, Tq, H, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return decode_attention_fwd(q, k_cache, v_cache, lengths, scale, split_size, num_splits)
