"""KV-cached generation: prefill every prompt in one pass, then one token per step for all rows.

From ids to text:
  generate(model, prompt (B, T), n)        -> (B, T + n) ids; equal-length rows (tests, scripts)
  stream_tokens(model, prompts, n)         -> per step, each row's new id; ragged rows; the core loop
  stream_text(model, tok, prompts, n)      -> (row, text piece) as generated; stop strings, UTF-8 safe
  complete(model, tok, prompts, n)         -> [Completion]; also beam search (llm.beam)
Samplers live in llm.sampling, beam search in llm.beam; `main` is the command line of sample.py.
Rows of a batch may have different prompt lengths: prompts are right-padded and each row keeps its
own length in the KV cache (positions and attention follow it), so a row equals its unbatched run.
"""

from __future__ import annotations

import argparse
import codecs
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llm.beam import beam_search
from llm.kvcache import KVCache
from llm.model import Transformer
from llm.sampling import SamplingError, SamplingParams, row_uniforms, sample, seen_mask

__all__ = ["Completion", "Decoder", "SamplingError", "SamplingParams", "Stats", "TextStream", "complete",
           "fit_prompts", "generate", "prefill", "stream_text", "stream_tokens"]

MODES = ("eager", "static", "compile", "graph")
PLAIN = SamplingParams()  # temperature 1, nothing cut
# Prefill chunk off CUDA: the reference attention masks densely, so chunks skip most of the masked
# half of a long prompt's scores (2k prompt, tiny preset, 1 CPU thread: 308 -> 226 ms at batch 1).
CPU_CHUNK = 512


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, block_size: int,
                truncate: bool = False) -> list[list[int]]:
    """Check, before any compute, that each prompt + max_new_tokens fits the context.

    truncate=True keeps the last block_size - max_new_tokens tokens of a prompt that is too long.
    """
    if max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise SamplingError("no prompt given")
    room, out = block_size - max_new_tokens, []
    for ids in prompts:
        n = len(ids)
        if n == 0:
            raise SamplingError("empty prompt: give at least one token id (text prompts start from end-of-text)")
        if n > room:
            if room < 1:
                raise SamplingError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                                    f"context length {block_size}")
            if not truncate:
                raise SamplingError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) = {n + max_new_tokens} "
                                    f"exceeds the context length {block_size}; shorten them or truncate the prompt "
                                    "(--truncate-prompt)")
            ids = ids[-room:]
        out.append(list(ids))
    return out


@torch.no_grad()
def prefill(model: Transformer, cache: KVCache, prompts: list[list[int]], chunk: int | None = None) -> Tensor:
    """Run the prompts into an empty cache -> (B, V) fp32 logits of each row's last prompt token.

    Ragged prompts are right-padded to T = max length; a row's real tokens never see its padding
    (causal), and `cache.set_lengths` drops the padding's entries afterwards. chunk: tokens per
    forward pass, 0 for the whole prompt in one pass, None for CPU_CHUNK tokens off CUDA and one
    pass on CUDA; every chunking gives the same logits.
    """
    if any(cache.host_lengths):
        raise ValueError("prefill needs an empty cache")
    if chunk is not None and chunk < 0:
        raise SamplingError(f"prefill chunk must be >= 0 (0 = one pass), got {chunk}")
    lens = [len(p) for p in prompts]
    B, T, device = len(prompts), max(lens), cache.lengths.device
    if chunk is None:
        chunk = 0 if device.type == "cuda" else CPU_CHUNK
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : lens[b]] = torch.tensor(p, dtype=torch.long)
    ids, last = ids.to(device), torch.tensor(lens, device=device) - 1
    out, step = None, chunk or T
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        logits, _ = model(ids[:, c0:c1], cache=cache, logits_at=(last - c0).clamp(0, c1 - c0 - 1))
        here = logits[:, 0]  # (B, V)
        out = here if out is None else torch.where(((last >= c0) & (last < c1))[:, None], here, out)
    cache.set_lengths(lens)
    return out


