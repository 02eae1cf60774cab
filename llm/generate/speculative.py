"""Speculative decoding: a proposer drafts up to K tokens per row, the target checks them all in one pass.

  Speculation(k, draft=model) / Speculation(k, lookup=n)   a small draft model, or n-gram prompt lookup
  lookup_draft(seq, n, k)                  prompt lookup: what followed the latest earlier match of the tail
  accept_greedy(best, drafts, n_draft)     greedy verification: the longest prefix equal to the target's argmax
  accept_sampled(p, q, drafts, ...)        the rejection rule (Leviathan et al. 2023, Chen et al. 2023)
  stream_speculative(model, prompts, n)    -> per round, each row's new ids (1 .. K + 1 of them)

One round of a row whose context is seq (all of it but seq[-1] in the target's KV cache):
  1. draft d_1..d_k (k <= K; fewer near max_new_tokens or when the lookup finds less);
  2. one target forward over [seq[-1], d_1..d_k] -> p_0..p_k, p_i the distribution after d_i;
  3. accept d_i while the rule allows, then add one token from the target: the correction at the
     first rejection, or the bonus token from p_k when every draft was accepted;
  4. roll back: the cache length of the row is set to the context it keeps, so the entries of
     rejected drafts are overwritten by the next round (`KVCache.set_lengths`).
Greedy: accept d_i iff d_i = argmax p_{i-1}, so the output is plain greedy decoding's. Sampling: accept
d_i with probability min(1, p(d_i) / q(d_i)), else draw from norm(max(0, p - q)); the tokens are then
distributed as the target's (temperature, top-k, top-p and min-p applied to p and q alike). Prompt lookup
proposes deterministically: q is one-hot at the drafted token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm.generate.decode import PLAIN, compiled, fit_prompts, prefill
from llm.generate.sampling import SamplingError, SamplingParams, draw_probs, warp
from llm.generate.stats import Stats
from llm.model import Transformer


@dataclass(frozen=True)
class Speculation:
    """How tokens are proposed: `draft` (a smaller model with the same tokenizer) or `lookup` (the
    longest n-gram, n <= lookup, matched in the prompt and the output so far); k tokens per round."""

    k: int = 4
    draft: Transformer | None = None
    lookup: int | None = None
    compile_draft: bool = False  # the draft's one-token step through torch.compile (static cache, decode.compiled)

    def __post_init__(self) -> None:
        if (self.draft is None) == (self.lookup is None):
            raise SamplingError("speculative decoding needs exactly one proposer: a draft model or prompt lookup")
        if self.k < 1:
            raise SamplingError(f"speculate k must be >= 1 drafted tokens per step, got {self.k}")
        if self.lookup is not None and self.lookup < 1:
            raise SamplingError(f"prompt lookup n-gram size must be >= 1, got {self.lookup}")
        if self.compile_draft and self.draft is None:
            raise SamplingError("compiling the draft needs a draft model (prompt lookup has no step to compile)")


def check_tokenizers(tok, draft_tok) -> None:
    """Refuse, in one line, a draft whose tokenizer is not the target's (ids would mean other text)."""
    probe = "def speculative(x):\n    return x + 1  # héllo 日本語 😀"
    same = (tok.n_vocab == draft_tok.n_vocab and tok.eot_id == draft_tok.eot_id and tok.bos_id == draft_tok.bos_id
            and tok.encode(probe) == draft_tok.encode(probe)
            and getattr(tok, "_ranks", None) == getattr(draft_tok, "_ranks", None))
    if not same:
        raise SamplingError(f"the draft model's tokenizer differs from the target's ({draft_tok.n_vocab} vs "
                            f"{tok.n_vocab} ids or other merges): the draft must share the target's tokenizer")


