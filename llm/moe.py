"""Mixture-of-Experts feed-forward layer: top-k router, routed SwiGLU experts, shared experts.

One MoE layer replaces the dense MLP of a block (ModelConfig.n_experts > 0):
  r = Router(x);  y = sum_{j<k} w_j * Expert_{e_j}(x) + Shared(x)
Dropless: every token reaches its k experts, nothing is capped or dropped.

Router (fp32 whatever the model dtype): logits l = W_r x (E,), scores s = softmax(l) (Mixtral,
Switch) or sigmoid(l) (DeepSeek-V3). Selection takes the k largest of s (+ b, the aux-loss-free
bias), ties to the lower expert id. Gates are the selected s (never s + b), renormalized to sum to 1
when norm_topk and k > 1 (with k = 1 renormalizing would make every gate 1 and cut the router off
from the language-model loss), times route_scale.

Balancing:
  aux   Switch / Mixtral loss  L_bal = E * sum_e f_e P_e, with f_e = (tokens routed to e) / (N k) and
        P_e = mean_n p_{n,e} (p = s, normalized to sum 1 for sigmoid). L_bal = 1 at perfect balance
        (any k; Hugging Face's Mixtral value is k times this), E when every token picks one expert.
  bias  DeepSeek-V3 aux-loss-free: after each optimizer step, b_e += bias_rate * sign(mean_e c_e - c_e)
        from the step's token counts c (summed over data-parallel ranks). b is an fp32 buffer saved in
        checkpoints; it steers selection only.
  none  no balancing term.
Router z-loss (ST-MoE) z = mean_n logsumexp(l_n)^2 is added for every balance mode when z_coef > 0.
The training loss adds aux_loss = aux_coef * L_bal + z_coef * z (Transformer.aux_loss sums the layers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llm import ops
from llm.config import ModelConfig
from llm.layers import MLP, FeedForward


class Routing(NamedTuple):
    idx: Tensor  # (N, k) int64 selected experts, best first
    weight: Tensor  # (N, k) fp32 gates
    logits: Tensor  # (N, E) fp32 router logits
    probs: Tensor  # (N, E) fp32 per-token distribution over experts (for the balance loss)


class Router(nn.Module):
    """Top-k router. x (N, d) -> Routing (see the module docstring for the math)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.score_func, self.norm_topk, self.route_scale = cfg.score_func, cfg.norm_topk, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))  # (E, d), HF Mixtral `gate.weight`
        self.use_bias = cfg.balance == "bias"
        if self.use_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def forward(self, x: Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        sel = scores.detach()
        if self.use_bias:
            sel = sel + self.expert_bias
        # Stable descending sort: among equal scores the lower expert id comes first, on every device.
        idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, : self.top_k]  # (N, k)
        weight = scores.gather(-1, idx)
        if self.norm_topk and self.top_k > 1:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            weight = weight * self.route_scale
        probs = scores if self.score_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return Routing(idx, weight, logits, probs)

    @torch.no_grad()
    def update_bias(self, counts: Tensor, rate: float) -> None:
        """Aux-loss-free step: b_e += rate * sign(mean(c) - c_e). counts (E,) tokens per expert."""
        c = counts.float()
        self.expert_bias += rate * torch.sign(c.mean() - c)

    def _apply(self, fn, recurse: bool = True):
        # model.to(bf16) / .half() cast every float buffer; the bias accumulates steps of
        # bias_rate and must stay fp32, so it follows only the device of the cast.
        bias = self.expert_bias if self.use_bias else None
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device, torch.float32)
        return self


class Experts(nn.Module):
    """E SwiGLU experts as 3-D weights (Mixtral's w1, w3, w2 stacked over experts).

    w_gate, w_up (E, F, d); w_down (E, d, F). Expert e: x -> w_down[e] (silu(w_gate[e] x) * w_up[e] x).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, F_, d = cfg.n_experts, cfg.expert_hidden, cfg.n_embd
        self.w_gate = nn.Parameter(torch.empty(E, F_, d))
        self.w_up = nn.Parameter(torch.empty(E, F_, d))
        self.w_down = nn.Parameter(torch.empty(E, d, F_))


class MoE(FeedForward):
    """Routed + shared SwiGLU experts in place of a block's MLP. x (..., d) -> (..., d).

    After a training forward, `aux_loss` holds this layer's balance + z-loss term (0.0 in eval),
    and the token counts per expert feed `load_stats()` and the bias update in `after_step()`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg, cfg.expert_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.drop = nn.Dropout(cfg.dropout)
        self.aux_loss: Tensor | float = 0.0
        self._last: Tensor | None = None  # (E + 2,) fp32: counts of the last training forward, L_bal, z
        self._step_counts: Tensor | None = None  # (E,) int64 counts since the last after_step()

    def residual_outputs(self) -> list[nn.Parameter]:
        return [self.experts.w_down] + (self.shared.residual_outputs() if self.shared is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d)
        r = self.router(xf)
        e = self.experts
        y = ops.moe_experts(xf, e.w_gate, e.w_up, e.w_down, r.idx, r.weight, kernels=self.cfg.kernels)  # (N, d)
        if self.training:
            self._record(r)
        y = self.drop(y)
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.view(shape)

    def _record(self, r: Routing) -> None:
        cfg, E = self.cfg, self.cfg.n_experts
        flat = r.idx.reshape(-1)
        counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        f = counts.float() / max(1, flat.numel())  # (E,) share of routed slots
        lb = E * (f * r.probs.mean(0)).sum() if r.probs.shape[0] else r.logits.sum()  # 0 for no tokens
        z = torch.logsumexp(r.logits, -1).pow(2).mean() if r.probs.shape[0] else r.logits.sum()
        aux = r.logits.new_zeros(())
        if cfg.balance == "aux" and cfg.aux_coef:
            aux = aux + cfg.aux_coef * lb
        if cfg.z_coef:
            aux = aux + cfg.z_coef * z
        self.aux_loss = aux
        self._last = torch.cat([counts.float(), lb.detach()[None], z.detach()[None]])
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts

    def train(self, mode: bool = True) -> MoE:
        if not mode:
            self.aux_loss = 0.0  # evaluation losses are pure cross-entropy
        return super().train(mode)

    @torch.no_grad()
    def after_step(self) -> None:
        """After an optimizer step: the aux-loss-free bias update from the step's counts (all ranks)."""
        counts, self._step_counts = self._step_counts, None
        if not self.router.use_bias:
            return
        if counts is None:  # still join the all_reduce, so every rank issues the same collectives
            counts = torch.zeros(self.cfg.n_experts, dtype=torch.int64, device=self.router.expert_bias.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.router.update_bias(counts, self.cfg.bias_rate)

    def load_stats(self) -> dict[str, float]:
        """Expert load of the last training forward: max/mean tokens per expert, coefficient of
        variation (std/mean), and the unscaled balance loss and z-loss. {} before any."""
        if self._last is None:
            return {}
        E = self.cfg.n_experts
        c = self._last[:E]
        mean = c.mean().clamp_min(1e-9)
        vals = torch.stack([c.max() / mean, c.std(unbiased=False) / mean, self._last[E], self._last[E + 1]])
        return dict(zip(("max_over_mean", "cv", "balance_loss", "z_loss"), vals.tolist()))

    def inactive_params(self) -> int:
        """Routed-expert parameters a token does not touch: (E - k) experts of 3 * F * d."""
        c = self.cfg
        return (c.n_experts - c.top_k) * 3 * c.expert_hidden * c.n_embd
