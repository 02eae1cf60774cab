"""The server's captured decode step: a step of decode rows only runs at a fixed batch size, compiled or replayed.

`llm serve --compile`. A step whose rows are all decodes (one token each, logits at every row) runs the model on a
static paged view (`PagedKVCache.static_rows`) at the smallest batch bucket that holds it: buckets 1, 2, 4, 8, ...
up to max_batch (max_batch itself the last), rows padded to the bucket as vLLM pads its CUDA graphs. Each bucket's
view has its own fixed buffers: the tokens (b,), the block tables (b, W) with W = blocks of a full context (every
row's table padded to it, so the shape never depends on a sequence's length), the lengths (b,). Padding rows point
every table entry at the pool's scratch block with length 0: they write their K/V there, never into a sequence's
blocks, and their logits are dropped. Then:

  CPU    torch.compile of the step (`llm.generate.decode.compiled`: static shapes, C++ wrapper), one graph per
         bucket, all compiled by `warmup` at start, so no request ever compiles (nothing the guards read changes
         between steps: the same view objects, buffers refilled in place)
  CUDA   one CUDA graph per bucket (`llm.generate.decode.capture`), captured by `warmup`, replayed per step

With LoRA adapters (`llm serve --lora`, the model stacked by `llm.multi_lora`) each row's adapter index is one
more fixed buffer per bucket, (b,) with its mask (b, N, 1), refilled in place like the tokens; padding rows take
the base (index 0). Every step through here sets them, all-base steps included, so each bucket is one graph.

Sampling stays outside (per-row parameters, seeds, grammars: `Engine._sample_all`), and so does every step that
carries a prefill chunk or needs prompt logprobs (the engine's eager ragged forward). The static view's attention
reads all W blocks of each row (masked past its length), which is what keeps it shape-static; with the reference
attention that is more work than the eager step's, which reads only as many blocks as its longest row holds.
"""

from __future__ import annotations

import bisect
import time

import torch
import torch._dynamo
from torch import Tensor

from llm.generate.decode import capture, compiled
from llm.model import Transformer
from llm.multi_lora import AdapterRows
from llm.paged_cache import BlockPool, PagedKVCache


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch: the batch sizes a decode step is padded to."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out = [1]
    while out[-1] * 2 < max_batch:
        out.append(out[-1] * 2)
    return out + ([max_batch] if max_batch > 1 else [])


