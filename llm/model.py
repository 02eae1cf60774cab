"""Decoder-only Transformer: Llama-style by default, classic GPT-2 through the config.

Llama-style block (pre-norm):  h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))
GPT-2 classic:                 same with LayerNorm, GELU MLP, biases, learned positions.
Every op goes through `llm.ops`, which picks the Triton kernel or the PyTorch reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn as nn
from torch import Tensor

from llm import ops
from llm.config import ModelConfig
from llm.kvcache import KVCache
from llm.layers import MLP, FeedForward, Norm, RowsLinear, rope_tables
from llm.moe import MoE
from llm.paged_cache import BlockPool, PagedKVCache
from llm.vocab_parallel import VocabSplit, vocab_parallel_cross_entropy


def doc_segments(idx: Tensor, eot_id: int | None) -> Tensor:
    """Document ids of packed rows idx (B, T): the number of end-of-text tokens before each token, so a
    document's closing <|endoftext|> belongs to it and the next token starts the next one. (B, T) int64."""
    if eot_id is None:
        raise ValueError("doc_mask needs the end-of-text token id (ModelConfig.eot_id, set from the tokenizer)")
    eot = (idx == eot_id).long()
    return eot.cumsum(1) - eot


def doc_positions(segments: Tensor) -> Tensor:
    """Each token's position inside its document (0 at a document's first token): (B, T) int64."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(new, idx, 0).cummax(1).values


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023) and RoPE (Su et al. 2021).

    x (B, T, C) -> q (B, T, H, D), k/v (B, T, Hkv, D). K/V are never repeated to H heads:
    the attention op maps query head h to kv head h // (H / Hkv).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.n_embd, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = Norm(cfg.head_dim, cfg)
            self.k_norm = Norm(cfg.head_dim, cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.score_scale = cfg.attn_mult / math.sqrt(cfg.head_dim)  # what q.k is multiplied by before the softmax
        self.few_rows = False  # inside Transformer.few_rows: a few new tokens (ops.kv_attention's `few`)

    def forward(self, x: Tensor, rope: ops.Rotary | None, positions: Tensor,
                cache: KVCache | PagedKVCache | None = None, segments: Tensor | None = None) -> Tensor:
        """segments (B, T): document ids of a packed row (document-masked attention), or None."""
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x)  # (B, T, (H + 2 Hkv) D); T from here: under sequence parallelism x holds T / tp rows
        B, T = qkv.shape[:2]
        qkv = qkv.view(B, T, H + 2 * Hkv, D)  # heads [q; k; v]
        q, k, v = qkv.split_with_sizes([H, Hkv, Hkv], dim=2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if self.cfg.qk_norm:
                q, k = rope(q), rope(k)
            else:  # q and k heads are adjacent in qkv: one rotation for both (half the calls of a decode step)
                q, k = rope(qkv[:, :, : H + Hkv]).split_with_sizes([H, Hkv], 2)
        if self.cfg.attn_mult != 1.0:  # µP's 1/d attention, on q so every attention path (cache, paged) has it
            q = q * self.cfg.attn_mult
        if segments is not None:
            o = ops.doc_attention(q, k, v, segments, window=self.cfg.window, kernels=self.cfg.kernels)
        elif cache is None:
            o = ops.attention(q, k, v, causal=True, window=self.cfg.window, kernels=self.cfg.kernels)
        else:  # store the new k, v, then attend over each row's cache
            k_all, v_all, lengths, host_lengths = cache.update(self.layer, k, v, positions)
            o = ops.kv_attention(q, k_all, v_all, lengths, host_lengths, window=self.cfg.window,
                                 kernels=self.cfg.kernels, block_table=cache.block_table, segments=cache.segments,
                                 few=self.few_rows)
        y = self.wo(o.reshape(B, T, H * D))  # (B, T, C)
        return self.drop(y) if self.training else y  # dropout is the identity in eval: no module call


class Block(nn.Module):
    """Pre-norm residual block: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = Norm(cfg.n_embd, cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = Norm(cfg.n_embd, cfg)
        self.mlp: FeedForward = MoE(cfg) if cfg.n_experts and layer >= cfg.first_dense_layers else MLP(cfg)

    def forward(self, x: Tensor, rope, positions: Tensor, cache: KVCache | PagedKVCache | None = None,
                segments: Tensor | None = None) -> Tensor:
        a = self.attn(self.norm1(x), rope, positions, cache, segments)
        h, y = self.norm2.add_forward(a, x)  # fused residual add + norm
        return h + self.mlp(y)


class Transformer(nn.Module):
    """idx (B, T) token ids -> logits (B, T, V) and, with targets (B, T), the mean cross-entropy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(V, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = Norm(cfg.n_embd, cfg)
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        self.prefix: nn.Module | None = None  # prefix tuning (llm/prefix.py): learned rows ahead of every sequence
        self.vocab_split: VocabSplit | None = None  # --tp (llm/train/tp.py): each rank holds V/tp rows of the head
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # A reward model's scalar head, r = h_last . w (--objective reward; llm/train/objectives/reward.py).
        self.reward_head = nn.Linear(cfg.n_embd, 1, bias=False) if cfg.reward_head else None
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build the non-persistent buffers on `device`: the RoPE tables (block_size, D/2), always fp32.

        They are not in a checkpoint: a model built on the meta device or cast to bf16 calls this again.
        """
        c = self.cfg
        if c.pos_emb == "rope":
            cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta, device=device, scaling=c.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); biases 0, norm gains 1; the weights that write into the residual
        stream (attention out, each feed-forward layer's `residual_outputs`) scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        biases = {id(m.bias) for m in self.modules() if isinstance(m, (nn.Linear, Norm)) and m.bias is not None}
        residual = {id(p) for b in self.blocks for p in [b.attn.wo.weight, *b.mlp.residual_outputs()]}
        for p in self.parameters():
            if id(p) in biases:
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            elif id(p) in residual:
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | PagedKVCache | None = None,
                z_loss: float = 0.0, logits_at: Tensor | None = None,
                logits_rows: Tensor | None = None, hidden: bool = False,
                segments: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Returns (logits, loss).

        Without targets: logits (B, T, V) fp32 and loss None. With targets (B, T), ids or
        -100 to ignore: logits None (the loss is computed from the hidden states in chunks
        so the (B*T, V) logits need not exist) and the mean cross-entropy. With a cache,
        the T tokens continue each row of the cache and their K/V are stored. logits_at (B,)
        int: logits (B, 1, V) of that one position per row only (a prefill needs just the last
        prompt token's, not a (B, T, V) tensor). logits_rows (K,) int: logits (K, T, V) of those rows only (a
        ragged server step, one row per token, needs the rows that sample).
        hidden: return (h, None) instead, h (B, T, C) the final normalized hidden states that the head reads
        (logits = h @ lm_head.weight.T): objectives that compute their own loss from them in chunks
        (distillation, DPO log-probs, a reward head) call the model this way so the DDP / FSDP2 / compile
        wrappers still run. segments (B, T): document ids of packed rows (document-masked attention, no cache);
        with cfg.doc_mask they are derived from cfg.eot_id when not given (`doc_segments`), and
        cfg.doc_positions="restart" starts each document's positions at 0.
        """
        B, T = idx.shape
        if self.prefix is not None:  # its rows are a cache region; the tokens' positions start after it
            if cache is None:
                cache = self.prefix.as_cache(B, self.cfg.block_size)
            elif getattr(cache, "start", 0) != self.prefix.n_tokens:
                raise ValueError("this model carries a prefix (prefix tuning): its KV cache must hold the prefix's "
                                 "rows first (model.new_cache, or a paged cache with start=P: llm/serve/engine.py)")
        if cache is not None:
            cache.check_room(T)
            positions = cache.positions(T)  # (B, T)
        else:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds the context length {self.cfg.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,)
            if segments is None and self.cfg.doc_mask:
                segments = doc_segments(idx, self.cfg.eot_id)
            if segments is not None and self.cfg.doc_positions == "restart":
                positions = doc_positions(segments)  # (B, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x) if self.training else x
        rope = None
        if self.cfg.pos_emb == "rope":
            rope = ops.Rotary(self.rope_cos, self.rope_sin, positions, kernels=self.cfg.kernels)
        for block in self.blocks:
            x = block(x, rope, positions, cache, segments)
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        if logits_rows is not None:
            x = x[logits_rows]  # (K, T, C)
        x = self.norm_f(x)
        if self.cfg.output_mult != 1.0:  # µP's output multiplier: logits = output_mult * lm_head(x)
            x = x * self.cfg.output_mult
        if hidden:
            return x, None
        if targets is None:
            return self.lm_head(x).float(), None
        if self.vocab_split is not None:  # loss parallel: this rank's vocabulary rows (llm/vocab_parallel.py)
            loss = vocab_parallel_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight.to_local(),
                                                targets.reshape(-1), self.vocab_split, z_loss=z_loss,
                                                kernels=self.cfg.kernels)
            return None, loss + self.aux_loss()
        loss = ops.linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        z_loss=z_loss, kernels=self.cfg.kernels)
        return None, loss + self.aux_loss()

    def add_reward_head(self) -> None:
        """Make this model a reward model: a zero-initialised scalar head (so every score starts at 0), recorded
        in the config (checkpoints then load with it)."""
        if self.reward_head is None:
            p = self.lm_head.weight
            self.reward_head = nn.Linear(self.cfg.n_embd, 1, bias=False, device=p.device, dtype=p.dtype)
            nn.init.zeros_(self.reward_head.weight)
            self.cfg = replace(self.cfg, reward_head=True)

    def aux_loss(self) -> Tensor | float:
        """Sum of the MoE layers' auxiliary losses from the last forward (0 for dense models)."""
        return sum((b.mlp.aux_loss for b in self.blocks), 0.0)

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step (MoE: aux-loss-free routing-bias update)."""
        for b in self.blocks:
            b.mlp.after_step()

    def moe_stats(self) -> dict[str, float]:
        """Per-layer expert-load statistics of the last forward ({} for dense models)."""
        out: dict[str, float] = {}
        for i, b in enumerate(self.blocks):
            out.update({f"moe/{i}/{k}": v for k, v in b.mlp.load_stats().items()})
        return out

    @torch.no_grad()
    def decode_layout(self) -> Transformer:
        """CPU inference: store each fp32 linear weight (N, K) with N >= K K-major, same values and shape; returns
        self.

        A decode step is one GEMV per weight, x (1, K) @ W.T; MKL's single-row GEMM reads a K-major W
        (x @ W with W (K, N) contiguous) 1.2-1.7x faster than an N-major one when N >= K (q/k/v, w1, w3, the head)
        but 0.8-0.9x when N < K (w2), on this project's CPU bench machine (benchmarks/NOTES.md, "CPU decode" and
        issue 32 session 5: hf-8x512 decode 12.31 -> 11.87 ms/step keeping w2 N-major). Only the strides change
        (each Parameter keeps its identity; a tied head moves the embedding table with it), so results equal the
        N-major ones up to fp32 summation order; checkpoints save contiguous copies. A no-op on CUDA, in training mode,
        in other dtypes, and for weights already K-major. The samplers call it (stream_tokens, beam,
        speculative, the server's engine).
        """
        if self.training:
            return self
        with torch.inference_mode(False):  # a sampler calls it in inference mode; the weights stay normal tensors
            for m in self.modules():
                w = getattr(m, "weight", None) if isinstance(m, nn.Linear) else None
                if (w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                        and w.is_contiguous() and min(w.shape) > 1 and w.shape[0] >= w.shape[1]):
                    w.data = w.data.t().contiguous().t()
        return self

    def rows_plans(self) -> list[tuple[nn.Module, Callable[[Tensor], Tensor]]]:
        """What few_rows() switches: every plain fp32 CPU nn.Linear (kernels "auto") with its
        ops.f32_rows_linear_plan. Taking them costs ~1 ms (a walk over the modules, one plan per weight): a caller
        running many few-row passes (the speculative decoder) takes them once, after decode_layout, and passes them
        to each few_rows(plans); the weights must stay where they are meanwhile."""
        if self.cfg.kernels != "auto":
            return []
        return [(m, ops.f32_rows_linear_plan(m.weight, m.bias)) for m in self.modules()
                if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]

    @contextmanager
    def few_rows(self, plans: list[tuple[nn.Module, Callable[[Tensor], Tensor]]] | None = None
                 ) -> Iterator[Transformer]:
        """For the passes inside, which feed each row a few new tokens (the speculative decoder's verify pass of
        1 + K ids): every plain fp32 CPU nn.Linear (kernels "auto") computes 2..8 rows with its
        ops.f32_rows_linear_plan, which reads each weight once for all rows (MKL's sgemm costs ~one GEMV per row
        there), and the attention layers take ops.kv_attention's few-query route. `plans`: rows_plans() taken
        earlier (else taken here). Afterwards the linears are plain nn.Linear again (the class is swapped in place:
        parameters, hooks and identity unchanged)."""
        plans = self.rows_plans() if plans is None else plans
        attns = [b.attn for b in self.blocks]
        for m, plan in plans:
            object.__setattr__(m, "__class__", RowsLinear)  # nn.Module.__setattr__'s checks cost ~7x this
            m.__dict__["rows"] = plan
        for a in attns:
            a.__dict__["few_rows"] = True
        try:
            yield self
        finally:
            for m, _ in plans:
                object.__setattr__(m, "__class__", nn.Linear)
                m.__dict__.pop("rows", None)
            for a in attns:
                a.__dict__["few_rows"] = False

    @property
    def n_positions(self) -> int:
        """Tokens one sequence can hold: the context, less a prefix's rows (they take the first positions)."""
        return self.cfg.block_size - (0 if self.prefix is None else self.prefix.n_tokens)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        """A KV cache for max_len tokens per row; with a prefix, its P rows come first, already filled."""
        p, P = self.norm_f.weight, 0 if self.prefix is None else self.prefix.n_tokens  # the compute dtype/device
        if P and P + max_len > self.cfg.block_size:
            raise ValueError(f"{max_len} tokens (prompt + new) + the prefix's {P} rows exceed the context length "
                             f"{self.cfg.block_size}: at most {self.cfg.block_size - P} tokens fit")
        cache = KVCache(self.cfg.n_layer, batch, max_len, self.cfg.n_kv_head, self.cfg.head_dim,
                        device or p.device, dtype or p.dtype, start=P)
        if self.prefix is not None:
            self.prefix.fill(cache)
        return cache

    def new_pool(self, n_blocks: int, block_size: int, device=None, dtype=None, scratch: bool = False) -> BlockPool:
        """A paged KV store (llm.paged_cache) of n_blocks blocks of block_size tokens per layer (scratch: and one
        block no sequence gets, for a static decode step's padding rows)."""
        p = self.norm_f.weight  # the compute dtype and device (a 16-bit or quantized head's .weight would widen it)
        return BlockPool(self.cfg.n_layer, n_blocks, block_size, self.cfg.n_kv_head, self.cfg.head_dim,
                         device or p.device, dtype or p.dtype, scratch=scratch)

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def num_active_params(self) -> int:
        """Parameters touched per token (MoE: only top_k routed experts count)."""
        return self.num_params() - sum(b.mlp.inactive_params() for b in self.blocks)

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token: 6 * N_active + 12 * L * H * D * T (nanoGPT / PaLM count)."""
        c = self.cfg
        T = T or c.block_size
        return 6 * self.num_active_params() + 12 * c.n_layer * c.n_head * c.head_dim * T
