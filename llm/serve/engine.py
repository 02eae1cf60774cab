"""One step over the paged KV cache: every running decode and the prefill chunks that fit, in one forward pass.

A `Seq` is one generated sequence (one choice of one prompt) with its own sampling parameters, seed,
stop strings and KV blocks. Its known tokens are its prompt and what it has generated; the KV cache holds
the first `length` of them, and a step feeds it the next ones: one (a decode) or a chunk (a prefill, or a
recompute after preemption). When the last known token has been fed, its logits give the next token.

`Engine.step(seqs)` spends a budget of `max_step_tokens` tokens (vLLM's max_num_batched_tokens):
  1. every seq with one token to feed (the decodes), oldest first, one token each;
  2. prefill chunks of the others, oldest first, in what the budget has left (a prompt that starts with
     cached blocks takes them first: `llm.paged_cache`'s prefix cache);
then runs them all as one ragged forward pass (`PagedKVCache.ragged`: one row per token, the model's
linears see every token of the step at once) and computes logits only at the rows that sample.
KV blocks are taken as sequences grow. When the pool is short, the newest seq that is not in the step
is preempted: its blocks are released and it is recomputed later from its known tokens, so its stream
neither loses nor repeats a token. The oldest seq can always progress (a request whose worst case does
not fit the pool is refused up front).

A prefix-tuned model (llm/prefix.py) is served with its prefix as a region of the pool every sequence shares:
the engine writes the P rows into ceil(P / bs) blocks once and holds them for its lifetime (never released, so
never freed or evicted). Each sequence's block table starts with the full ones (shared, ref-counted); the rows of
a partial last block are copied into the sequence's own first block (the tokens follow them there). A sequence's
`length` counts its tokens; the cache is built with start=P, so token i sits at position P + i, as in
`sample.py --peft`. Prefix-cache names cover the token part of each block (the first named block holds the
prefix's tail and the first bs - P % bs tokens); the full prefix blocks are never named.

With `compile_batch` (`llm serve --compile`) a step of decode rows only runs through `llm.serve.captured`
(torch.compile on the CPU, CUDA graphs on CUDA, at batch buckets, padded rows writing into the pool's scratch
block); steps that carry a prefill chunk or need prompt logprobs stay the eager ragged forward.

Sampling is batched: rows with the same parameters go through one `llm.generate.sampling.sample` call
(every operation in it is per row), each row with its own uniforms (drawn as `stream_tokens` draws them:
row_uniforms([seed]), token i takes u[:, i]) and repetition mask, so a greedy or seeded row gives the
text `sample.py` gives for it, whatever else is in the batch. Text goes through the row's `TextStream`
(UTF-8 safe, stop strings), the same as `stream_text`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm.generate.sampling import SamplingParams, row_uniforms, sample, seen_mask
from llm.generate.text import TextStream
from llm.model import Transformer
from llm.multi_lora import stack_adapters
from llm.paged_cache import BlockPool, PagedKVCache, block_hash
from llm.serve.captured import CapturedDecode
from llm.serve.grammar import Masker

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
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)
    grammar: Any = None  # an llguidance matcher (structured output): the tokens it allows are the only choices
    logprobs: int | None = None  # top-n logprobs of each new token (0: only the chosen one's)
    prompt_logprobs: bool = False  # echo + logprobs: the logprob of every prompt token
    blocks: list[int] = field(default_factory=list)
    names: list[bytes] = field(default_factory=list)  # prefix-cache names of its first full blocks
    cached: int = 0  # prompt tokens taken from the prefix cache
    length: int = 0  # tokens in the KV cache
    out: list[int] = field(default_factory=list)  # generated so far (the last one not yet fed while running)
    finish: str | None = None
    preemptions: int = 0
    u: Tensor | None = None
    seen: Tensor | None = None
    text: TextStream | None = None
    _prompt_lp: list = field(default_factory=list)

    @property
    def known(self) -> int:
        """Prompt + generated tokens: the KV cache is complete when it holds all of them but the last."""
        return len(self.prompt) + len(self.out)

    def tokens(self, start: int, stop: int) -> list[int]:
        """Known tokens start .. stop - 1."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.out[start - p:stop - p]
        return self.prompt[start:] + self.out[:stop - p]

    def worst_case_tokens(self) -> int:
        return len(self.prompt) + self.max_tokens


def _root(s: Seq) -> bytes | None:
    """The prefix-cache parent of a sequence's first block: K/V differ per adapter, so their names do too."""
    return None if s.adapter is None else b"lora:" + s.adapter.encode()


