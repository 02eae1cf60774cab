"""Flash-decoding over a paged KV cache: new query tokens against K/V stored in blocks of a pool (inference only).

Same semantics as `kernels.reference.paged_decode_attention_ref`: q (B, Tq, H, D); pools
(n_blocks, PAGE, Hkv, D); block_table (B, max_blocks) int32, row b's position p in block
block_table[b, p // PAGE], slot p % PAGE; lengths (B,) valid entries per row *including* the Tq new
tokens; query t of row b sits at p = lengths[b] - Tq + t and sees keys j <= p (and p - j < window).

The work split is `kernels.decode`'s: a program per (row, kv head, head chunk x token chunk, key split)
packs the query heads of one kv group as the rows of a tile (each K/V element read once per group),
runs an online softmax over its split, and writes a normalised partial plus its base-2 log-sum-exp;
`kernels.common.decode_combine_kernel` merges the splits. The only difference is the address of a key:
each key column looks up its block id in the row's block table (one small gather per BLOCK_N keys), so
blocks may sit anywhere in the pool, in any order, and any PAGE works (no alignment with BLOCK_N needed).
Splits are sized from each row's own length inside the kernel: no host sync on `lengths`.

Launch configurations: `LAUNCH_CONFIGS` lists every (BLOCK_N, num_warps, num_stages) the launcher can
pick and `launch_config` is the one function that picks; `aot_cases()` enumerates them with the head
dims, dtypes and tile shapes of `kernel_variants` for `python -m kernels.aot`. fp32 runs only under the
interpreter (fp32 decode tiles spill on GPUs; `llm.ops` sends fp32 CUDA tensors to the reference).
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
    rows_contiguous,
    store_decode_partial,
)


@triton.jit
def _paged_decode_fwd_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, o_part_ptr, lse_part_ptr,
                             stride_qb, stride_qt, stride_qh,  # q (B, Tq, H, D), last dim contiguous
                             stride_kn, stride_ks, stride_kh,  # k pool (n_blocks, PAGE, Hkv, D)
                             stride_vn, stride_vs, stride_vh,  # v pool (n_blocks, PAGE, Hkv, D)
                             stride_btb,  # block table (B, max_blocks) row stride, int32 entries
                             Tq, H, G,  # new tokens, query heads, query heads per kv head
                             S_max,  # max_blocks * PAGE: lengths are clamped to [0, S_max] (no read outside)
                             n_gc, n_qc,  # head chunks per group, token chunks (grid axis 1 = Hkv * n_gc * n_qc)
                             n_splits,  # key splits (grid axis 2)
                             min_split,  # keys per split at least (a multiple of BLOCK_N)
                             window,  # sliding window width; a huge value for full causal attention
                             qk_scale,  # softmax scale * log2(e)
                             PAGE: tl.constexpr,  # tokens per block
                             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,  # head dim and its power-of-two pad
                             BLOCK_N: tl.constexpr,  # keys per inner step
                             G_BLOCK: tl.constexpr, TQ_BLOCK: tl.constexpr,  # heads x tokens packed in a tile
                             BLOCK_M: tl.constexpr):  # tile rows: G_BLOCK * TQ_BLOCK, at least 16 for tl.dot
    b64, hk, qc, L, h, t, row_ok, pos, offs_d, d_ok, q = decode_query_tile(
        q_ptr, len_ptr, stride_qb, stride_qt, stride_qh, Tq, G, S_max, n_gc, n_qc,
        HEAD_D, BLOCK_D, G_BLOCK, TQ_BLOCK, BLOCK_M)
    s = tl.program_id(2)

    keys = tl.maximum(min_split, tl.cdiv(tl.cdiv(L, n_splits), BLOCK_N) * BLOCK_N)
    start = s * keys
    end = tl.minimum(start + keys, L)
    # No row of this token chunk sees past its last token (causal), nor before the window of its first.
    end = tl.minimum(end, L - Tq + tl.minimum(qc * TQ_BLOCK + TQ_BLOCK, Tq))
    start = tl.maximum(start, L - Tq + qc * TQ_BLOCK - window + 1)
    bt_row = bt_ptr + b64 * stride_btb
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = cols < end
        # The block of each key column: columns of one step may straddle blocks that lie far apart.
        blk = tl.load(bt_row + cols // PAGE, mask=kv_ok, other=0).to(tl.int64)
        slot = cols % PAGE
        k_off = blk * stride_kn + slot * stride_ks + hk * stride_kh
        v_off = blk * stride_vn + slot * stride_vs + hk * stride_vh
        kT = tl.load(k_ptr + k_off[None, :] + offs_d[:, None],
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kT) * qk_scale
        vis = kv_ok[None, :] & (cols[None, :] <= pos[:, None]) & (pos[:, None] - cols[None, :] < window)
        qk = tl.where(vis, qk, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    store_decode_partial(o_part_ptr, lse_part_ptr, acc, m_i, l_i, b64, h, t, row_ok, offs_d, d_ok, H, Tq, n_splits,
                         HEAD_D)


# ----------------------------------------------------------------------------- launchers

_NO_WINDOW = 1 << 30

# Every (BLOCK_N, num_warps, num_stages) the launcher can pick on a GPU; the interpreter runs BLOCK_N 16.
# K/V tiles of ~16 KB: 64 keys at 2-byte dtypes up to head dim 128, 32 for head dim 256; warps from the
# tile (kernels.common.decode_warps, and 8 for 32+ rows at head dim 64+); two stages at head dim 16 and
# with 8 warps.
LAUNCH_CONFIGS: list[dict] = [
    dict(BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, num_warps=8, num_stages=2),
]
_AOT_PAGE = 16  # the server's default block size; PAGE only enters index arithmetic (cols // PAGE)


def launch_config(dtype: torch.dtype, block_d: int, block_m: int, on_gpu: bool) -> dict:
    """The entry of LAUNCH_CONFIGS for this dtype, padded head dim and tile rows (interpreter: BLOCK_N 16)."""
    if not on_gpu:
        return dict(BLOCK_N=16)
    want = max(16, min(64, 16384 // (block_d * torch.finfo(dtype).bits // 8)))
    # The block-table gather (a block id and 64-bit offsets per key column) costs registers that the
    # contiguous kernel does not spend: 32-row tiles at head dim 64/128 spilled 8-12 B at 4 warps, and
    # at 8 warps with 3 stages still 4 B (D=128, sm_90); 8 warps run 2 stages.
    warps = 8 if block_m >= 32 and block_d >= 64 else decode_warps(block_m, block_d)
    stages = 2 if block_d <= 16 or warps == 8 else 3
    return dict(next(c for c in LAUNCH_CONFIGS if c["BLOCK_N"] <= want and c["num_warps"] == warps
                     and c["num_stages"] <= stages))


def kernel_variants(head_dims=(16, 32, 64, 96, 128, 256), gqa=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                    tq=(1, 2, 4, 8, 16)) -> list[dict]:
    """Constexpr sets a GPU launch can produce: tile shapes x LAUNCH_CONFIGS, per GPU dtype."""
    out = []
    for dtype in DECODE_GPU_DTYPES:
        for d in head_dims:
            for g in gqa:
                for t in tq:
                    tile = decode_tile(t, g, d)
                    out.append(dict(dtype=dtype, **tile,
                                    **launch_config(dtype, tile["BLOCK_D"], tile["BLOCK_M"], True)))
    return out


def _check(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor) -> None:
    if q.dim() != 4 or k_pool.dim() != 4 or block_table.dim() != 2:
        raise ValueError(f"paged_decode_attention expects q (B, Tq, H, D), pools (n_blocks, PAGE, Hkv, D) and a "
                         f"block table (B, max_blocks), got {tuple(q.shape)}, {tuple(k_pool.shape)}, "
                         f"{tuple(block_table.shape)}")
    B, _, H, D = q.shape
    if v_pool.shape != k_pool.shape or k_pool.shape[3] != D:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} must both be "
                         f"(n_blocks, PAGE, Hkv, D={D})")
    if H % k_pool.shape[2]:
        raise ValueError(f"n_head {H} is not a multiple of n_kv_head {k_pool.shape[2]}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim {D} is not supported (1..256)")
    if q.dtype not in DECODE_DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q and pools must share one dtype among {DECODE_DTYPES}, got {q.dtype}, {k_pool.dtype}, "
                         f"{v_pool.dtype}")
    if block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32/int64 of shape ({B}, max_blocks), got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor of shape ({B},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k_pool.requires_grad or v_pool.requires_grad):
        raise ValueError("paged_decode_attention is inference-only: call it under torch.no_grad()")
    check_gpu_dtype("paged_decode_attention", q, DECODE_GPU_DTYPES)


def paged_decode_attention_fwd(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
                               scale: float, window: int | None = None, num_splits: int | None = None) -> Tensor:
    """Split-KV attention through a block table; returns (B, Tq, H, D) in q's dtype.

    Splits: by default about two waves of programs from the SM count (at most S_max / 256); each row
    cuts its own length into that many pieces inside the kernel. num_splits forces a number (tests).
    """
    _check(q, k_pool, v_pool, block_table, lengths)
    q, k_pool, v_pool = (rows_contiguous(x) for x in (q, k_pool, v_pool))
    B, Tq, H, D = q.shape
    PAGE, Hkv = k_pool.shape[1], k_pool.shape[2]
    block_table = block_table.to(device=q.device, dtype=torch.int32).contiguous()
    S_max = block_table.shape[1] * PAGE
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    G = H // Hkv
    tile = decode_tile(Tq, G, D)
    BLOCK_D, BLOCK_M = tile["BLOCK_D"], tile["BLOCK_M"]
    n_qc, n_gc = triton.cdiv(Tq, tile["TQ_BLOCK"]), triton.cdiv(G, tile["G_BLOCK"])
    on_gpu = q.is_cuda and not interpreting()
    cfg = launch_config(q.dtype, BLOCK_D, BLOCK_M, on_gpu)
    BLOCK_N = cfg.pop("BLOCK_N")
    if num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        n_splits, min_split = num_splits, BLOCK_N
    else:
        n_splits, min_split = decode_splits(q, B * Hkv * n_gc * n_qc, S_max), DECODE_MIN_SPLIT
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    o_part = torch.empty((B, H, Tq, n_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, Tq, n_splits), dtype=torch.float32, device=q.device)
    _paged_decode_fwd_kernel[(B, Hkv * n_gc * n_qc, n_splits)](
        q, k_pool, v_pool, block_table, lengths.to(q.device), o_part, lse_part,
        *q.stride()[:3], *k_pool.stride()[:3], *v_pool.stride()[:3], block_table.stride(0),
        Tq, H, G, S_max, n_gc, n_qc, n_splits, min_split, window or _NO_WINDOW, scale * LOG2E,
        PAGE=PAGE, BLOCK_N=BLOCK_N, **tile, **cfg)
    decode_combine_kernel[(B * H * Tq,)](
        o_part, lse_part, out, Tq, H, n_splits, HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_S=COMBINE_BLOCK_S)
    return out


def aot_cases() -> list[AotCase]:
    """GPU compiles for `python -m kernels.aot`: every variant of `kernel_variants` (one (G_BLOCK, TQ_BLOCK)
    packing per distinct BLOCK_M: the packing only changes index arithmetic; PAGE = 16 stands for every
    block size, another only changes `// PAGE`), and the combine per head dim (shared with kernels.decode)."""
    f32 = torch.float32
    cases, seen = [], set()
    for v in kernel_variants():
        v = dict(v)
        dtype = v.pop("dtype")
        launch = {k: v.pop(k) for k in ("num_warps", "num_stages")}
        key = (dtype, v["HEAD_D"], v["BLOCK_M"], v["BLOCK_N"])
        if key in seen:
            continue
        seen.add(key)
        cases.append(AotCase(_paged_decode_fwd_kernel, dict(PAGE=_AOT_PAGE, **v), launch["num_warps"],
                             launch["num_stages"], dtype,
                             f"{DTYPE_NAMES[dtype]} D={v['HEAD_D']} M={v['BLOCK_M']}",
                             ptrs={"bt_ptr": torch.int32, "len_ptr": torch.int64, "o_part_ptr": f32,
                                   "lse_part_ptr": f32},
                             scalars={"qk_scale": 0.18}))
        if ("combine", dtype, v["HEAD_D"]) not in seen:
            seen.add(("combine", dtype, v["HEAD_D"]))
            cases.append(AotCase(decode_combine_kernel, dict(HEAD_D=v["HEAD_D"], BLOCK_D=v["BLOCK_D"],
                                                             BLOCK_S=COMBINE_BLOCK_S), 4, 3, f32,
                                 f"{DTYPE_NAMES[dtype]} D={v['HEAD_D']}", ptrs={"out_ptr": dtype}))
    return cases


# ----------------------------------------------------------------------------- public API


def paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
                           scale: float | None = None, window: int | None = None,
                           num_splits: int | None = None) -> Tensor:
    """Attention of Tq new tokens per row over a paged KV cache (no autograd).

    q (B, Tq, H, D); k_pool, v_pool (n_blocks, PAGE, Hkv, D); block_table (B, max_blocks) block ids;
    lengths (B,) valid entries per row including the new tokens (clamped to max_blocks * PAGE in the
    kernel). Query t of row b attends keys j <= lengths[b] - Tq + t, within `window` if given.
    scale defaults to D**-0.5. Returns (B, Tq, H, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return paged_decode_attention_fwd(q, k_pool, v_pool, block_table, lengths, scale, window, num_splits)
