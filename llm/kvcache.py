"""Static KV cache: preallocated per layer at the GQA width, with a per-row valid length.

The cache is a store (lengths, positions, update, reorder, snapshot); how attention reads it is
decided in one place, `llm.ops.kv_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer, (B, S_max, n_kv_head, head_dim) each, allocated once.

    `lengths[b]` counts the valid entries of row b (rows may differ: ragged batches). A forward
    pass with T new tokens writes them at positions lengths[b] .. lengths[b] + T - 1 of every
    layer, then `advance(T)` moves the lengths on. A write past S_max raises before any compute.

    The host keeps a copy of the lengths (`host_lengths`), so checks and the common equal-length
    case (slice copies instead of scatters) need no device sync. `static=True` makes every call
    shape-static and free of host state (attention over all S_max slots, masked by `lengths` on
    the device; room checks and the host copy left to the step's driver), which is what a CUDA
    graph or torch.compile of a decode step needs.

    `start` > 0 keeps slots 0..start-1 of every row for a region shared by all rows and filled by
    the cache's maker (a prefix-tuning prefix, llm/prefix.py): lengths count the tokens after it,
    tokens sit at slot and position start + i, and attention sees start + length keys.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, start: int = 0) -> None:
        shape = (batch, start + max_len, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch
        self.max_len, self.start = max_len, start
        self.static = False
        self.block_table = None  # contiguous rows; `llm.paged_cache.PagedKVCache` sets a block table
        self.segments = None  # whole rows; a ragged `PagedKVCache` names its per-sequence token rows

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def _uniform(self) -> int | None:
        """The common length of every row, or None for ragged rows (or in static mode)."""
        h = self.host_lengths
        return h[0] if not self.static and min(h) == max(h) else None

    def positions(self, T: int) -> Tensor:
        """(B, T) absolute positions of the next T tokens of each row."""
        return self.start + self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]

    def check_room(self, T: int, host: bool = False) -> None:
        """Raise before T more tokens would be written past S_max (reads the host copy: no sync).

        In static mode the model's own call is skipped (a compiled or captured step cannot read
        host state); whoever drives the steps calls check_room(T, host=True) before each one.
        """
        if self.static and not host:
            return
        end = max(self.host_lengths) + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, the cache holds {self.max_len}")

    def update(self, layer: int, k: Tensor, v: Tensor,
               positions: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int] | None]:
        """Write k, v (B, T, Hkv, D) at `positions` (B, T) of `layer`.

        Returns (k_cache, v_cache, lengths, host_lengths) with the new entries counted: lengths (B,) on
        the device, host_lengths the same on the host, None in static mode (a static step reads no host state);
        both count the `start` region's keys too.
        """
        T, S = k.shape[1], self.start
        L = self._uniform()
        if L is not None:  # every row at the same length: a slice copy, no index tensors
            self.k[layer].narrow(1, S + L, T).copy_(k)
            self.v[layer].narrow(1, S + L, T).copy_(v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, positions] = k.to(self.k[layer].dtype)
            self.v[layer][rows, positions] = v.to(self.v[layer].dtype)
        host = None if self.static else [S + n + T for n in self.host_lengths]
        return self.k[layer], self.v[layer], self.lengths + (S + T), host

    def advance(self, T: int) -> None:
        """lengths += T on the device, and on the host copy unless static (then: `advance_host`)."""
        self.lengths += T
        if not self.static:
            self.advance_host(T)

    def advance_host(self, T: int) -> None:
        """Move the host copy on after a static step (compiled or replayed) moved the device lengths."""
        self.host_lengths = [n + T for n in self.host_lengths]

    def set_lengths(self, lengths: list[int]) -> None:
        """Set every row's valid length (after a ragged prefill); entries past it are overwritten later."""
        if len(lengths) != self.batch or min(lengths) < 0 or max(lengths) > self.max_len:
            raise ValueError(f"lengths {lengths} do not fit a cache of {self.batch} rows x {self.max_len}")
        self.host_lengths = [int(n) for n in lengths]
        self.lengths.copy_(torch.tensor(self.host_lengths, dtype=torch.long), non_blocking=True)

    def reorder(self, index: Tensor) -> None:
        """Rows become rows[index], index (B',) (beam search: each beam continues its parent's cache).

        Allocates new tensors (B' may differ from B), so it is for eager decoding, not a captured graph.
        """
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        lengths = [self.host_lengths[i] for i in index.tolist()]
        self.lengths = torch.zeros(len(lengths), dtype=torch.long, device=self.lengths.device)
        self.set_lengths(lengths)

    def snapshot(self) -> tuple[Tensor, list[int]]:
        """(lengths, host lengths) to `restore` after warm-up runs that wrote past the valid entries."""
        return self.lengths.clone(), list(self.host_lengths)

    def restore(self, snap: tuple[Tensor, list[int]]) -> None:
        self.lengths.copy_(snap[0])
        self.host_lengths = list(snap[1])

