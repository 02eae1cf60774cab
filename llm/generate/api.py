"""Generation from Python: ids in, ids out; text in, text (streamed or whole) out.

  generate(model, prompt (B, T), n)        -> (B, T + n) ids; equal-length rows (tests, scripts)
  stream_text(model, tok, prompts, n)      -> (row, text piece) as generated; stop strings, UTF-8 safe
  complete(model, tok, prompts, n)         -> [Completion]; also beam search (llm.generate.beam)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llm.generate.beam import beam_search
from llm.generate.decode import PLAIN, fit_prompts, stream_tokens
from llm.generate.sampling import SamplingError, SamplingParams
from llm.generate.speculative import Speculation, stream_speculative
from llm.generate.stats import Stats
from llm.generate.text import TextStream
from llm.model import Transformer


def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             vocab_limit: int | None = None, num_beams: int = 1, prefill_chunk: int | None = None,
             mode: str | None = None, speculative: Speculation | None = None) -> Tensor:
    """prompt (B, T) ids -> (B, T + n) ids, n <= max_new_tokens (the loop ends once every row is done).

    A row that emitted eos_id is padded with it. num_beams > 1: beam search (deterministic; the
    sampling parameters other than repetition_penalty do not apply), best beam per row. speculative:
    draft with a small model or prompt lookup and verify in one target pass (greedy: the same ids).
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
        for step in _steps(model, rows, max_new_tokens, params, speculative, seed=seed, eos_ids=eos,
                           vocab_limit=vocab_limit, prefill_chunk=prefill_chunk, mode=mode):
            for b, ids in enumerate(step):
                new[b] += ids
    n = max(map(len, new))
    if any(len(r) < n for r in new) and eos_id is None:
        raise SamplingError("rows finished at different lengths and there is no eos_id to pad them with")
    pad = [r + [eos_id] * (n - len(r)) for r in new]
    return torch.cat([prompt, torch.tensor(pad, dtype=prompt.dtype, device=prompt.device).view(len(rows), n)], 1)


def _steps(model: Transformer, rows: list[list[int]], n: int, params: SamplingParams,
           speculative: Speculation | None, *, mode: str | None = None, prefill_chunk: int | None = None,
           **kw) -> Iterator[list[list[int]]]:
    """Per step (plain) or per target pass (speculative), each row's new ids: the one loop the APIs share."""
    if speculative is None:
        for step in stream_tokens(model, rows, n, params, mode=mode, prefill_chunk=prefill_chunk, **kw):
            yield [[] if i is None else [i] for i in step]
        return
    if mode not in (None, "eager"):
        raise SamplingError(f"speculative decoding runs eagerly: decode mode {mode!r} does not apply")
    yield from stream_speculative(model, rows, n, params, speculative, prefill_chunk=prefill_chunk, **kw)


@dataclass
class Completion:
    """One generated sequence of a text call."""

    prompt: list[int]  # the prompt ids as run (after any truncation)
    tokens: list[int] = field(default_factory=list)  # new ids, without EOS (with the one that completed a stop)
    text: str = ""  # their text, cut before the stop string
    finish_reason: str = "length"  # "eos", "stop" or "length"


def encode_prompts(tok, prompts: str | Sequence[str | list[int]], max_new_tokens: int, block_size: int,
                   truncate: bool = False) -> list[list[int]]:
    """Ids of each text prompt, as the tokenizer's model expects them (a BOS first if it adds one).

    Special-token strings are plain text; an empty prompt is [BOS] (= end-of-text for our tokenizers).
    A prompt given as a list of ids is taken as it is (callers with their own encoding rules: lm-eval).
    """
    return fit_prompts(prompt_ids_of(tok, prompts), max_new_tokens, block_size, truncate)


def prompt_ids_of(tok, prompts: str | Sequence[str | list[int]]) -> list[list[int]]:
    """Each prompt's ids as `encode_prompts` runs them, before the context check (text: BOS first if the
    tokenizer adds one, empty text -> [BOS]; a list of ids as it is)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    return [list(t) if not isinstance(t, str) else tok.encode(t, bos=tok.add_bos) or [tok.bos_id] for t in texts]


def stream_text(model: Transformer, tok, prompts: str | Sequence[str | list[int]], max_new_tokens: int = 200, *,
                params: SamplingParams = PLAIN, stop: Sequence[str] = (), num_samples: int = 1,
                truncate_prompt: bool = False, seed: int | None = None, prefill_chunk: int | None = None,
                mode: str | None = None, stats: Stats | None = None,
                completions: list[Completion] | None = None,
                speculative: Speculation | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as tokens are generated; rows are prompts x num_samples (prompt-major).

    Each row stops at the end-of-text token, at the first of the stop strings, or after
    max_new_tokens; pieces never split a UTF-8 character and never show part of a stop string.
    Row r samples with seed + r. Pass a list as `completions` to get each row's Completion filled in.
    speculative: a draft model or prompt lookup proposes, the target verifies (`llm.generate.speculative`).
    """
    if num_samples < 1:
        raise SamplingError(f"num_samples must be >= 1, got {num_samples}")
    ids = encode_prompts(tok, prompts, max_new_tokens, model.n_positions, truncate_prompt)
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

    for _ in _steps(model, rows, max_new_tokens, params, speculative, seed=seed, eos_ids=[tok.eot_id],
                    vocab_limit=tok.n_vocab, prefill_chunk=prefill_chunk, mode=mode, stop=on_token, stats=stats):
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


def complete(model: Transformer, tok, prompts: str | Sequence[str | list[int]], max_new_tokens: int = 200, *,
             params: SamplingParams = PLAIN, stop: Sequence[str] = (), num_samples: int = 1,
             num_beams: int = 1, length_penalty: float = 1.0, truncate_prompt: bool = False,
             seed: int | None = None, prefill_chunk: int | None = None, mode: str | None = None,
             stats: Stats | None = None, speculative: Speculation | None = None) -> list[Completion]:
    """The finished rows of `stream_text`, or with num_beams > 1 the num_samples best beams per prompt.

    Beam search is deterministic: of the sampling parameters only the repetition penalty applies.
    """
    if num_beams == 1:
        out: list[Completion] = []
        for _ in stream_text(model, tok, prompts, max_new_tokens, params=params, stop=stop, num_samples=num_samples,
                             truncate_prompt=truncate_prompt, seed=seed, prefill_chunk=prefill_chunk, mode=mode,
                             stats=stats, completions=out, speculative=speculative):
            pass
        return out
    if speculative is not None:
        raise SamplingError("speculative decoding samples one sequence per row: it does not combine with beam search")
    ids = encode_prompts(tok, prompts, max_new_tokens, model.n_positions, truncate_prompt)
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

