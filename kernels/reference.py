"""Plain-PyTorch reference for every op the model computes.

Each `<op>_ref` has the same signature and defaults as the Triton `<op>` in
`kernels/<file>.py`. Math runs in fp32 (inputs are upcast) and the result is
cast back to the input dtype, so a reference run in low precision is also the
"low-precision baseline" of the FlashAttention tolerance rule.

Layouts used throughout:
  activations (B, T, C); attention q (B, T, H, D), k/v (B, S, Hkv, D) with
  H % Hkv == 0 (GQA; Hkv == 1 is MQA, Hkv == H is MHA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- norms


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim. x (..., C), w (C,)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """h = x + residual; y = rms_norm(h). Returns (h, y), both in x's dtype.

    The sum is rounded to x's dtype before the norm (it is what the next
    residual add reads), so fused kernels must normalize the rounded sum too.
    """
    h = (x.float() + residual.float()).to(x.dtype)
    return h, rms_norm_ref(h, weight, eps)


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (GPT-2 classic)."""
    w = weight.float()
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


# ----------------------------------------------------------------------------- rope


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
    """Rotary embedding, "rotate-half" pairing (i, i + D/2) as in Llama/HF.

    x (B, T, H, D); cos/sin (L, D/2) fp32; positions (T,) or (B, T) int, < L.
    out[..., :D/2] = x1*cos - x2*sin ; out[..., D/2:] = x2*cos + x1*sin
    """
    return rope_apply_ref(x, *rope_rows_ref(cos, sin, positions))