class CapturedDecode:
    """Decode-only steps of up to max_batch rows: (token ids, block tables, lengths) -> logits (rows, V) fp32."""

    def __init__(self, model: Transformer, pool: BlockPool, max_batch: int, start: int = 0,
                 buckets: list[int] | None = None, rows: AdapterRows | None = None) -> None:
        """start: rows of a shared region at the head of every sequence (a prefix, as in `PagedKVCache`);
        buckets: the batch sizes to compile (default `batch_buckets(max_batch)`); a step of more rows than the
        largest stays eager; rows: the adapter indices of a model with stacked LoRA adapters (None: no adapters)."""
        if buckets is not None and (not buckets or min(buckets) < 1 or max(buckets) > max_batch):
            raise ValueError(f"--compile-buckets {buckets}: give batch sizes from 1 to --max-batch ({max_batch})")
        if model.cfg.n_experts:
            raise ValueError("--compile: a mixture-of-experts model routes tokens with data-dependent shapes; its "
                             "decode step is not compiled or captured (serve it without --compile)")
        self.model, self.pool = model, pool
        self.device = pool.device
        self.mode = "graph" if self.device.type == "cuda" else "compile"
        self.buckets = sorted(set(buckets)) if buckets else batch_buckets(max_batch)
        self.width = pool.blocks_for(model.cfg.block_size)  # a full context: the prefix's rows + n_positions
        self.views = {b: PagedKVCache.static_rows(pool, b, self.width, start) for b in self.buckets}
        self.tokens = {b: torch.zeros(b, dtype=torch.long, device=self.device) for b in self.buckets}
        self.rows = rows
        if rows is not None:  # per bucket: the rows' adapter indices and masks, refilled in place
            self.adapter_idx = {b: torch.zeros(b, dtype=torch.long, device=self.device) for b in self.buckets}
            self.adapter_mask = {b: torch.zeros(b, rows.n, 1, dtype=torch.bool, device=self.device)
                                 for b in self.buckets}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.run = self._step
        if self.mode == "compile":  # one graph per bucket on one code object: dynamo must keep them all
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, len(self.buckets))
            self.run = compiled(self._step, self.device)
        self.warmup_s: dict[int, float] = {}  # seconds each bucket took to compile / capture
        self.steps = 0  # decode steps run through here

    def _step(self, tok: Tensor, view: PagedKVCache) -> Tensor:
        logits, _ = self.model(tok[:, None], cache=view)  # (b, 1, V)
        return logits[:, 0]

    def _call(self, b: int) -> Tensor:
        if self.rows is not None:  # the layers read this bucket's buffers (the same tensors every step)
            self.rows.idx, self.rows.mask = self.adapter_idx[b], self.adapter_mask[b]
        try:
            if self.mode == "compile":
                return self.run(self.tokens[b], self.views[b])
            if b not in self.graphs:
                view = self.views[b]
                self.graphs[b] = capture(lambda: self._step(self.tokens[b], view), lambda: view.load([], []))
            graph, out = self.graphs[b]
            graph.replay()
            return out
        finally:
            if self.rows is not None:
                self.rows.set(None)

    @torch.inference_mode()  # the engine steps in inference mode: the compiled graphs' guards expect it
    def warmup(self) -> dict[int, float]:
        """Compile (CPU) or capture (CUDA) every bucket, running it on padding rows only (they touch nothing but
        the scratch block) -> {bucket: seconds}."""
        for b in self.buckets:
            t0 = time.perf_counter()
            self.views[b].load([], [])
            self._load_adapters(b, [])
            self._call(b)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.warmup_s[b] = time.perf_counter() - t0
        return dict(self.warmup_s)

    def describe(self) -> str:
        """One line: what was compiled or captured and how long each bucket took."""
        what = "CUDA graphs captured" if self.mode == "graph" else "torch.compile'd"
        times = ", ".join(f"{b}: {s:.1f} s" for b, s in self.warmup_s.items())
        return (f"decode step {what} for batch buckets {', '.join(map(str, self.buckets))} "
                f"(warm-up {sum(self.warmup_s.values()):.1f} s; per bucket {times})")

    def _load_adapters(self, b: int, adapters: list[int]) -> None:
        """Bucket b's adapter buffers <- the rows' adapter indices (padding rows: 0, the base)."""
        if self.rows is None:
            return
        idx = torch.tensor(list(adapters) + [0] * (b - len(adapters)), dtype=torch.long)
        self.adapter_idx[b].copy_(idx)
        self.adapter_mask[b].copy_(self.rows.mask_of(idx))

    def __call__(self, ids: list[int], tables: list[list[int]], lengths: list[int],
                 adapters: list[int] | None = None) -> Tensor:
        """One token per row: ids (k,), each row's block table and tokens already cached, its adapter index (0 or
        None: the base) -> logits (k, V), fp32. The rows' blocks must hold their new token's slot (the engine grows
        them before the step)."""
        k = len(ids)
        b = self.buckets[bisect.bisect_left(self.buckets, k)]  # IndexError past max_batch: never planned
        self.views[b].load(tables, lengths)
        self._load_adapters(b, adapters or [0] * k)
        self.tokens[b].copy_(torch.tensor(list(ids) + [0] * (b - k), dtype=torch.long))
        out = self._call(b)
        self.steps += 1
        return out[:k].clone() if self.mode == "graph" else out[:k]  # a graph's output buffer is reused