class Decoder:
    """The decode step of one batch, tokens (B,) -> next tokens (B,): forward + sampling, on the device.

    mode "eager": plain calls. The other modes run the step with the cache in static mode (fixed
    shapes, no host state or sync inside the step; room checks and the host lengths are kept here):
    "static" calls it as is (what the others compile or capture, runnable anywhere); "compile" runs
    it through torch.compile (static shapes, compiled once per batch); "graph" captures it once in
    a CUDA graph and replays it, one launch sequence per token (CUDA only).
    Uniform u[:, i] (B, n) feeds the i-th sampled token; `seen` (B, V) tracks the repetition penalty.
    """

    def __init__(self, model: Transformer, cache: KVCache, params: SamplingParams, uniforms: Tensor | None,
                 seen: Tensor | None, vocab: int, mode: str = "eager") -> None:
        if mode not in MODES:
            raise SamplingError(f"decode mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and cache.lengths.device.type != "cuda":
            raise SamplingError("CUDA-graph decoding needs the model on a CUDA device")
        self.model, self.cache, self.params, self.u, self.seen, self.vocab = model, cache, params, uniforms, seen, vocab
        self.mode, self.graph, self.out, self.run = mode, None, None, self._step
        device = cache.lengths.device
        self.i = torch.zeros(1, dtype=torch.long, device=device)  # index of the next uniform
        self.tok = torch.zeros(cache.batch, dtype=torch.long, device=device)  # the graph's input buffer
        if mode == "compile":
            self.run = torch.compile(self._step, dynamic=False)

    def _sample(self, logits: Tensor) -> Tensor:
        u = None if self.u is None else self.u.index_select(1, self.i).squeeze(1)
        nxt = sample(logits[:, : self.vocab], self.params, u, self.seen)
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        self.i += 1
        return nxt

    def first(self, logits: Tensor) -> Tensor:
        """The first new token of each row, from the prefill's logits (B, V)."""
        self.cache.static = self.mode != "eager"
        return self._sample(logits)

    def _step(self, tok: Tensor) -> Tensor:
        logits, _ = self.model(tok[:, None], cache=self.cache)  # (B, 1, V)
        return self._sample(logits[:, -1])

    def step(self, tok: Tensor) -> Tensor:
        """Feed tok (B,) and return the next token of each row."""
        if self.mode == "eager":
            return self._step(tok)
        self.cache.check_room(1, host=True)
        if self.mode == "graph":
            self.tok.copy_(tok)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            nxt = self.out
        else:
            nxt = self.run(tok)
        self.cache.advance_host(1)  # the static step moved the device lengths only
        return nxt

    def _capture(self) -> None:
        snap, i0 = self.cache.snapshot(), self.i.clone()
        seen0 = None if self.seen is None else self.seen.clone()

        def restore() -> None:  # warm-up and capture must leave no trace in the state
            self.cache.restore(snap)
            self.i.copy_(i0)
            if seen0 is not None:
                self.seen.copy_(seen0)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: Triton JIT, cuBLAS handles, allocator
            for _ in range(2):
                self._step(self.tok)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step(self.tok)
        restore()


@dataclass
class Stats:
    """Timing of one generation call: time to first token and decode throughput (all rows)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    rows: int = 0
    ttft: float = 0.0  # seconds from the call until every row's first new token is on the host
    total: float = 0.0  # seconds for the whole call

    def record(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        if not self.ttft:
            self.ttft = self.total

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after each row's first, per second of decoding (None for a single step)."""
        dt, n = self.total - self.ttft, self.new_tokens - self.rows
        return n / dt if dt > 0 and n > 0 else None

    def line(self) -> str:
        tps = self.decode_tok_s
        rate = f"{tps:.1f} tok/s decode ({1e3 * self.rows / tps:.2f} ms/step)" if tps else "n/a tok/s decode"
        return (f"--- {self.rows} row(s), {self.prompt_tokens} prompt + {self.new_tokens} new tokens | "
                f"TTFT {1e3 * self.ttft:.1f} ms | {rate} | total {self.total:.2f} s")


@torch.no_grad()
def stream_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                  params: SamplingParams = PLAIN, *, seed: int | None = None,
                  eos_ids: Sequence[int] = (), vocab_limit: int | None = None, prefill_chunk: int | None = None,
                  mode: str | None = None, stop: Callable[[int, int], bool] | None = None,
                  stats: Stats | None = None) -> Iterator[list[int | None]]:
    """Yield once per step, for each row, its new token id, or None once the row has finished.

    prompts: B lists of ids, any lengths that fit the context (checked before any compute). A row
    finishes after an id in eos_ids, when stop(row, id) returns True (called on every new id), or
    after max_new_tokens ids. Row b draws its uniforms from a generator seeded with seed + b (seed
    None: one from torch's global RNG), so it yields what it yields when run alone. vocab_limit:
    ids >= it are never sampled (the model's vocabulary is padded). mode: a `Decoder` mode (None:
    "graph" on CUDA, "eager" elsewhere).
    """
    prompts = fit_prompts(prompts, max_new_tokens, model.cfg.block_size)
    t0 = time.perf_counter()
    device = model.lm_head.weight.device
    B, V = len(prompts), model.cfg.padded_vocab_size
    vocab = min(vocab_limit or V, V)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    uniforms = None if params.greedy else row_uniforms([seed + b for b in range(B)], max_new_tokens, device)
    seen = seen_mask(prompts, vocab, device) if params.repetition_penalty != 1.0 else None
    cache = model.new_cache(B, max(map(len, prompts)) + max_new_tokens)
    dec = Decoder(model, cache, params, uniforms, seen, vocab, mode or ("graph" if device.type == "cuda" else "eager"))
    tok = dec.first(prefill(model, cache, prompts, prefill_chunk))
    eos, done, new = set(eos_ids), [False] * B, 0
    for step in range(max_new_tokens):
        ids = tok.tolist()
        if step == 0 and stats is not None:
            stats.ttft = time.perf_counter() - t0
        out: list[int | None] = []
        for b, i in enumerate(ids):
            if done[b]:
                out.append(None)
                continue
            out.append(i)
            new += 1
            stopped = stop(b, i) if stop is not None else False
            done[b] = i in eos or stopped
        yield out
        if all(done) or step == max_new_tokens - 1:
            break
        tok = dec.step(tok)
    if stats is not None:
        stats.record(prompt_tokens=sum(map(len, prompts)), rows=B, new_tokens=new, total=time.perf_counter() - t0)