class Engine:
    """The model, its block pool, the tokenizer (for text and the end-of-text id) and the step."""

    def __init__(self, model: Transformer, tok, pool: BlockPool, max_step_tokens: int = 256,
                 prefix_cache: bool = True, adapters: dict[str, Transformer] | None = None,
                 compile_batch: int = 0, compile_buckets: list[int] | None = None, mix_adapters: bool = True) -> None:
        """adapters: name -> the base with a LoRA adapter on top, sharing its weights
        (`llm.loading.adapter_on_shared_base`), stacked into one model (`llm.multi_lora`): a step's rows of every
        adapter and of the base run in one forward, each row with its own adapter (mix_adapters=False: one forward
        per adapter in the step, the schedule before mixing, kept for the benchmark's side-by-side).
        compile_batch > 0: steps of decode rows only (up to that many) run through a captured step
        (`llm.serve.captured`: torch.compile on the CPU, CUDA graphs on CUDA; the pool needs a scratch block);
        `warmup()` compiles or captures it before the first request; compile_buckets: its batch sizes (default
        1, 2, 4, ... compile_batch)."""
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        if model.prefix is not None and adapters:
            raise ValueError("LoRA adapters over a prefix-tuned base are not served (one prefix per server, on the "
                             "base model): serve the prefix checkpoint alone")
        self.model, self.tok, self.pool = model.decode_layout(), tok, pool
        self.adapters = list(adapters or {})  # names; row index k + 1 in the stacked model, 0 the base
        self.rows = None  # the stacked model's per-row adapter indices (llm.multi_lora.AdapterRows)
        if adapters:
            self.model, self.rows = stack_adapters(self.model, {k: m.decode_layout() for k, m in adapters.items()})
        self.mix_adapters = mix_adapters
        self.steps = self.forwards = 0  # steps that ran something, forwards they ran
        self.mixed_forwards = 0  # forwards whose rows carried >= 2 adapters (the base counted as one)
        self.max_step_tokens, self.prefix_cache = max_step_tokens, prefix_cache
        self.device = model.norm_f.weight.device
        self.vocab = min(tok.n_vocab, model.cfg.padded_vocab_size)
        self.prefix_queried = self.prefix_hits = 0  # prompt tokens looked up in / found in the prefix cache
        self.preemptions = 0
        self.masker = Masker()
        self.prefix_rows, self.head, self.shared, self.tail = 0, [], [], None  # a prefix's region (none: no prefix)
        if model.prefix is not None:
            self._place_prefix(model)
        self.captured = (CapturedDecode(self.model, pool, compile_batch, self.prefix_rows, compile_buckets,
                                        self.rows) if compile_batch else None)

    def warmup(self) -> dict[int, float]:
        """Compile or capture the decode step at every batch bucket -> {bucket: seconds} ({} without --compile)."""
        return self.captured.warmup() if self.captured is not None else {}

    def _place_prefix(self, model: Transformer) -> None:
        """Write the prefix's rows into blocks the engine holds for good: `shared` (the full ones, at the head of
        every sequence's table) and `tail` (a partial last block, copied into each sequence's first own block)."""
        P, bs = model.prefix.n_tokens, self.pool.block_size
        if self.pool.blocks_for(P) >= self.pool.n_blocks:
            raise ValueError(f"the prefix's {P} rows take {self.pool.blocks_for(P)} KV blocks of {bs}; the pool has "
                             f"{self.pool.n_blocks}: give more (--num-blocks)")
        self.head = self.pool.alloc(self.pool.blocks_for(P))
        model.prefix.fill_blocks(self.pool, self.head)
        self.prefix_rows, self.shared = P, self.head[: P // bs]
        self.tail = self.head[-1] if P % bs else None

    def own_blocks(self, tokens: int) -> int:
        """Blocks a sequence of `tokens` tokens takes from the pool (the shared prefix blocks not counted)."""
        return self.pool.blocks_for(self.prefix_rows + tokens) - len(self.shared)

    @property
    def usable_blocks(self) -> int:
        """Blocks sequences can take: the pool less the prefix's."""
        return self.pool.n_blocks - len(self.head)

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

    def preempt(self, s: Seq) -> None:
        """Free a running seq's blocks; it is recomputed from its known tokens when it gets blocks again."""
        self.release(s)
        s.length = 0
        s.preemptions += 1
        self.preemptions += 1
        if s.prompt_logprobs and not s.out:
            s._prompt_lp = [(None, None)]

    # ------------------------------------------------------------------ planning

    def _attach(self, s: Seq) -> None:
        """A seq without blocks starts with the shared prefix blocks (nothing without a prefix)."""
        if not s.blocks and self.shared:
            s.blocks = self.pool.share(self.shared)

    def _grow(self, s: Seq, length: int, live: list[Seq], planned: set[int]) -> int:
        """Blocks for s up to `length` tokens, preempting the newest seqs after s that are not in this step while
        the pool is short; returns the tokens its blocks now hold (less than asked when nothing is left)."""
        self._attach(s)
        bs = self.pool.block_size
        need = self.pool.blocks_for(self.prefix_rows + length) - len(s.blocks)
        if need > self.pool.free:
            after = live[live.index(s) + 1:]
            for v in reversed(after):
                if need <= self.pool.free:
                    break
                if len(v.blocks) > len(self.shared) and id(v) not in planned:  # it holds blocks of its own
                    self.preempt(v)
        take = min(need, self.pool.free)
        if take > 0:
            new = self.pool.alloc(take)
            if self.tail is not None and len(s.blocks) == len(self.shared):  # its first own block: the prefix's tail
                self.pool.copy_rows(self.tail, new[0], self.prefix_rows % bs)
            s.blocks.extend(new)
        return min(length, max(0, len(s.blocks) * bs - self.prefix_rows))

    def plan(self, live: list[Seq]) -> list[tuple[Seq, int]]:
        """(seq, tokens to feed) for this step: decodes first, then prefill chunks in the remaining budget."""
        budget, plan, planned = self.max_step_tokens, [], set()
        for s in live:
            if s.known - s.length == 1 and budget > 0:  # a decode (its last sampled token)
                if self._grow(s, s.length + 1, live, planned) > s.length:
                    plan.append((s, 1))
                    planned.add(id(s))
                    budget -= 1
                else:  # nothing newer to preempt: it is the newest holder, it yields its own blocks
                    self.preempt(s)
        for s in live:
            if budget <= 0:
                break
            if id(s) in planned or s.known - s.length <= 1:
                continue
            if self.prefix_cache and not (s.prompt_logprobs and not s.out):
                self._take_cached(s)
            n = self._grow(s, min(s.known, s.length + budget), live, planned) - s.length
            if n > 0:
                plan.append((s, n))
                planned.add(id(s))
                budget -= n
        return plan

    def _take_cached(self, s: Seq) -> None:
        """Extend a prefilling seq with the cached blocks its known tokens continue into (never its last token:
        the step needs that position's logits). Only at a block boundary."""
        self._attach(s)
        if s.length == 0 and s.preemptions == 0:
            self.prefix_queried += len(s.prompt)
        while True:
            j = len(s.blocks)  # the next block of its table
            lo, hi = self._token_range(j)
            if not (j - len(self.shared) == len(s.names) and s.length == lo and hi <= s.known - 1):
                return
            name = block_hash(s.names[-1] if s.names else _root(s), s.tokens(lo, hi))
            b = self.pool.lookup(name)
            if b is None:
                return
            s.blocks.append(b)
            s.names.append(name)
            s.length = hi
            if s.preemptions == 0:
                s.cached += hi - lo
                self.prefix_hits += hi - lo

    def _token_range(self, j: int) -> tuple[int, int]:
        """The tokens [lo, hi) that block j of a sequence's table holds (a prefix's rows take the first positions)."""
        bs = self.pool.block_size
        return max(0, j * bs - self.prefix_rows), (j + 1) * bs - self.prefix_rows

    def _name_full_blocks(self, s: Seq) -> None:
        """Register the seq's blocks that became full (prompt or generated tokens) in the prefix cache."""
        while True:
            j = len(self.shared) + len(s.names)
            lo, hi = self._token_range(j)
            if hi > s.length:
                return
            name = block_hash(s.names[-1] if s.names else _root(s), s.tokens(lo, hi))
            self.pool.register(name, s.blocks[j])
            s.names.append(name)

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self, seqs: list[Seq]) -> None:
        plan = self.plan([s for s in seqs if s.finish is None])
        self.steps += bool(plan)
        if self.mix_adapters:
            groups = [plan] if plan else []
        else:  # the schedule before mixing: rows of different adapters in forwards apart
            groups = [[(s, n) for s, n in plan if s.adapter == a] for a in dict.fromkeys(s.adapter for s, _ in plan)]
        for g in groups:
            self._forward(g)

    def _decode_only(self, plan: list[tuple[Seq, int]]) -> bool:
        """Whether the captured step can run this plan: every row feeds its one last known token (a decode), none
        wants prompt logprobs, at most the largest bucket of rows."""
        return (self.captured is not None and len(plan) <= self.captured.buckets[-1]
                and all(n == 1 and s.length + 1 == s.known and not (s.prompt_logprobs and not s.out)
                        for s, n in plan))

    def _forward(self, plan: list[tuple[Seq, int]]) -> None:
        """One ragged forward over the planned rows, each with its adapter (or the captured step, for decode rows
        only), then their prompt logprobs and samples."""
        index = [0 if s.adapter is None else self.adapters.index(s.adapter) + 1 for s, _ in plan]
        self.forwards += 1
        self.mixed_forwards += len(set(index)) > 1
        if self._decode_only(plan):
            logits = self.captured([s.tokens(s.length, s.known)[0] for s, _ in plan], [s.blocks for s, _ in plan],
                                   [s.length for s, _ in plan], index)[:, : self.vocab]
            self._after_forward(plan, [(s, i, 1, i) for i, (s, _) in enumerate(plan)], logits)
            return
        ids, rows, r0 = [], [], 0  # rows: (seq, first logits row, count, at) of the seqs that need logits
        n_rows = 0
        for s, n in plan:
            ids += s.tokens(s.length, s.length + n)
            echo = s.prompt_logprobs and not s.out
            if echo:
                rows.append((s, n_rows, n, r0))
                n_rows += n
            elif s.length + n == s.known:
                rows.append((s, n_rows, 1, r0 + n - 1))
                n_rows += 1
            r0 += n
        cache = PagedKVCache.ragged(self.pool, [s.blocks for s, _ in plan], [s.length for s, _ in plan],
                                    [n for _, n in plan], start=self.prefix_rows)
        at = torch.tensor([a + j for _, _, k, a in rows for j in range(k)], dtype=torch.long, device=self.device)
        idx = None  # every row the base: the adapters' layers compute nothing
        if any(index):
            idx = torch.tensor([k for k, (_, n) in zip(index, plan) for _ in range(n)], device=self.device)
        with self.rows.use(idx) if self.rows is not None else contextlib.nullcontext():
            logits = self.model(torch.tensor(ids, device=self.device)[:, None], cache=cache, logits_rows=at)[0]
        logits = logits[:, 0, : self.vocab]  # (K, V): one row per token that needs logits
        self._after_forward(plan, rows, logits)

    def _after_forward(self, plan: list[tuple[Seq, int]], rows: list[tuple[Seq, int, int, int]],
                       logits: Tensor) -> None:
        """Count the fed tokens, name the blocks that filled, then prompt logprobs and the samples of the rows
        (seq, first logits row, count, at) from logits (K, V)."""
        c0 = {id(s): s.length for s, _ in plan}
        for s, n in plan:
            s.length += n
            if self.prefix_cache:
                self._name_full_blocks(s)
        draws = []
        for s, first, k, _ in rows:
            if s.prompt_logprobs and not s.out:
                self._prompt_logprobs(s, c0[id(s)], logits[first:first + k])
            if s.length < s.known:
                continue
            if s.max_tokens == 0:
                self._finish(s, "length", Event(prompt_logprobs=s._prompt_lp or None))
            else:
                draws.append((s, first + k - 1))
        self._sample_all(draws, logits)

    def _prompt_logprobs(self, s: Seq, c0: int, logits: Tensor) -> None:
        """Logprobs of prompt tokens c0 + 1 .. from the logits (k, V) at positions c0 .. c0 + k - 1."""
        lp = torch.log_softmax(logits, -1)
        for i in range(logits.shape[0]):
            if c0 + i + 1 < len(s.prompt):
                s._prompt_lp.append(self._logprob(lp[i], s.prompt[c0 + i + 1], s.logprobs))

    def _sample_all(self, draws: list[tuple[Seq, int]], logits: Tensor) -> None:
        """Token len(s.out) of every drawing row: one `sample` call per group of equal parameters."""
        constrained = [(s, r) for s, r in draws if s.grammar is not None]
        if constrained:  # structured output: what the grammar does not allow gets probability 0
            rows = torch.tensor([r for _, r in constrained], device=self.device)
            ok = self.masker.allowed([s.grammar for s, _ in constrained], logits.shape[-1]).to(self.device)
            ok[~ok.any(-1), self.tok.eot_id] = True  # a matcher in an error state allows nothing: end the row
            logits[rows] = logits[rows].masked_fill(~ok, float("-inf"))
        groups: dict[SamplingParams, list[tuple[Seq, int]]] = {}
        for s, r in draws:
            groups.setdefault(s.params, []).append((s, r))
        for params, g in groups.items():
            rows = logits[torch.tensor([r for _, r in g], device=self.device)]
            u = None if params.greedy else torch.stack([s.u[0, len(s.out)] for s, _ in g])
            seen = torch.cat([s.seen for s, _ in g]) if params.repetition_penalty != 1.0 else None
            nxt = sample(rows, params, u, seen).tolist()
            for b, ((s, _), token) in enumerate(zip(g, nxt)):
                if s.seen is not None:
                    s.seen[0, token] = True
                self._accept(s, token, rows[b:b + 1])

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
        if s.grammar is not None:
            s.grammar.consume_token(token)
        if s.text.stopped or (s.grammar is not None and s.grammar.is_stopped()):
            ev.text += s.text.close()  # '' after a stop string
            self._finish(s, "stop", ev)
        elif len(s.out) >= s.max_tokens:
            ev.text += s.text.close()
            self._finish(s, "length", ev)
        else:
            s.emit(ev)

    def _finish(self, s: Seq, reason: str, ev: Event) -> None:
        s.finish = ev.finish = reason
        s.emit(ev)
