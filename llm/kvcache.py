"""Static KV cache: preallocated per layer at the GQA width, with a per-row valid length."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer, (B, S_max, n_kv_head, head_dim) each.

    `lengths[b]` counts the valid entries of row b. A forward pass with T new tokens
    writes them at positions lengths[b] .. lengths[b] + T - 1 of every layer, then
    `advance(T)` moves the lengths on. Writes past S_max raise instead of wrapping.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch, max_len, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def positions(self, T: int) -> Tensor:
        """(B, T) absolute positions of the next T tokens of each row."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]

    def check_room(self, T: int) -> None:
        end = int(self.lengths.max()) + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, the cache holds {self.max_len}")

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v (B, T, Hkv, D) at `positions` (B, T); return (k_cache, v_cache, lengths incl. new)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, positions] = k.to(self.k[layer].dtype)
        self.v[layer][rows, positions] = v.to(self.v[layer].dtype)
        return self.k[layer], self.v[layer], self.lengths + k.shape[1]

    def advance(self, T: int) -> None:
        self.lengths += T