def rope_rows_ref(cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The tables' rows at `positions`, full width: (cos | cos, -sin | sin), each (B|1, T, 1, D) fp32.

    One gather serves every layer of a forward pass (llm.ops.Rotary); `rope_apply_ref` uses them.
    """
    c, s = cos[positions].float(), sin[positions].float()  # (T, D/2) or (B, T, D/2)
    if c.dim() == 2:
        c, s = c[None], s[None]
    return torch.cat([c, c], -1)[:, :, None], torch.cat([-s, s], -1)[:, :, None]


def rope_apply_ref(x: Tensor, cos2: Tensor, sin2: Tensor) -> Tensor:
    """x * (cos | cos) + (x2 | x1) * (-sin | sin): the rotate-half formula above, term for term (the same
    products and sums, so the same rounding), in 4 ops. x (B, T, H, D); cos2/sin2 from `rope_rows_ref`."""
    xf = x.float()
    half = x.shape[-1] // 2
    return (xf * cos2 + torch.cat([xf[..., half:], xf[..., :half]], -1) * sin2).to(x.dtype)


# ----------------------------------------------------------------------------- mlp


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise. gate, up (..., F)."""
    g = gate.float()
    return (F.silu(g) * up.float()).to(gate.dtype)


def gelu_ref(x: Tensor) -> Tensor:
    """tanh-approximate GELU (GPT-2)."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


# ----------------------------------------------------------------------------- loss


def cross_entropy_ref(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                      z_loss: float = 0.0) -> Tensor:
    """Mean cross-entropy over targets != ignore_index, plus z_loss * mean(lse^2).

    logits (N, V), targets (N,) int. Returns an fp32 scalar. Labels outside
    [0, V) (other than ignore_index) raise ValueError.
    """
    check_labels(targets, logits.shape[-1], ignore_index)
    lf = logits.float()
    keep = targets != ignore_index
    n = keep.sum().clamp_min(1)
    lse = torch.logsumexp(lf, dim=-1)
    safe_t = torch.where(keep, targets, torch.zeros_like(targets))
    nll = lse - lf.gather(-1, safe_t[:, None]).squeeze(-1)
    loss = (nll * keep).sum() / n
    if z_loss:
        loss = loss + z_loss * ((lse * lse) * keep).sum() / n
    return loss


def linear_cross_entropy_ref(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                             z_loss: float = 0.0) -> Tensor:
    """cross_entropy(x @ weight.T, targets). x (N, d), weight (V, d), targets (N,)."""
    return cross_entropy_ref(x @ weight.t(), targets, ignore_index, z_loss)


def cross_entropy_lse_ref(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-row log-sum-exp of logits (N, V) -> (N,) fp32 (fp64 for fp64 logits), 0 on rows whose target is
    ignore_index (the vocabulary-parallel loss, llm/vocab_parallel.py, combines these over vocabulary slices)."""
    lse = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return torch.where(targets != ignore_index, lse, torch.zeros_like(lse))


def cross_entropy_dlogits_ref(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor | float,
                              ignore_index: int = -100, z_loss: float = 0.0) -> Tensor:
    """Gradient of sum_i keep_i (lse_i - z_{i,t_i} + z_loss lse_i^2) w.r.t. logits (N, V), times `scale`, for a
    given lse (N,) fp32 (which may span more columns than these: a vocabulary slice):
        dz_ij = keep_i (exp(z_ij - lse_i) (1 + 2 z_loss lse_i) - [j == t_i]) scale
    A target outside [0, V) other than ignore_index lies in another slice: no one-hot term. Returns logits.dtype."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    lf, lse = logits.to(acc), lse.to(acc)[:, None]
    keep = (targets != ignore_index)[:, None]
    onehot = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]
    dz = (torch.exp(lf - lse) * (1 + 2 * z_loss * lse) - onehot.to(acc)) * scale
    return torch.where(keep, dz, torch.zeros_like(dz)).to(logits.dtype)


DISTILL_KINDS = ("kl", "reverse-kl", "jsd")


def distill_divergence_ref(student: Tensor, teacher: Tensor, temperature: float = 1.0, kind: str = "kl") -> Tensor:
    """Per-row divergence between the teacher's and the student's softened distributions.

    student, teacher (N, V) logits; q = softmax(student / T), p = softmax(teacher / T). Returns (N,) fp32:
      kl          KL(p || q) = sum_j p_j (log p_j - log q_j)      (forward KL, Hinton et al.)
      reverse-kl  KL(q || p) = sum_j q_j (log q_j - log p_j)      (mode-seeking)
      jsd         (KL(p || m) + KL(q || m)) / 2,  m = (p + q) / 2  (symmetric, bounded by log 2)
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of: {', '.join(DISTILL_KINDS)}")
    acc = torch.promote_types(student.dtype, torch.float32)
    log_q = torch.log_softmax(student.to(acc) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.to(acc) / temperature, dim=-1)
    if kind == "kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse-kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


def linear_distill_ref(x: Tensor, weight: Tensor, teacher_x: Tensor, teacher_weight: Tensor, targets: Tensor,
                       alpha: float = 0.5, temperature: float = 1.0, kind: str = "kl",
                       ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Distillation loss of a student's LM head against a frozen teacher's, from both hidden states.

    x (N, d) student hidden states, weight (V, d) its head; teacher_x (N, dt), teacher_weight (V, dt) (widths
    may differ, the vocabulary may not); targets (N,) ids or ignore_index. With s = x @ weight.T and
    t = teacher_x @ teacher_weight.T, over the n kept rows (targets != ignore_index, n >= 1):
      loss = alpha * CE(s, targets) + (1 - alpha) * T^2 * D(t, s)     (D: `distill_divergence_ref`)
    The T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    Returns (loss fp32 scalar, stats (3,) fp32 without gradient: [mean CE, mean D, top-1 agreement of the
    argmaxes of s and t]). Here the (N, V) logits exist in full; kernels/distill.py computes the same in chunks.
    """
    check_labels(targets, weight.shape[0], ignore_index)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 math (fp64 inputs stay fp64: gradcheck)
    s = (x @ weight.t()).to(acc)
    with torch.no_grad():
        t = (teacher_x @ teacher_weight.t()).to(acc)
    keep = targets != ignore_index
    n = keep.sum().clamp_min(1)
    nll = -s.log_softmax(-1).gather(-1, torch.where(keep, targets, 0)[:, None]).squeeze(-1)
    ce = (nll * keep).sum() / n
    div = (distill_divergence_ref(s, t, temperature, kind) * keep).sum() / n
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * div
    agree = ((s.argmax(-1) == t.argmax(-1)) & keep).sum() / n
    return loss, torch.stack([ce.detach(), div.detach(), agree.to(acc)]).float()


def check_labels(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError when a label is outside [0, vocab) and not ignore_index."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        v = int(targets[bad][0])
        raise ValueError(f"label {v} is outside the vocabulary [0, {vocab}) (ignore_index={ignore_index})")


# ----------------------------------------------------------------------------- attention


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                  window: int | None = None) -> Tensor:
    """Softmax attention with grouped-query heads.

    q (B, T, H, D), k/v (B, S, Hkv, D), H % Hkv == 0. Query i sits at absolute
    position i + (S - T) (the causal mask is aligned bottom-right, so a
    prefill chunk attends to everything before it). causal: key j visible iff
    j <= pos(i); window w (sliding/local attention): also pos(i) - j < w.
    Returns (B, T, H, D) in q's dtype; math in fp32.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"n_head {H} is not a multiple of n_kv_head {Hkv}")
    scale = D ** -0.5 if scale is None else scale
    qf = q.float().transpose(1, 2)  # (B, H, T, D)
    kf = k.float().transpose(1, 2)  # (B, Hkv, S, D)
    vf = v.float().transpose(1, 2)
    mask = None
    if causal or window is not None:
        qpos = torch.arange(T, device=q.device)[:, None] + (S - T)
        kpos = torch.arange(S, device=q.device)[None, :]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
        if causal:
            mask &= kpos <= qpos
        if window is not None:
            mask &= (qpos - kpos) < window
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale, enable_gqa=Hkv != H)
    return o.transpose(1, 2).to(q.dtype)


def doc_runs_ref(segments: Tensor) -> Tensor:
    """Document index of every token of a packed row: segments (B, T) any ints -> (B, T) int64 run ids, a new
    run wherever the id changes from the token before (so equal ids in two separate runs are two documents)."""
    new = torch.ones_like(segments, dtype=torch.int64)
    new[:, 1:] = (segments[:, 1:] != segments[:, :-1]).long()
    return new.cumsum(1)


def doc_attention_ref(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, causal: bool = True,
                      scale: float | None = None, window: int | None = None) -> Tensor:
    """Document-masked causal attention over packed rows: `attention_ref` plus "same document".

    q (B, T, H, D), k/v (B, T, Hkv, D) (self-attention: S == T), segments (B, T) ints, one value per
    contiguous document of the row (e.g. the count of end-of-text tokens before each token). Query i sees
    key j iff j <= i, both lie in one run of equal segment ids, and i - j < window when a window is given.
    Every query sees itself, so no row is empty. Returns (B, T, H, D) in q's dtype; math in fp32.
    """
    B, T, H, D = q.shape
    if k.shape[1] != T or tuple(segments.shape) != (B, T):
        raise ValueError(f"document masking needs self-attention (S == T) and segments (B, T) = {(B, T)}, "
                         f"got S={k.shape[1]} and segments {tuple(segments.shape)}")
    if not causal:
        raise ValueError("document masking is causal (each token sees the earlier tokens of its document)")
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    runs = doc_runs_ref(segments)
    pos = torch.arange(T, device=q.device)
    mask = (runs[:, :, None] == runs[:, None, :]) & (pos[None, :] <= pos[:, None])  # (B, T, T)
    if window is not None:
        mask &= (pos[:, None] - pos[None, :]) < window
    o = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                       v.float().transpose(1, 2), attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=Hkv != H)
    return o.transpose(1, 2).to(q.dtype)