def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             vocab_limit: int | None = None, num_beams: int = 1, prefill_chunk: int | None = None,
             mode: str | None = None) -> Tensor:
    """prompt (B, T) ids -> (B, T + n) ids, n <= max_new_tokens (the loop ends once every row is done).

    A row that emitted eos_id is padded with it. num_beams > 1: beam search (deterministic; the
    sampling parameters other than repetition_penalty do not apply), best beam per row.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise SamplingError(f"prompt must be (B, T) ids with T >= 1, got shape {tuple(prompt.shape)}")
    rows, eos = prompt.tolist(), [] if eos_id is None else [eos_id]
    if num_beams > 1:
        hyps = beam_search(model, rows, max_new_tokens, num_beams, eos_ids=eos, vocab_limit=vocab_limit,
                           repetition_penalty=repetition_penalty, prefill_chunk=prefill_chunk)
        new = [h[0].tokens + ([eos_id] if h[0].finish_reason == "eos" else []) for h in hyps]
    else:
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        new = [[] for _ in rows]
        for step in stream_tokens(model, rows, max_new_tokens, params, seed=seed, eos_ids=eos,
                                  vocab_limit=vocab_limit, prefill_chunk=prefill_chunk, mode=mode):
            for b, i in enumerate(step):
                if i is not None:
                    new[b].append(i)
    n = max(map(len, new))
    if any(len(r) < n for r in new) and eos_id is None:
        raise SamplingError("rows finished at different lengths and there is no eos_id to pad them with")
    pad = [r + [eos_id] * (n - len(r)) for r in new]
    return torch.cat([prompt, torch.tensor(pad, dtype=prompt.dtype, device=prompt.device).view(len(rows), n)], 1)


# ----------------------------------------------------------------------------- text


class TextStream:
    """One row's output bytes -> text pieces, cut before the first stop string.

    Holds back an incomplete UTF-8 sequence and any tail that could still grow into a stop string,
    so what has been emitted never needs taking back. Invalid UTF-8 becomes U+FFFD, never an error.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stops = [s.encode() for s in stop if s]
        self.pending, self.stopped = b"", False
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that became final ('' if none)."""
        if self.stopped:
            return ""
        buf = self.pending + data
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, b""
            return self.dec.decode(buf[: min(hits)], final=True)
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - hold:]
        return self.dec.decode(buf[: len(buf) - hold])

    def close(self) -> str:
        """The held-back rest at the end of the output."""
        if self.stopped:
            return ""
        out, self.pending = self.dec.decode(self.pending, final=True), b""
        return out


@dataclass
class Completion:
    """One generated sequence of a text call."""

    prompt: list[int]  # the prompt ids as run (after any truncation)
    tokens: list[int] = field(default_factory=list)  # new ids, without EOS (with the one that completed a stop)
    text: str = ""  # their text, cut before the stop string
    finish_reason: str = "length"  # "eos", "stop" or "length"


def encode_prompts(tok, prompts: str | Sequence[str], max_new_tokens: int, block_size: int,
                   truncate: bool = False) -> list[list[int]]:
    """Ids of each text prompt, as the tokenizer's model expects them (a BOS first if it adds one).

    Special-token strings are plain text; an empty prompt is [BOS] (= end-of-text for our tokenizers).
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [tok.encode(t, bos=tok.add_bos) or [tok.bos_id] for t in texts]
    return fit_prompts(ids, max_new_tokens, block_size, truncate)


