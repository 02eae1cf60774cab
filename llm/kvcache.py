"""Static KV cache: preallocated per layer at the GQA width, with a per-row valid length."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llm import ops


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
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch, max_len, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch
        self.max_len = max_len
        self.static = False

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def _uniform(self) -> int | None:
        """The common length of every row, or None for ragged rows (or in static mode)."""
        h = self.host_lengths
        return h[0] if not self.static and min(h) == max(h) else None

    def positions(self, T: int) -> Tensor:
        """(B, T) absolute positions of the next T tokens of each row."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]

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

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v (B, T, Hkv, D) at `positions` (B, T); return (k_cache, v_cache, lengths incl. new)."""
        T = k.shape[1]
        L = self._uniform()
        if L is not None:  # every row at the same length: a slice copy, no index tensors
            self.k[layer][:, L:L + T] = k
            self.v[layer][:, L:L + T] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, positions] = k.to(self.k[layer].dtype)
            self.v[layer][rows, positions] = v.to(self.v[layer].dtype)
        return self.k[layer], self.v[layer], self.lengths + T

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, window: int | None = None,
               kernels: str = "auto") -> Tensor:
        """Store the new k, v (B, T, Hkv, D) and attend q (B, T, H, D) over each row's cache -> (B, T, H, D).

        Query t of row b sits at position lengths[b] + t and sees keys 0..that position (with a
        sliding window w, only the last w of them). Rows all at one length: `ops.attention` on the
        valid keys (prefills; windowed steps); a decode step or ragged rows: `ops.decode_attention`
        (the Triton decode kernel on CUDA, sync-free, so it also serves a captured static step);
        static mode otherwise, and windowed ragged rows: `masked_attention`.
        """
        T = q.shape[1]
        L = self._uniform()
        k_all, v_all, lengths = self.update(layer, k, v, positions)
        if self.static:
            # the Triton decode kernel is sync-free for a decode step, so a CUDA graph can capture it;
            # under torch.compile the plain-torch mask below compiles into the step instead
            if window is None and T == 1 and ops.use_triton(kernels, q) and not torch.compiler.is_compiling():
                return ops.decode_attention(q, k_all, v_all, lengths, kernels=kernels)
            return masked_attention(q, k_all, v_all, lengths, window)
        if L is not None and (T > 1 or window is not None):
            # every row at length L: attention()'s bottom-right causal alignment is exactly this mask,
            # over the last w + T - 1 keys with a window (a prefill: one (T, S) mask, not one per row)
            s0 = 0 if window is None else max(0, L - window + 1)
            return ops.attention(q, k_all[:, s0:L + T], v_all[:, s0:L + T], causal=True, window=window,
                                 kernels=kernels)
        if window is None:
            return ops.decode_attention(q, k_all, v_all, lengths, kernels=kernels)
        S = max(self.host_lengths) + T
        return masked_attention(q, k_all[:, :S], v_all[:, :S], lengths, window)

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


def masked_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                     window: int | None = None) -> Tensor:
    """`decode_attention_ref` over every slot of the cache, masked on the device (no host sync).

    q (B, Tq, H, D); k_cache/v_cache (B, S, Hkv, D); lengths (B,) valid entries incl. the Tq new ones.
    Query t of row b sits at p = lengths[b] - Tq + t; key j is visible iff j <= p (and p - j < window).
    Slots past a row's length get weight exp(-inf) = 0, so the result is the reference's; shapes do
    not depend on the lengths, so a CUDA graph or torch.compile can capture it. Math in q's dtype
    (fp32 on CPU, where it equals the reference; SDPA accumulates in fp32 for bf16/fp16).
    """
    Tq, H, S, Hkv = q.shape[1], q.shape[2], k_cache.shape[1], k_cache.shape[2]
    qpos = lengths[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # (B, Tq)
    kpos = torch.arange(S, device=q.device)
    mask = kpos[None, None, :] <= qpos[:, :, None]  # (B, Tq, S)
    if window is not None:
        mask = mask & (qpos[:, :, None] - kpos[None, None, :] < window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=mask[:, None], enable_gqa=Hkv != H)
    return o.transpose(1, 2)  # (B, Tq, H, D)