def one_query_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """One new token per row attending to all S keys (a decode step at one length: nothing to mask).

    q (B, 1, H, D), k/v (B, S, Hkv, D) -> (B, 1, H, D) in q's dtype, math in fp32. Query heads are grouped
    under their KV head (h = j * H/Hkv + g), so each K/V head is read once, never repeated: two batched
    matmuls and a softmax. Equals `attention_ref(q, k, v, causal=False)`; on CPU it is faster than SDPA's
    flash kernel for a single query once S reaches a few hundred (benchmarks/NOTES.md, CPU decode).
    """
    B, _, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qg = q.float().reshape(B, Hkv, H // Hkv, D)
    s = torch.matmul(qg, k.float().permute(0, 2, 3, 1)) * scale  # (B, Hkv, G, S)
    o = torch.matmul(s.softmax(-1), v.float().transpose(1, 2))  # (B, Hkv, G, D)
    return o.reshape(B, 1, H, D).to(q.dtype)


def few_query_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """T new tokens per row attending to all S keys, causal among themselves (query t sits at S - T + t): a
    speculative verify pass of 1 + K ids continuing a cache of one length.

    q (B, T, H, D), k/v (B, S, Hkv, D), T <= S -> (B, T, H, D) in q's dtype, math in fp32. As
    `one_query_attention_ref` with the T queries of a KV head's group as G * T rows: two batched matmuls and a
    softmax, with the future keys of the last T columns set to -inf in the scores (no (T, S) boolean mask,
    no SDPA dispatch). Equals `attention_ref(q, k, v, causal=True)`.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qg = q.float().transpose(1, 2).reshape(B, Hkv, (H // Hkv) * T, D)  # rows (g, t) of each KV head
    s = torch.matmul(qg, k.float().permute(0, 2, 3, 1)) * scale  # (B, Hkv, G T, S)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # key S - T + j for query t: j > t
    s.view(B, Hkv, H // Hkv, T, S)[..., S - T:].masked_fill_(future, float("-inf"))
    o = torch.matmul(s.softmax(-1), v.float().transpose(1, 2))  # (B, Hkv, G T, D)
    return o.view(B, H, T, D).transpose(1, 2).to(q.dtype)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                         scale: float | None = None) -> Tensor:
    """New query tokens against a KV cache with a per-row valid length (the Triton decode kernel's reference).

    q (B, Tq, H, D); k_cache/v_cache (B, S_max, Hkv, D); lengths (B,) int: the
    number of valid cache entries per row, *including* the Tq new tokens
    (already written). Query t of row b sits at position lengths[b] - Tq + t
    and attends keys 0..that position (causal among the new tokens).
    Returns (B, Tq, H, D) in q's dtype; math in fp32 over the first max(lengths) slots (a host sync).
    """
    D, H, Hkv = q.shape[3], q.shape[2], k_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"n_head {H} is not a multiple of n_kv_head {Hkv}")
    S = int(lengths.max())
    scale = D ** -0.5 if scale is None else scale
    o = kv_attention_ref(q.float(), k_cache[:, :S].float(), v_cache[:, :S].float(), lengths.to(q.device), scale=scale)
    return o.to(q.dtype)


def kv_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, window: int | None = None,
                     scale: float | None = None) -> Tensor:
    """Attention of Tq new tokens per row over every slot of a KV cache, masked on the device (no host sync).

    q (B, Tq, H, D); k_cache/v_cache (B, S, Hkv, D); lengths (B,) valid entries incl. the Tq new ones.
    Query t of row b sits at p = lengths[b] - Tq + t; key j is visible iff j <= p (and p - j < window).
    Slots past a row's length get weight exp(-inf) = 0; shapes do not depend on the lengths, so a CUDA
    graph or torch.compile can capture it. Math in q's dtype (SDPA accumulates in fp32 for bf16/fp16).
    """
    Tq, H, S, Hkv = q.shape[1], q.shape[2], k_cache.shape[1], k_cache.shape[2]
    qpos = lengths[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # (B, Tq)
    kpos = torch.arange(S, device=q.device)
    mask = kpos[None, None, :] <= qpos[:, :, None]  # (B, Tq, S)
    if window is not None:
        mask = mask & (qpos[:, :, None] - kpos[None, None, :] < window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=mask[:, None], scale=scale, enable_gqa=Hkv != H)
    return o.transpose(1, 2)  # (B, Tq, H, D)


def paged_decode_attention_ref(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
                               scale: float | None = None, window: int | None = None) -> Tensor:
    """New query tokens against a paged KV cache (the Triton paged decode kernel's reference).

    q (B, Tq, H, D); k_pool/v_pool (n_blocks, block_size, Hkv, D); block_table (B, max_blocks) int: row b's
    position p lives in block block_table[b, p // block_size], slot p % block_size; lengths (B,) valid
    entries per row including the Tq new ones. Query t of row b sits at p = lengths[b] - Tq + t and sees
    keys j <= p (and p - j < window). Gathers each row's blocks into a contiguous (B, S, Hkv, D) cache,
    then `kv_attention_ref` (math in fp32). Returns (B, Tq, H, D) in q's dtype.
    """
    B, nb = block_table.shape
    bs, Hkv, D = k_pool.shape[1], k_pool.shape[2], k_pool.shape[3]
    if q.shape[2] % Hkv:
        raise ValueError(f"n_head {q.shape[2]} is not a multiple of n_kv_head {Hkv}")
    idx = block_table.long().flatten()  # index_select copies whole blocks: 2-4x faster than pool[table] on a CPU
    k = k_pool.index_select(0, idx).view(B, nb * bs, Hkv, D).float()
    v = v_pool.index_select(0, idx).view(B, nb * bs, Hkv, D).float()
    scale = D ** -0.5 if scale is None else scale
    return kv_attention_ref(q.float(), k, v, lengths.to(q.device), window, scale).to(q.dtype)


# ----------------------------------------------------------------------------- mixture of experts


def moe_experts_ref(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor,
                    topk_weight: Tensor) -> Tensor:
    """Routed SwiGLU experts, a plain loop over experts (dropless).

    x (N, d); w_gate, w_up (E, F, d); w_down (E, d, F); topk_idx (N, k) int;
    topk_weight (N, k). out_n = sum_j topk_weight[n, j] * E_{idx[n, j]}(x_n),
    E_e(x) = w_down[e] @ (silu(w_gate[e] @ x) * (w_up[e] @ x)).
    Returns (N, d) in x's dtype.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(w_gate.shape[0]):
        rows, slot = (topk_idx == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        xe = xf[rows]
        h = F.silu(xe @ w_gate[e].float().t()) * (xe @ w_up[e].float().t())
        ye = (h @ w_down[e].float().t()) * topk_weight[rows, slot].float()[:, None]
        out.index_add_(0, rows, ye)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- weight-only quantized matmul
# int8: q (N, K) int8, w = q * s[n] (symmetric, one scale per output channel).
# int4: q (N, ceil(K/2)) uint8, two 4-bit codes per byte (even k in the low nibble), codes in [0, 15];
#       w = (q - 8) * s[n, k // G] + z[n, k // G] (asymmetric: one scale and one offset per group of G
#       inputs; the last group is shorter when G does not divide K).


def int4_unpack_ref(qweight: Tensor, k: int) -> Tensor:
    """(N, ceil(K/2)) uint8 -> (N, K) int32 codes in [0, 15]; even k sits in the low nibble."""
    b = qweight.to(torch.int32)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(qweight.shape[0], -1)[:, :k]


def int4_dequant_ref(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, k: int) -> Tensor:
    """(N, K) fp32 weights (q - 8) * s + z of a group-wise int4 weight; scales, zeros (N, ceil(K/G))."""
    q = int4_unpack_ref(qweight, k).float()
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]
    return (q - 8.0) * s + z


def int8_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ (q * s[:, None]).T + b. x (..., K) float; qweight (N, K) int8; scales, bias (N,). x's dtype."""
    w = qweight.float() * scales.float()[:, None]
    y = x.float() @ w.t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def w16_matmul_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + b with W (N, K) stored fp16 / bf16, widened to x's dtype (exact: every fp16 / bf16 value is an
    fp32 one) before one GEMM. x (..., K); bias (N,). x's dtype."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def int4_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    bias: Tensor | None = None) -> Tensor:
    """y = x @ dequant(q).T + b. x (..., K); qweight (N, ceil(K/2)) uint8; scales, zeros (N, ceil(K/G)). x's dtype."""
    w = int4_dequant_ref(qweight, scales, zeros, group_size, x.shape[-1])
    y = x.float() @ w.t()
    return (y if bias is None else y + bias.float()).to(x.dtype)
