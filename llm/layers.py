"""The model's building blocks: RoPE tables, norms, and the feed-forward interface with its dense MLP.

RoPE (Su et al. 2021): angle(p, i) = p * theta^(-2i/D), tables cos/sin (max_len, D/2) in fp32.
RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w;  LayerNorm for GPT-2 classic.
SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x);  GELU MLP for GPT-2 classic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from llm import ops
from llm.config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0, device=None,
                scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables (max_len, head_dim // 2), fp32.

    inv_freq_i = theta^(-2i/D); angle(p, i) = p * inv_freq_i. `scaling` is an
    optional Llama-3-style frequency rescale {"type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if scaling is not None:
        inv_freq = _scale_inv_freq(inv_freq, scaling)
    pos = torch.arange(max_len, dtype=torch.float64, device=device)
    ang = torch.outer(pos, inv_freq)
    return ang.cos().float(), ang.sin().float()


def _scale_inv_freq(inv_freq: Tensor, s: dict) -> Tensor:
    kind = s.get("type", s.get("rope_type"))
    if kind != "llama3":
        raise ValueError(f"unsupported RoPE scaling type {kind!r} (supported: llama3)")
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    low_wl, high_wl = old / lo, old / hi
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return torch.where(is_mid, mid, scaled)


class RowsLinear(nn.Linear):
    """An nn.Linear whose forward is its `rows` plan (ops.f32_rows_linear_plan: a few fp32 CPU rows through the C
    kernel that reads each weight once, else F.linear). Transformer.few_rows() gives its fp32 CPU linears this
    class and their plans for a pass, then takes both back."""

    rows: Callable[[Tensor], Tensor]

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x)


class Norm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) or LayerNorm, over the last dim. x (..., C)."""

    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, self.eps, self.kernels = cfg.norm, cfg.norm_eps, cfg.kernels
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if cfg.norm == "layernorm" and cfg.bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps, kernels=self.kernels)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(h, norm(h)) with h = x + residual; one fused kernel for RMSNorm."""
        if self.kind == "rmsnorm":
            return ops.add_rms_norm(x, residual, self.weight, self.eps, kernels=self.kernels)
        h = x + residual
        return h, self.forward(h)


class FeedForward(nn.Module):
    """A block's feed-forward layer, x (..., C) -> (..., C): the dense MLP, or a Mixture of Experts (llm.moe).

    What the model asks of each beyond forward (the dense defaults here): `aux_loss`, the auxiliary
    loss of the last training forward; `after_step()`, after each optimizer step; `load_stats()`,
    per-layer statistics of the last forward; `inactive_params()`, parameters a token does not touch;
    `residual_outputs()`, the weights that write into the residual stream (initialised scaled down).
    """

    aux_loss: Tensor | float = 0.0

    def after_step(self) -> None:
        pass

    def load_stats(self) -> dict[str, float]:
        return {}

    def inactive_params(self) -> int:
        return 0

    def residual_outputs(self) -> list[nn.Parameter]:
        raise NotImplementedError


class MLP(FeedForward):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x), or GPT-2's c_proj(gelu(c_fc x))."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = hidden or cfg.intermediate_size
        if cfg.mlp == "swiglu":
            self.w1 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # gate
            self.w3 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # up
        else:
            self.w1 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # down
        self.drop = nn.Dropout(cfg.dropout)

    def residual_outputs(self) -> list[nn.Parameter]:
        return [self.w2.weight]

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.mlp == "swiglu":
            h = ops.swiglu(self.w1(x), self.w3(x), kernels=self.cfg.kernels)
        else:
            h = ops.gelu(self.w1(x))
        y = self.w2(h)
        return self.drop(y) if self.training else y  # dropout is the identity in eval: no module call
