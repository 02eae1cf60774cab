"""Unstructured and 2:4 pruning: zero a share of every block linear's weights, the shapes unchanged.

Scores per weight W_ij (output i, input j):
  magnitude  |W_ij|, ranked over the whole matrix (the classic baseline)
  wanda      |W_ij| * ||X_:,j||_2, ranked within each output row (Sun et al. 2023: the activation norm from
             calibration text, no retraining, no weight update)
--pattern 2:4 keeps the 2 highest-scoring weights of every 4 consecutive inputs of a row (50%, the layout sparse
tensor cores run). The embedding, the head and the norms stay dense, as in both papers.

The masks are applied to dense weights: the checkpoint has the same size and a dense matmul does the same work, so
nothing gets faster here. On CUDA a 2:4-pruned fp16 / bf16 Linear can run as
`torch.sparse.to_sparse_semi_structured(weight)` (not done by this code).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm.model import Transformer
from llm.prune.calibrate import Stats


def block_linears(model: Transformer) -> dict[str, nn.Linear]:
    return {f"blocks.{i}.{n}": m for i, b in enumerate(model.blocks) for n, m in b.named_modules()
            if isinstance(m, nn.Linear)}


def scores(w: Tensor, method: str, in_norm: Tensor | None) -> Tensor:
    s = w.detach().float().abs()
    return s * in_norm.to(s)[None, :] if method == "wanda" else s


def mask(score: Tensor, sparsity: float, method: str, pattern: tuple[int, int] | None) -> Tensor:
    """Boolean keep-mask of `score` (out, in): n:m per row groups, per-row (wanda) or whole-matrix (magnitude)."""
    if pattern is not None:
        n, m = pattern
        o, i = score.shape
        pad = (-i) % m  # a width not divisible by m: the last group is shorter (padding never kept)
        s = torch.nn.functional.pad(score, (0, pad), value=-1.0).view(o, -1, m)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(n, dim=-1).indices, True)
        return keep.view(o, -1)[:, :i]
    if method == "wanda":
        k = int(score.shape[1] * sparsity)  # pruned per row
        drop = score.topk(k, dim=1, largest=False).indices if k else None
        keep = torch.ones_like(score, dtype=torch.bool)
        return keep.scatter_(1, drop, False) if drop is not None else keep
    k = int(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[score.flatten().topk(k, largest=False).indices] = False
    return keep.view(score.shape)


@torch.no_grad()
def prune(model: Transformer, stats: Stats | None, sparsity: float, method: str,
          pattern: tuple[int, int] | None) -> float:
    """Zero the pruned weights of every block linear in place; returns the share of those weights now zero."""
    zero = total = 0
    for name, lin in block_linears(model).items():
        keep = mask(scores(lin.weight, method, stats.in_norm[name] if stats else None), sparsity, method, pattern)
        lin.weight.mul_(keep.to(lin.weight.dtype))
        zero += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zero / max(1, total)
