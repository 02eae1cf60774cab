"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence (vLLM's PagedAttention layout).

  BlockPool         K/V storage of every layer, (n_blocks, block_size, n_kv_head, head_dim) each, and
                    the free list; a sequence owns a list of block ids, allocated as it grows
  PagedKVCache      one forward pass's view of the pool: a block table (B, max_blocks) and per-row
                    lengths, with the interface the model calls on a cache (check_room, positions,
                    update, advance); `block_table` tells `llm.ops.kv_attention` to read through it

Memory follows each sequence's actual length (a block at a time), and a new sequence needs no
contiguous region: its blocks may lie anywhere in the pool, in any order. The store only moves
K/V; how attention reads it is decided in `llm.ops.kv_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PoolExhausted(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    """n_blocks blocks of block_size token slots per layer, at the GQA width; block ids are 0..n_blocks-1."""

    def __init__(self, n_layer: int, n_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        shape = (n_blocks, block_size, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.n_blocks, self.block_size = n_blocks, block_size
        self.device = torch.device(device)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: freed blocks are reused first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.n_blocks - len(self._free)

    def blocks_for(self, length: int) -> int:
        """Blocks that hold `length` tokens."""
        return -(-length // self.block_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{n} KV blocks asked for, {len(self._free)} of {self.n_blocks} free")
        out = [self._free.pop() for _ in range(n)]
        return out

    def release(self, blocks: list[int]) -> None:
        """Give blocks back (a sequence that finished or was cancelled); the caller forgets them."""
        self._free.extend(reversed(blocks))

    def grow(self, blocks: list[int], length: int) -> None:
        """Append blocks to a sequence's list (in place) until it holds `length` tokens."""
        need = self.blocks_for(length) - len(blocks)
        if need > 0:
            blocks.extend(self.alloc(need))


class PagedKVCache:
    """A batch of sequences in a BlockPool: row b's token at position p lives in block tables[b][p // bs], slot p % bs.

    tables: each row's block ids (enough for its length plus the tokens of the coming forward, see
    `BlockPool.grow`); lengths: tokens already stored per row. A forward pass with T new tokens per
    row writes them at positions lengths[b] .. lengths[b] + T - 1, then `advance(T)` counts them.
    """

    static = False  # never compiled or captured: the server's steps change shape as rows come and go

    def __init__(self, pool: BlockPool, tables: list[list[int]], lengths: list[int]) -> None:
        if len(tables) != len(lengths) or not tables:
            raise ValueError(f"{len(tables)} block tables for {len(lengths)} rows")
        self.pool = pool
        width = max(1, max(map(len, tables)))
        rows = [t + [t[0] if t else 0] * (width - len(t)) for t in tables]  # padding: never read (masked by length)
        self.block_table = torch.tensor(rows, dtype=torch.int32, device=pool.device)  # (B, max_blocks)
        self.host_lengths = [int(n) for n in lengths]
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.long, device=pool.device)
        self._capacity = [len(t) * pool.block_size for t in tables]
        self._slots: Tensor | None = None

    @property
    def batch(self) -> int:
        return len(self.host_lengths)

    def check_room(self, T: int, host: bool = False) -> None:
        """Raise before a row would write past its blocks (the scheduler grows them before each forward)."""
        for b, (n, cap) in enumerate(zip(self.host_lengths, self._capacity)):
            if n + T > cap:
                raise ValueError(f"paged KV cache: row {b} needs {n + T} slots, its blocks hold {cap}")

    def positions(self, T: int) -> Tensor:
        """(B, T) absolute positions of the next T tokens; also fixes where they are written in the pool."""
        pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]
        bs = self.pool.block_size
        blk = self.block_table.long().gather(1, pos // bs)
        self._slots = (blk * bs + pos % bs).reshape(-1)  # (B * T,) flat slot index into (n_blocks * bs)
        return pos

    def update(self, layer: int, k: Tensor, v: Tensor,
               positions: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Write k, v (B, T, Hkv, D) into the pool -> (k_pool, v_pool, lengths, host_lengths), new ones counted."""
        B, T, Hkv, D = k.shape
        slots = self._slots
        if slots is None or slots.numel() != B * T:
            raise ValueError("PagedKVCache.update before positions(T) for this forward")
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        kp.view(-1, Hkv, D)[slots] = k.reshape(B * T, Hkv, D).to(kp.dtype)
        vp.view(-1, Hkv, D)[slots] = v.reshape(B * T, Hkv, D).to(vp.dtype)
        return kp, vp, self.lengths + T, [n + T for n in self.host_lengths]

    def advance(self, T: int) -> None:
        self.lengths += T
        self.host_lengths = [n + T for n in self.host_lengths]
        self._slots = None