def lookup_draft(seq: Sequence[int], n: int, k: int) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of seq's last m tokens (m = n .. 1, longest
    first) and return the (up to) k tokens that followed it; [] when no suffix occurs earlier."""
    L = len(seq)
    for m in range(min(n, L - 1), 0, -1):
        tail = list(seq[L - m:])
        first = tail[0]
        for s in range(L - m - 1, -1, -1):  # start of an earlier occurrence, latest first
            if seq[s] == first and list(seq[s:s + m]) == tail:
                return list(seq[s + m:s + m + k])
    return []


def accept_greedy(best: Tensor, drafts: Tensor, n_draft: Tensor) -> tuple[Tensor, Tensor]:
    """best (B, K+1) target argmax after each fed token; drafts (B, K); n_draft (B,) valid drafts per row.

    -> (accepted (B,), next (B,)): the longest prefix with d_i = best_{i-1}, then best at that point.
    """
    B, K = drafts.shape
    ok = (drafts == best[:, :K]) & (torch.arange(K, device=drafts.device)[None] < n_draft[:, None])
    a = ok.long().cumprod(-1).sum(-1)  # (B,)
    return a, best[torch.arange(B, device=best.device), a]


def accept_sampled(p: Tensor, q: Tensor | None, drafts: Tensor, n_draft: Tensor, u: Tensor,
                   u_next: Tensor) -> tuple[Tensor, Tensor]:
    """The rejection rule of speculative sampling, on given distributions.

    p (B, K+1, V): target probabilities after each fed token (p_i scores d_{i+1}; p_K is the bonus);
    q (B, K, V): the draft's probabilities d_i was drawn from, None for a deterministic proposer
    (q one-hot at d_i); drafts (B, K) ids; n_draft (B,) valid drafts per row; u (B, K), u_next (B,)
    uniforms in [0, 1). d_i is accepted iff u_i * q(d_i) < p(d_i) (probability min(1, p/q)) and every
    earlier one was; at the first rejection the next token is drawn from max(0, p - q), normalised;
    after n_draft acceptances from p_{n_draft}. -> (accepted (B,), next (B,)).
    """
    B, K, V = drafts.shape[0], drafts.shape[1], p.shape[-1]
    rows = torch.arange(B, device=p.device)
    pd = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)  # (B, K)
    qd = torch.ones_like(pd) if q is None else q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = (u * qd < pd) & (torch.arange(K, device=p.device)[None] < n_draft[:, None])
    a = ok.long().cumprod(-1).sum(-1)  # (B,)
    pa = p[rows, a]  # (B, V)
    if q is None:
        qa = torch.nn.functional.one_hot(drafts, V).to(p.dtype) if K else p.new_zeros(B, 0, V)
    else:
        qa = q.to(p.dtype)
    qa = torch.cat([qa, p.new_zeros(B, 1, V)], 1)[rows, a] * (a < n_draft)[:, None]  # 0 where all were accepted
    r = (pa - qa).clamp_min(0)
    r = torch.where(r.sum(-1, keepdim=True) > 0, r, pa)  # p = q exactly: a rejection cannot happen; be safe
    return a, draw_probs(r, u_next)


class _Rows:
    """Host state of the batch: each row's ids (prompt + output), output count, finished flag."""

    def __init__(self, prompts: list[list[int]], n: int) -> None:
        self.seq, self.n = [list(p) for p in prompts], n
        self.new, self.done = [0] * len(prompts), [False] * len(prompts)

    def active(self) -> list[int]:
        return [b for b, d in enumerate(self.done) if not d]

    def lengths(self, fed: list[int]) -> list[int]:
        """Cache lengths to run a pass at: the row's valid entries, 0 for finished rows (their junk
        entries then sit at the start of their own cache and never bound the others' room)."""
        return [0 if d else f for d, f in zip(self.done, fed)]


