"""One batched step over the paged KV cache: prefill chunks, then one decode step for every running row.

A `Seq` is one generated sequence (one choice of one prompt) with its own sampling parameters, seed,
stop strings and KV blocks. `Engine.step(seqs)` runs, in this order,
  1. prefill: up to `prefill_chunk` prompt tokens in all, taken from the seqs still prefilling (oldest
     first), one forward pass per seq (B = 1, its chunk), so a long prompt holds the running streams
     back by at most one chunk per step;
  2. decode: one forward pass (B, 1) over every seq that has a sampled token to feed, each row reading
     its own blocks through the block table;
and samples each row with `llm.generate.sampling.sample` and that row's parameters and uniforms (drawn
as `stream_tokens` draws them: row_uniforms([seed]), token i takes u[:, i]), so a greedy or seeded
row gives the text `sample.py` gives for it, whatever else is in the batch. Text goes through the
row's `TextStream` (UTF-8 safe, stop strings), the same as `stream_text`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llm.generate.sampling import SamplingParams, row_uniforms, sample, seen_mask
from llm.generate.text import TextStream
from llm.model import Transformer
from llm.paged_cache import BlockPool, PagedKVCache, block_hash

TopList = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Event:
    """What one step produced for one seq: a new token (with its text piece) and/or the end."""

    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top: TopList | None = None
    finish: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_logprobs: list[tuple[float | None, TopList | None]] | None = None  # echo: one per prompt token
    error: str | None = None


@dataclass
class Seq:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # end-of-turn ids beside the tokenizer's end-of-text
    logprobs: int | None = None  # top-n logprobs of each new token (0: only the chosen one's)
    prompt_logprobs: bool = False  # echo + logprobs: the logprob of every prompt token
    blocks: list[int] = field(default_factory=list)
    names: list[bytes] = field(default_factory=list)  # prefix-cache names of its first full blocks
    cached: int = 0  # prompt tokens taken from the prefix cache
    length: int = 0  # tokens in the KV cache
    out: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet fed to the model
    finish: str | None = None
    u: Tensor | None = None
    seen: Tensor | None = None
    text: TextStream | None = None
    _prompt_lp: list = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt)

    def worst_case_tokens(self) -> int:
        return len(self.prompt) + self.max_tokens


class Engine:
    """The model, its block pool, the tokenizer (for text and the end-of-text id) and the step."""

    def __init__(self, model: Transformer, tok, pool: BlockPool, prefill_chunk: int = 256,
                 prefix_cache: bool = True) -> None:
        self.model, self.tok, self.pool = model.decode_layout(), tok, pool
        self.prefill_chunk, self.prefix_cache = prefill_chunk, prefix_cache
        self.prefix_queried = self.prefix_hits = 0  # prompt tokens looked up in / found in the prefix cache
        self.device = model.lm_head.weight.device
        self.vocab = min(tok.n_vocab, model.cfg.padded_vocab_size)

    def start(self, s: Seq) -> None:
        """Per-seq state drawn up front: uniforms, the repetition-penalty mask, the text stream."""
        s.u = None if s.params.greedy else row_uniforms([s.seed], max(1, s.max_tokens), self.device)
        s.seen = seen_mask([s.prompt], self.vocab, self.device) if s.params.repetition_penalty != 1.0 else None
        s.text = TextStream(s.stop)
        if s.prompt_logprobs:
            s._prompt_lp = [(None, None)]  # the first prompt token has no context

    def release(self, s: Seq) -> None:
        self.pool.release(s.blocks)
        s.blocks, s.names = [], []

    def _take_cached(self, s: Seq) -> None:
        """Extend a prefilling seq with the cached blocks its prompt continues into (never its last token: the
        step needs that position's logits). Only at a block boundary, and not for echo + logprobs."""
        bs = self.pool.block_size
        if s.length == 0:
            self.prefix_queried += len(s.prompt)
        limit = (len(s.prompt) - 1) // bs
        while len(s.names) < limit and len(s.names) * bs == s.length == len(s.blocks) * bs:
            i = len(s.names)
            name = block_hash(s.names[-1] if s.names else None, s.prompt[i * bs:(i + 1) * bs])
            b = self.pool.lookup(name)
            if b is None:
                return
            s.blocks.append(b)
            s.names.append(name)
            s.length += bs
            s.cached += bs
            self.prefix_hits += bs

    def _name_full_blocks(self, s: Seq) -> None:
        """Register the seq's blocks that became full (prompt or generated tokens) in the prefix cache."""
        bs = self.pool.block_size
        if len(s.names) >= s.length // bs:
            return
        toks = s.prompt + s.out
        while len(s.names) < s.length // bs:
            i = len(s.names)
            name = block_hash(s.names[-1] if s.names else None, toks[i * bs:(i + 1) * bs])
            self.pool.register(name, s.blocks[i])
            s.names.append(name)

    @torch.inference_mode()
    def step(self, seqs: list[Seq]) -> None:
        budget = self.prefill_chunk
        for s in seqs:
            if budget <= 0:
                break
            if s.finish is None and s.prefilling:
                budget -= self._prefill_chunk(s, budget)
        rows = [s for s in seqs if s.finish is None and s.pending is not None]
        if rows:
            self._decode(rows)

    def _prefill_chunk(self, s: Seq, budget: int) -> int:
        if self.prefix_cache and not s.prompt_logprobs:
            self._take_cached(s)
        c0 = s.length
        c1 = min(len(s.prompt), c0 + budget)
        self.pool.grow(s.blocks, c1)
        cache = PagedKVCache(self.pool, [s.blocks], [c0])
        ids = torch.tensor([s.prompt[c0:c1]], dtype=torch.long, device=self.device)
        if s.prompt_logprobs:
            logits, _ = self.model(ids, cache=cache)  # (1, T, V): every position predicts the next prompt token
            lp = torch.log_softmax(logits[0, :, : self.vocab], -1)
            for i in range(c1 - c0):
                if c0 + i + 1 < len(s.prompt):
                    s._prompt_lp.append(self._logprob(lp[i], s.prompt[c0 + i + 1], s.logprobs))
            last = logits[:, -1]
        else:
            last = self.model(ids, cache=cache, logits_at=torch.tensor([c1 - c0 - 1], device=self.device))[0][:, 0]
        s.length = c1
        if self.prefix_cache:
            self._name_full_blocks(s)
        if not s.prefilling:
            if s.max_tokens == 0:
                self._finish(s, "length", Event(prompt_logprobs=s._prompt_lp or None))
            else:
                self._accept(s, self._sample(s, last), last)
        return c1 - c0

    def _decode(self, rows: list[Seq]) -> None:
        for s in rows:
            self.pool.grow(s.blocks, s.length + 1)
        cache = PagedKVCache(self.pool, [s.blocks for s in rows], [s.length for s in rows])
        tok = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=self.device)
        logits, _ = self.model(tok, cache=cache)  # (B, 1, V)
        for b, s in enumerate(rows):
            s.length += 1
            s.pending = None
            if self.prefix_cache:
                self._name_full_blocks(s)
            row = logits[b:b + 1, 0]
            self._accept(s, self._sample(s, row), row)

    def _sample(self, s: Seq, logits: Tensor) -> int:
        """Token len(s.out) of the row from its logits (1, V), as `Decoder._sample` does for a batch."""
        i = len(s.out)
        u = None if s.u is None else s.u[:, i]
        nxt = sample(logits[:, : self.vocab], s.params, u, s.seen)
        if s.seen is not None:
            s.seen.scatter_(1, nxt[:, None], True)
        return int(nxt)

    def _logprob(self, lp: Tensor, token: int, top: int | None) -> tuple[float, TopList | None]:
        """(logprob of token, top-n list) from log-probabilities lp (V,) of the raw model distribution."""
        tl = None
        if top:
            v, i = lp.topk(min(top, lp.shape[0]))
            tl = list(zip(i.tolist(), v.tolist()))
        return float(lp[token]), tl

    def _accept(self, s: Seq, token: int, logits: Tensor) -> None:
        ev = Event(token=token)
        if s.logprobs is not None:
            ev.logprob, ev.top = self._logprob(torch.log_softmax(logits[0, : self.vocab], -1), token, s.logprobs)
        if s.prompt_logprobs and not s.out:
            ev.prompt_logprobs = s._prompt_lp
        if token == self.tok.eot_id or token in s.stop_ids:
            ev.token = None  # end-of-text is not part of the output (as in stream_text)
            ev.text = s.text.close()
            self._finish(s, "stop", ev)
            return
        s.out.append(token)
        ev.text = s.text.push(self.tok.decode_bytes([token]))
        if s.text.stopped:
            self._finish(s, "stop", ev)
        elif len(s.out) >= s.max_tokens:
            ev.text += s.text.close()
            self._finish(s, "length", ev)
        else:
            s.pending = token
            s.emit(ev)

    def _finish(self, s: Seq, reason: str, ev: Event) -> None:
        s.finish = ev.finish = reason
        s.pending = None
        s.emit(ev)