def stream_text(model: Transformer, tok, prompts: str | Sequence[str], max_new_tokens: int = 200, *,
                params: SamplingParams = PLAIN, stop: Sequence[str] = (), num_samples: int = 1,
                truncate_prompt: bool = False, seed: int | None = None, prefill_chunk: int | None = None,
                mode: str | None = None, stats: Stats | None = None,
                completions: list[Completion] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as tokens are generated; rows are prompts x num_samples (prompt-major).

    Each row stops at the end-of-text token, at the first of the stop strings, or after
    max_new_tokens; pieces never split a UTF-8 character and never show part of a stop string.
    Row r samples with seed + r. Pass a list as `completions` to get each row's Completion filled in.
    """
    if num_samples < 1:
        raise SamplingError(f"num_samples must be >= 1, got {num_samples}")
    ids = encode_prompts(tok, prompts, max_new_tokens, model.cfg.block_size, truncate_prompt)
    rows = [p for p in ids for _ in range(num_samples)]
    comps = [Completion(prompt=r) for r in rows]
    if completions is not None:
        completions[:] = comps
    streams, pieces = [TextStream(stop) for _ in rows], [""] * len(rows)

    def on_token(b: int, i: int) -> bool:
        if i == tok.eot_id:
            comps[b].finish_reason = "eos"
            return True
        comps[b].tokens.append(i)
        pieces[b] += streams[b].push(tok.decode_bytes([i]))
        if streams[b].stopped:
            comps[b].finish_reason = "stop"
        return streams[b].stopped

    for _ in stream_tokens(model, rows, max_new_tokens, params, seed=seed, eos_ids=[tok.eot_id],
                           vocab_limit=tok.n_vocab, prefill_chunk=prefill_chunk, mode=mode, stop=on_token,
                           stats=stats):
        for b, piece in enumerate(pieces):
            if piece:
                comps[b].text += piece
                pieces[b] = ""
                yield b, piece
    for b, s in enumerate(streams):
        rest = s.close()
        if rest:
            comps[b].text += rest
            yield b, rest


def complete(model: Transformer, tok, prompts: str | Sequence[str], max_new_tokens: int = 200, *,
             params: SamplingParams = PLAIN, stop: Sequence[str] = (), num_samples: int = 1,
             num_beams: int = 1, length_penalty: float = 1.0, truncate_prompt: bool = False,
             seed: int | None = None, prefill_chunk: int | None = None, mode: str | None = None,
             stats: Stats | None = None) -> list[Completion]:
    """The finished rows of `stream_text`, or with num_beams > 1 the num_samples best beams per prompt.

    Beam search is deterministic: of the sampling parameters only the repetition penalty applies.
    """
    if num_beams == 1:
        out: list[Completion] = []
        for _ in stream_text(model, tok, prompts, max_new_tokens, params=params, stop=stop, num_samples=num_samples,
                             truncate_prompt=truncate_prompt, seed=seed, prefill_chunk=prefill_chunk, mode=mode,
                             stats=stats, completions=out):
            pass
        return out
    ids = encode_prompts(tok, prompts, max_new_tokens, model.cfg.block_size, truncate_prompt)
    hyps = beam_search(model, ids, max_new_tokens, num_beams, num_return=num_samples, eos_ids=[tok.eot_id],
                       repetition_penalty=params.repetition_penalty, length_penalty=length_penalty,
                       vocab_limit=tok.n_vocab, stop=[s.encode() for s in stop if s],
                       token_bytes=lambda i: tok.decode_bytes([i]), prefill_chunk=prefill_chunk, stats=stats)
    out = []
    for p, row in zip(ids, hyps):
        for h in row:
            ts = TextStream(stop)
            text = "".join(ts.push(tok.decode_bytes([i])) for i in h.tokens) + ts.close()
            out.append(Completion(prompt=p, tokens=h.tokens, text=text, finish_reason=h.finish_reason))
    return out


# ----------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Generate text from a checkpoint directory (or a training out dir).")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a training --out-dir (uses its latest)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (empty: start from end-of-text); repeat for a batch of prompts")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one more prompt")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per row")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="divide logits of seen tokens (1 = off)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (with beams: best beams shown)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = sampling)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob sum / length^this")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[],
                   help=r"stop a row at this string (repeatable; \n \t \r \\ are understood)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one row)")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep only the last prompt tokens that fit the context instead of refusing")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"prompt tokens per prefill pass; 0 = one pass (default: one pass on CUDA, {CPU_CHUNK} on CPU)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each decode step as one captured CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (static shapes; seconds to minutes to compile once per "
                        "batch and length, then the fastest CPU path)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"), help="override the op backend")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only the generated text (no timing line)")
    return p


def _check_args(args: argparse.Namespace) -> SamplingParams:
    """Sampling parameters from the flags; contradictory flags are refused in one line."""
    if args.num_samples < 1:
        raise SamplingError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_beams < 1:
        raise SamplingError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams > 1:
        given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                ("--top-p", args.top_p), ("--min-p", args.min_p)) if v is not None]
        if given:
            raise SamplingError(f"beam search is deterministic: {', '.join(given)} do not apply with --num-beams > 1")
        if args.num_samples > args.num_beams:
            raise SamplingError(f"--num-samples ({args.num_samples}) shows the best beams: at most --num-beams "
                                f"({args.num_beams})")
        return SamplingParams(0.0, repetition_penalty=args.repetition_penalty)
    temperature = 0.8 if args.temperature is None else args.temperature
    return SamplingParams(temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def main(argv: list[str] | None = None) -> int:
    from llm.checkpoint import load_model
    from llm.trainer import pick_device, pick_dtype

    args = parser().parse_args(argv)
    try:
        params = _check_args(args)
        texts = list(args.prompt or []) + [_read(f) for f in args.prompt_file]
        texts = texts or [""]
        if args.stream and (len(texts) * args.num_samples > 1 or args.num_beams > 1):
            raise SamplingError("--stream prints one sequence: use one prompt, --num-samples 1, --num-beams 1")
        fit_prompts([[0]], args.max_new_tokens, 1 << 62)  # max_new_tokens >= 1, before loading anything
        if args.threads is not None:
            if args.threads < 1:
                raise SamplingError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        model, tok, _ = load_model(args.checkpoint, device, dtype, **overrides)
        ids = encode_prompts(tok, texts, args.max_new_tokens, model.cfg.block_size, args.truncate_prompt)
        if not args.quiet:
            for t, i in zip(texts, ids):
                if len(i) < len(tok.encode(t, bos=tok.add_bos)):
                    print(f"note: prompt truncated to its last {len(i)} tokens to fit the context", file=sys.stderr)
        mode = "compile" if args.compile else "graph" if device.type == "cuda" and args.cuda_graph else "eager"
        stats = Stats()
        kw = dict(params=params, stop=[_unescape(s) for s in args.stop], num_samples=args.num_samples,
                  truncate_prompt=args.truncate_prompt, seed=args.seed, prefill_chunk=args.prefill_chunk, stats=stats)
        if args.stream:
            if not args.quiet:
                print(texts[0], end="", flush=True)
            for _, piece in stream_text(model, tok, texts, args.max_new_tokens, mode=mode, **kw):
                print(piece, end="", flush=True)
            print()
        else:
            comps = complete(model, tok, texts, args.max_new_tokens, num_beams=args.num_beams, mode=mode,
                             length_penalty=args.length_penalty, **kw)
            per_prompt = len(comps) // len(texts)
            for r, c in enumerate(comps):
                if not args.quiet and len(comps) > 1:
                    print(f"--- prompt {r // per_prompt + 1}, sample {r % per_prompt + 1} ({c.finish_reason}) ---")
                print(c.text if args.quiet else texts[r // per_prompt] + c.text)
    except (SamplingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(stats.line(), file=sys.stderr)
    return 0


def _unescape(s: str) -> str:
    r"""'\n' typed in a shell is backslash-n: turn \n \t \r \\ into the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], s)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SamplingError(f"cannot read prompt file {path}: {e.strerror or e}") from None
