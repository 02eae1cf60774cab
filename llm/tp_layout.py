"""The row layout of the fused wqkv under tensor parallelism, shared by the trainer (llm/train/tp.py) and the
checkpoint readers (llm/checkpoint.py).

wqkv's rows are [q heads; k heads; v heads] (llm/model.py). `--tp N` regroups them at wrap time so a contiguous
1/N of the rows is [q_r; k_r; v_r], rank r's heads of each (`qkv_order`). A single-file checkpoint always holds
the one-process layout (`to_saved` on the gathered tensor); a sharded (DCP) checkpoint of a TP run holds each
rank's regrouped rows as they are (no gather), its config.json says the degree ("sharded": {"tp": N}), and a
reader undoes it (`to_saved`) or, resuming at another degree, regroups it (`to_live`).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from llm.config import ModelConfig

QKV = re.compile(r"(^|\.)blocks\.\d+\.attn\.wqkv\.(weight|bias)$")


def qkv_order(cfg: ModelConfig, tp: int) -> Tensor:
    """Row order (a permutation of range((H + 2 Hkv) D)) that regroups wqkv's rows [q; k; v] into tp contiguous
    groups [q_r; k_r; v_r], r < tp, each with H/tp query heads and Hkv/tp key/value heads (D rows per head).

    GQA stays right locally: query head h reads kv head h // (H / Hkv), and rank r's query heads r H/tp + j read
    r Hkv/tp + j // (H / Hkv), its own kv heads."""
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    rows = torch.arange((H + 2 * Hkv) * D).view(H + 2 * Hkv, D)
    q, k, v = rows.split_with_sizes([H, Hkv, Hkv])
    groups = [torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]) for r in range(tp)]
    return torch.cat(groups).reshape(-1)


def to_live(name: str, t: Tensor, cfg: ModelConfig, tp: int) -> Tensor:
    """A full tensor in checkpoint layout -> the TP run's layout (wqkv rows regrouped); others unchanged."""
    return t[qkv_order(cfg, tp).to(t.device)] if tp > 1 and QKV.search(name) else t


def to_saved(name: str, t: Tensor, cfg: ModelConfig, tp: int) -> Tensor:
    """Inverse of to_live: a gathered full tensor of the TP run -> checkpoint layout."""
    if tp == 1 or not QKV.search(name):
        return t
    out = torch.empty_like(t)
    out[qkv_order(cfg, tp).to(t.device)] = t
    return out
