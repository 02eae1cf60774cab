"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence (vLLM's PagedAttention layout).

  BlockPool         K/V storage of every layer, (n_blocks, block_size, n_kv_head, head_dim) each, the free
                    list and the prefix cache; a sequence holds a list of block ids, allocated as it grows
  block_hash        the prefix cache's key of a full block: a hash chaining its parent's hash and its token ids
  PagedKVCache      one forward pass's view of the pool: a block table (B, max_blocks) and per-row
                    lengths, with the interface the model calls on a cache (check_room, positions,
                    update, advance); `block_table` tells `llm.ops.kv_attention` to read through it;
                    `start` > 0: every row's first positions hold a shared region (a prefix), as in KVCache

Memory follows each sequence's actual length (a block at a time), and a new sequence needs no
contiguous region: its blocks may lie anywhere in the pool, in any order. The store only moves
K/V; how attention reads it is decided in `llm.ops.kv_attention`.

Automatic prefix caching (vLLM's): a full block's K/V depends only on the tokens up to its end, so it is
named by h_i = H(h_{i-1}, tokens of block i) and registered under that name once written. Blocks are
ref-counted: a sequence whose prompt starts with registered blocks takes them (ref + 1) instead of
computing them; a block nobody references keeps its K/V and its name, and is evicted (least recently
released first) only when a new block is needed and the plain free list is empty. Shared blocks are
full, so no sequence ever writes into one.

A prefix-tuning prefix (llm/prefix.py) lives in the pool as blocks its holder (the server's engine) allocates and
never releases: unnamed, so never cached or evicted. Every sequence's block table starts with its full blocks
(`share`: one more reference each, dropped by `release` like any other); the rows of a last, partial block are
copied into each sequence's own first block (`copy_rows`), since the sequence writes its tokens after them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The name of a full block: blake2b-128 of the parent block's name and this block's token ids (int64)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PoolExhausted(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    """n_blocks blocks of block_size token slots per layer, at the GQA width; block ids are 0..n_blocks-1."""

    def __init__(self, n_layer: int, n_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, scratch: bool = False) -> None:
        """scratch: one more block, id n_blocks, that no sequence ever gets (never on the free list, never counted in
        `free` / `used`): the rows a static decode step pads its batch with write their K/V there
        (`PagedKVCache.static_rows`)."""
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        shape = (n_blocks + scratch, block_size, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.n_blocks, self.block_size = n_blocks, block_size
        self.scratch: int | None = n_blocks if scratch else None
        self.device = torch.device(device)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: freed blocks are reused first
        self.ref = [0] * n_blocks  # sequences holding each block
        self._named: dict[bytes, int] = {}  # prefix cache: block name -> block id
        self._name_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recently released first

    @property
    def free(self) -> int:
        """Blocks a sequence can get: never used, or cached and unreferenced (evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - self.free

    @property
    def cached(self) -> int:
        """Blocks the prefix cache names (held or idle)."""
        return len(self._name_of)

    def blocks_for(self, length: int) -> int:
        """Blocks that hold `length` tokens."""
        return -(-length // self.block_size)

    def alloc(self, n: int) -> list[int]:
        """n blocks for one holder: fresh ones first, then the least recently released cached ones (evicted)."""
        if n > self.free:
            raise PoolExhausted(f"{n} KV blocks asked for, {self.free} of {self.n_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._idle.popitem(last=False)
                del self._named[self._name_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block (a sequence that finished or was cancelled; the caller forgets them).
        A block nobody holds goes back to the free list, or, if it is named, stays cached until evicted."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self._name_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)

    def lookup(self, name: bytes) -> int | None:
        """The cached block of that name, now held once more by the caller (None on a miss)."""
        b = self._named.get(name)
        if b is not None:
            if self.ref[b] == 0:
                del self._idle[b]
            self.ref[b] += 1
        return b

    def register(self, name: bytes, block: int) -> None:
        """Name a full block the caller has written (a name or block already registered stays as it is)."""
        if name not in self._named and block not in self._name_of:
            self._named[name], self._name_of[block] = block, name

    def share(self, blocks: list[int]) -> list[int]:
        """One more reference to each of blocks that someone already holds (a region every sequence starts with)."""
        for b in blocks:
            if self.ref[b] < 1:
                raise ValueError(f"block {b} is shared but nobody holds it")
            self.ref[b] += 1
        return list(blocks)

    @torch.no_grad()
    def copy_rows(self, src: int, dst: int, n: int) -> None:
        """Slots 0..n-1 of block `src` -> the same slots of block `dst`, every layer's K and V."""
        for kv in (*self.k, *self.v):
            kv[dst, :n] = kv[src, :n]

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
    start > 0 (`llm.kvcache.KVCache`'s meaning): positions 0..start-1 of every row hold a region its tables'
    blocks already carry (a prefix); lengths count the tokens after it, token i sits at position start + i,
    and attention sees start + length keys.
    """

    static = False  # True: a decode step's fixed-shape view (`static_rows`), compiled or captured
    segments: list[tuple[int, int]] | None = None  # ragged: (first row, tokens) of each sequence

    def __init__(self, pool: BlockPool, tables: list[list[int]], lengths: list[int], start: int = 0) -> None:
        if len(tables) != len(lengths) or not tables:
            raise ValueError(f"{len(tables)} block tables for {len(lengths)} rows")
        self.pool = pool
        width = max(1, max(map(len, tables)))
        rows = [t + [t[0] if t else 0] * (width - len(t)) for t in tables]  # padding: never read (masked by length)
        self.block_table = torch.tensor(rows, dtype=torch.int32, device=pool.device)  # (B, max_blocks)
        self.host_lengths = [int(n) for n in lengths]
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.long, device=pool.device)
        self._capacity = [len(t) * pool.block_size - start for t in tables]
        self.start = start
        self._slots: Tensor | None = None

    @classmethod
    def ragged(cls, pool: BlockPool, tables: list[list[int]], lengths: list[int], n_new: list[int],
               start: int = 0) -> PagedKVCache:
        """One forward over sequences that add different numbers of tokens (decodes and prefill chunks together):
        each new token is its own row (B = sum(n_new), T = 1) with its sequence's block table and the length
        before it, so it is written at its position and attends its sequence's keys up to itself (the earlier
        tokens of its own chunk included: every layer writes all rows before it attends). `segments` tells
        `llm.ops.kv_attention` which rows belong together."""
        rows_t: list[list[int]] = []
        rows_n: list[int] = []
        segs = []
        for t, n, k in zip(tables, lengths, n_new):
            segs.append((len(rows_n), k))
            rows_t += [t] * k
            rows_n += range(n, n + k)
        cache = cls(pool, rows_t, rows_n, start)
        cache.segments = segs
        return cache

    @classmethod
    def static_rows(cls, pool: BlockPool, batch: int, width: int, start: int = 0) -> PagedKVCache:
        """A shape-static view for one decode token per row (`static` = True), built once and refilled by `load`
        before each step: block_table (batch, width) and lengths (batch,) are buffers whose shapes never change,
        so torch.compile traces it once and a CUDA graph can capture it. Attention then reads all `width` blocks
        of every row (masked by length). Rows the step does not use point every table entry at the pool's scratch
        block with length 0: they write their K/V there and attend only to it. The room checks and host lengths
        are the caller's (the engine plans blocks before the step): inside, nothing reads host state."""
        if pool.scratch is None:
            raise ValueError("a static paged view needs a pool with a scratch block (BlockPool(scratch=True))")
        cache = cls(pool, [[pool.scratch] * width] * batch, [0] * batch, start)
        cache.static, cache.width = True, width
        return cache

    def load(self, tables: list[list[int]], lengths: list[int]) -> None:
        """Static view: rows 0..len(tables)-1 take these block tables (padded with the scratch block to `width`) and
        lengths; the other rows the scratch block and length 0. Copies into the buffers (their storage stays)."""
        B, w, pad = self.block_table.shape[0], self.width, self.pool.scratch
        if len(tables) > B or len(tables) != len(lengths) or max(map(len, tables), default=0) > w:
            raise ValueError(f"{len(tables)} rows of up to {max(map(len, tables), default=0)} blocks do not fit a "
                             f"static view of {B} x {w}")
        rows = [t + [pad] * (w - len(t)) for t in tables] + [[pad] * w] * (B - len(tables))
        self.block_table.copy_(torch.tensor(rows, dtype=torch.int32))
        self.lengths.copy_(torch.tensor(list(lengths) + [0] * (B - len(tables)), dtype=torch.long))

    @property
    def batch(self) -> int:
        return len(self.host_lengths)

    def check_room(self, T: int, host: bool = False) -> None:
        """Raise before a row would write past its blocks (the scheduler grows them before each forward).
        A static view's model call skips it (a compiled or captured step reads no host state)."""
        if self.static:
            return
        for b, (n, cap) in enumerate(zip(self.host_lengths, self._capacity)):
            if n + T > cap:
                raise ValueError(f"paged KV cache: row {b} needs {n + T} slots, its blocks hold {cap}")

    def positions(self, T: int) -> Tensor:
        """(B, T) absolute positions of the next T tokens; also fixes where they are written in the pool."""
        pos = self.start + self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]
        bs = self.pool.block_size
        blk = self.block_table.long().gather(1, pos // bs)
        self._slots = (blk * bs + pos % bs).reshape(-1)  # (B * T,) flat slot index into (n_blocks * bs)
        return pos

    def update(self, layer: int, k: Tensor, v: Tensor,
               positions: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Write k, v (B, T, Hkv, D) into the pool -> (k_pool, v_pool, lengths, host_lengths): the keys each row
        attends, the new ones and the `start` region counted."""
        B, T, Hkv, D = k.shape
        slots = self._slots
        if slots is None or slots.numel() != B * T:
            raise ValueError("PagedKVCache.update before positions(T) for this forward")
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        kp.view(-1, Hkv, D)[slots] = k.reshape(B * T, Hkv, D).to(kp.dtype)
        vp.view(-1, Hkv, D)[slots] = v.reshape(B * T, Hkv, D).to(vp.dtype)
        S = self.start
        host = None if self.static else [S + n + T for n in self.host_lengths]
        return kp, vp, self.lengths + (S + T), host

    def advance(self, T: int) -> None:
        self.lengths += T
        if not self.static:
            self.host_lengths = [n + T for n in self.host_lengths]
        self._slots = None
