"""Next-token samplers: repetition penalty, temperature, top-k, top-p, min-p; greedy; seeded draws.

Order (the same as transformers' logits processors), on fp32 logits (B, V):
  1. repetition penalty r (Keskar et al. 2019) on every token already in the row (prompt or output):
     l -> l / r if l > 0 else l * r
  2. temperature 0: greedy, argmax of the penalised logits (steps 3-6 are skipped)
  3. temperature t: l -> l / t
  4. top-k: keep the k largest logits (k clamped to the vocabulary)
  5. top-p (nucleus, Holtzman et al. 2020): keep the smallest most-likely set whose probability
     reaches p (a token is dropped when the mass strictly before it is already >= p)
  6. min-p: drop tokens whose probability is below min_p * the largest probability
  7. draw from softmax of what is left by inverse CDF with one uniform u per row:
     token = min{i : cdf_i > u * cdf_V}
The uniforms come from one torch.Generator per row seeded with seed + row, drawn up front
(`row_uniforms`), so a row's text depends on its seed alone, not on the batch it runs in, and a
decode step needs no random-number generator (it can be captured in a CUDA graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class SamplingError(ValueError):
    """Bad sampling parameters or prompt; the message is one line."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; defaults change nothing (plain sampling at temperature 1)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SamplingError(msg)

        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        need(math.isfinite(t) and t >= 0, f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
        need(k is None or k >= 1, f"top_k must be >= 1, got {k}")
        need(p is None or 0.0 < p <= 1.0, f"top_p must be in (0, 1], got {p}")
        need(m is None or 0.0 <= m <= 1.0, f"min_p must be in [0, 1], got {m}")
        need(math.isfinite(r) and r > 0, f"repetition_penalty must be a finite number > 0 (1 = off), got {r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: Tensor, seen: Tensor | None, penalty: float) -> Tensor:
    """Step 1: logits (B, V) fp32; seen (B, V) bool, tokens already in each row."""
    if seen is None or penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def warp(logits: Tensor, p: SamplingParams) -> Tensor:
    """Steps 3-6: logits (B, V) fp32 -> logits with dropped tokens at -inf."""
    logits = logits / p.temperature
    V = logits.shape[-1]
    if p.top_k is not None and p.top_k < V:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p  # the first token always stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if p.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def draw(logits: Tensor, u: Tensor) -> Tensor:
    """Step 7: token per row from logits (B, V) and uniforms u (B,) in [0, 1) by inverse CDF."""
    return draw_probs(logits.softmax(-1), u)


def draw_probs(probs: Tensor, u: Tensor) -> Tensor:
    """Token per row from probabilities (B, V), unnormalised allowed, and uniforms u (B,) by inverse CDF."""
    cdf = probs.cumsum(-1)  # (B, V)
    total = cdf[:, -1:]
    # u * total < total keeps the draw off the zero-probability tail after the last kept token
    x = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def sample(logits: Tensor, p: SamplingParams, u: Tensor | None = None, seen: Tensor | None = None) -> Tensor:
    """Next token (B,) from logits (B, V): steps 1-7 above. u (B,) uniforms; unused when greedy."""
    logits = penalize(logits.float(), seen, p.repetition_penalty)
    if p.greedy:
        return logits.argmax(-1)
    if u is None:
        raise SamplingError("sampling at temperature > 0 needs uniforms u (see row_uniforms)")
    return draw(warp(logits, p), u)


def row_uniforms(seeds: list[int], n: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, n) uniforms in [0, 1): row b from its own torch.Generator seeded with seeds[b]."""
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device)


def seen_mask(prompts: list[list[int]], vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) bool: True where the token occurs in the row's prompt (for the repetition penalty)."""
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
    for b, ids in enumerate(prompts):
        ids = [i for i in ids if 0 <= i < vocab]
        seen[b, ids] = True
    return seen.to(device)