class SpeculativeDecoder:
    """Target + proposer for one batch: `first` after the prefills, then `round` per target pass."""

    def __init__(self, model: Transformer, spec: Speculation, rows: _Rows, params: SamplingParams,
                 vocab: int, seed: int | None) -> None:
        self.model, self.spec, self.rows, self.params, self.vocab = model, spec, rows, params, vocab
        device = model.norm_f.weight.device  # not lm_head.weight: a 16-bit or quantized head widens its weight
        B, longest = len(rows.seq), max(map(len, rows.seq))
        blocks = [model.n_positions] + ([spec.draft.cfg.block_size] if spec.draft is not None else [])
        self.limit = min(min(blocks), longest + rows.n + spec.k)  # no pass may write at or past this position
        self.cache = model.new_cache(B, self.limit)
        self.dcache = spec.draft.new_cache(B, self.limit) if spec.draft is not None else None
        self.gens = None if params.greedy else [torch.Generator().manual_seed(seed + b) for b in range(B)]
        self.drafted = self.accepted = self.passes = self.row_passes = 0
        self.device = device
        # the few-row plans of the target's verify pass and the draft's catch-up pass, taken once (~1 ms each)
        self.plans = model.rows_plans()
        self.dplans = spec.draft.rows_plans() if spec.draft is not None else []
        self.dstep: Callable[[Tensor], Tensor] | None = None  # the compiled draft pass, built on first use
        self.dshapes: set[int] = set()  # ids per row the compiled draft pass has run with (one graph each)

    def _draft_pass(self, ids: Tensor) -> Tensor:
        """The draft fed ids (B, T) after every row's cached entries -> logits (B, T, V). Compiled: the pass runs
        with the draft cache in static mode (fixed shapes, no host state; decode.Decoder's rule; one graph per T,
        compiled the first time that T runs) and the host lengths move on after it."""
        draft, cache = self.spec.draft, self.dcache
        if not self.spec.compile_draft:
            return draft(ids, cache=cache)[0]
        cache.check_room(ids.shape[1], host=True)
        if self.dstep is None:
            self.dstep = compiled(lambda t: draft(t, cache=cache)[0], ids.device)
        self.dshapes.add(ids.shape[1])
        cache.static = True
        try:
            logits = self.dstep(ids)
        finally:
            cache.static = False
        cache.advance_host(ids.shape[1])
        return logits

    def _uniforms(self, n: int) -> Tensor:
        """(B, n) uniforms for this round; only unfinished rows draw, so a row's stream is its own."""
        u = torch.zeros(len(self.rows.seq), n)
        for b in self.rows.active():
            u[b] = torch.rand(n, generator=self.gens[b])
        return u.to(self.device)

    def _probs(self, logits: Tensor) -> Tensor:
        """(..., V) logits -> probabilities after temperature / top-k / top-p / min-p (`warp`)."""
        shape = logits.shape
        return warp(logits.reshape(-1, shape[-1]).float(), self.params).softmax(-1).view(shape)

    def _pick(self, logits: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, V) logits -> (token (B,), its distribution (B, V) or None when greedy)."""
        if self.params.greedy:
            return logits.argmax(-1), None
        q = self._probs(logits)
        return draw_probs(q, u), q

    def first(self, chunk: int | None = None) -> list[int]:
        """Prefill the target (and the draft) with the prompts; the first new token of each row."""
        prompts = self.rows.seq
        logits = prefill(self.model, self.cache, prompts, chunk)[:, : self.vocab]
        if self.dcache is not None:
            prefill(self.spec.draft, self.dcache, prompts, chunk)
        u = None if self.gens is None else self._uniforms(1)[:, 0]
        return self._pick(logits, u)[0].tolist()

    def round(self) -> list[list[int]]:
        """One target pass: draft, verify, and each row's new ids (accepted drafts + one target token)."""
        rows, K = self.rows, self.spec.k
        act = rows.active()
        fed = [len(s) - 1 for s in rows.seq]  # the target's cache holds all but the last id
        # per-row draft length: at most K, and never past max_new_tokens (the pass adds one more token)
        want = [0 if rows.done[b] else min(K, rows.n - rows.new[b] - 1) for b in range(len(fed))]
        room = self.limit - max(fed[b] for b in act)  # the pass writes T entries at fed[b] .. fed[b] + T - 1
        k_max = max(0, min(max(want), room - 1))
        u = None if self.gens is None else self._uniforms(2 * K + 1)
        if self.spec.lookup is not None:
            props = [lookup_draft(rows.seq[b], self.spec.lookup, min(want[b], k_max)) if not rows.done[b] else []
                     for b in range(len(fed))]
            k_max, q = max(map(len, props)), None
        else:
            props, q = self._draft(k_max, None if u is None else u[:, :K])
            props = [p[: min(w, k_max)] for p, w in zip(props, want)]
        n_draft = [len(p) for p in props]
        T = 1 + k_max
        ids = torch.zeros(len(fed), T, dtype=torch.long)
        for b in act:
            ids[b, : 1 + n_draft[b]] = torch.tensor([rows.seq[b][-1]] + props[b], dtype=torch.long)
        drafts, nd = ids[:, 1:].to(self.device), torch.tensor(n_draft, device=self.device)
        self.cache.set_lengths(rows.lengths(fed))
        with self.model.few_rows(self.plans):  # T = 1 + k_max rows: on CPU fp32 each weight read once for all
            logits, _ = self.model(ids.to(self.device), cache=self.cache)  # (B, T, V)
        logits = logits[..., : self.vocab]
        if self.gens is None:
            a, nxt = accept_greedy(logits.argmax(-1), drafts, nd)
        else:
            a, nxt = accept_sampled(self._probs(logits), None if q is None else q[:, :k_max], drafts, nd,
                                    u[:, K:K + k_max], u[:, 2 * K])
        a, nxt = a.tolist(), nxt.tolist()
        self.passes += 1
        self.row_passes += len(act)
        self.drafted += sum(n_draft[b] for b in act)
        self.accepted += sum(a[b] for b in act)
        return [[] if rows.done[b] else props[b][: a[b]] + [nxt[b]] for b in range(len(fed))]

    def _draft(self, k: int, u: Tensor | None) -> tuple[list[list[int]], Tensor | None]:
        """k tokens per row from the draft model -> (ids per row, their distributions (B, k, V) or None).

        First the ids the draft has not seen (1, or 2 after a round that accepted every draft) in one
        ragged pass, then one pass per drafted token; the draft cache is rolled back in `commit`. With
        compile_draft the first pass is compiled too when every row feeds as many ids (always at batch 1; its eager
        few-row pass cost 1.2-1.3 compiled draft steps, benchmarks/NOTES.md session 7), else it runs eager.
        """
        B = len(self.rows.seq)
        if k == 0:
            return [[] for _ in range(B)], None
        draft, cache, rows = self.spec.draft, self.dcache, self.rows
        have = cache.host_lengths
        pend = [[0] if rows.done[b] else rows.seq[b][have[b]:] for b in range(B)]
        P = max(map(len, pend))
        ids = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(pend):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        start = rows.lengths(list(have))
        cache.set_lengths(start)
        if self.spec.compile_draft and min(map(len, pend)) == P:  # rows at one pending length: shape-static
            logits = self._draft_pass(ids.to(self.device))[:, -1:]
        else:
            at = torch.tensor([len(p) - 1 for p in pend], device=self.device)
            with draft.few_rows(self.dplans):  # 1-2 ids per row (few-query attention; fp32 linears read once)
                logits, _ = draft(ids.to(self.device), cache=cache, logits_at=at)
            cache.set_lengths([s + len(p) for s, p in zip(start, pend)])
        toks, qs = [], []
        for i in range(k):
            d, qi = self._pick(logits[:, -1, : self.vocab], None if u is None else u[:, i])
            toks.append(d)
            qs.append(qi)
            if i < k - 1:
                logits = self._draft_pass(d[:, None])
        out = torch.stack(toks, 1).tolist()  # (B, k)
        return out, None if u is None else torch.stack(qs, 1)

    def commit(self) -> None:
        """After the rows took their new ids: the draft keeps only the entries that match them."""
        if self.dcache is not None:
            seq = self.rows.seq
            self.dcache.set_lengths([min(h, len(s) - 1) for h, s in zip(self.dcache.host_lengths, seq)])


@torch.inference_mode()
def stream_speculative(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                       params: SamplingParams = PLAIN, spec: Speculation | None = None, *, seed: int | None = None,
                       eos_ids: Sequence[int] = (), vocab_limit: int | None = None, prefill_chunk: int | None = None,
                       stop: Callable[[int, int], bool] | None = None,
                       stats: Stats | None = None) -> Iterator[list[list[int]]]:
    """Yield once per target pass, for each row, the ids it gained (empty once it has finished).

    As `stream_tokens`, with the same stopping rules checked on every id in order (an end-of-text id
    or a stop inside an accepted run ends the row there; the rest of the run is dropped). Greedy
    output equals `stream_tokens`'s; sampled output is distributed as it is (other draws: row b
    draws from a generator seeded with seed + b, per round). The repetition penalty is not supported.
    """
    spec = spec or Speculation(lookup=3)
    if params.repetition_penalty != 1.0:
        raise SamplingError("speculative decoding does not support the repetition penalty (it changes within a run "
                            "of drafted tokens); use plain decoding")
    draft = spec.draft
    block = model.n_positions
    if draft is not None:
        if draft.cfg.vocab_size != model.cfg.vocab_size:
            raise SamplingError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                                f"({model.cfg.vocab_size}): the draft must share the target's tokenizer")
        block = min(block, draft.cfg.block_size)
        draft.decode_layout()
    prompts = fit_prompts(prompts, max_new_tokens, block)
    model.decode_layout()
    t0 = time.perf_counter()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    vocab = min(vocab_limit or model.cfg.padded_vocab_size, model.cfg.padded_vocab_size)
    rows = _Rows(prompts, max_new_tokens)
    dec = SpeculativeDecoder(model, spec, rows, params, vocab, seed)
    eos, new = set(eos_ids), [[i] for i in dec.first(prefill_chunk)]
    warm, warm_tokens = 0.0, 0
    while True:
        out = [_take(rows, b, ids, eos, stop) for b, ids in enumerate(new)]
        if stats is not None and not stats.ttft:
            stats.ttft = time.perf_counter() - t0
        yield out
        if all(rows.done):
            break
        dec.commit()
        r0, graphs = time.perf_counter(), len(dec.dshapes)
        new = dec.round()
        if len(dec.dshapes) > graphs:  # this round compiled a draft pass (a new T): timed apart, with its tokens
            warm, warm_tokens = warm + time.perf_counter() - r0, warm_tokens + sum(map(len, new))
    if stats is not None:
        stats.record(prompt_tokens=sum(map(len, prompts)), rows=len(prompts), new_tokens=sum(rows.new),
                     total=time.perf_counter() - t0, drafted=dec.drafted, accepted=dec.accepted,
                     target_passes=dec.passes, row_passes=dec.row_passes, plain_passes=max(rows.new) - 1)
        if warm_tokens:
            stats.record(warmup=warm, warmup_tokens=warm_tokens, warmup_what="compile")


def _take(rows: _Rows, b: int, ids: list[int], eos: set[int], stop: Callable[[int, int], bool] | None) -> list[int]:
    """Row b takes ids in order until one ends it (end-of-text, a stop, max_new_tokens); -> those taken."""
    kept: list[int] = []
    for i in ids:
        if rows.done[b]:
            break
        kept.append(i)
        rows.seq[b].append(i)
        rows.new[b] += 1
        stopped = stop(b, i) if stop is not None else False
        rows.done[b] = i in eos or stopped or rows.new[b] >= rows.n
    return kept
