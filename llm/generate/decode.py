"""The KV-cached decoding loop: prefill every prompt in one pass, then one token per step for all rows.

  fit_prompts(prompts, n, block_size)      the context check, before any compute
  room_for_new(prompts, block_size)        max_new_tokens when none is given: the room the context leaves
  prefill(model, cache, prompts)           ragged prompts into an empty cache -> last-token logits
  Decoder                                  one decode step: eager, static, compiled or a CUDA graph
  stream_tokens(model, prompts, n)         -> per step, each row's new id; ragged rows; the core loop

Rows of a batch may have different prompt lengths: prompts are right-padded and each row keeps its
own length in the KV cache (positions and attention follow it), so a row equals its unbatched run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from llm.generate.sampling import SamplingError, SamplingParams, row_uniforms, sample, seen_mask
from llm.generate.stats import Stats
from llm.kvcache import KVCache
from llm.model import Transformer

MODES = ("eager", "static", "compile", "graph")
PLAIN = SamplingParams()  # temperature 1, nothing cut
# Prefill chunk off CUDA: the reference attention masks densely, so chunks skip most of the masked
# half of a long prompt's scores (2k prompt, tiny preset, 1 CPU thread: 308 -> 226 ms at batch 1).
CPU_CHUNK = 512
# max_new_tokens when none is given: at most this many, fewer when the context leaves less room.
DEFAULT_NEW_TOKENS = 200


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, block_size: int,
                truncate: bool = False, fix: str = "shorten them or truncate the prompt (--truncate-prompt)"
                ) -> list[list[int]]:
    """Check, before any compute, that each prompt + max_new_tokens fits the context.

    truncate=True keeps the last block_size - max_new_tokens tokens of a prompt that is too long; fix: what the
    error for one that does not fit tells the user to do (the server has no --truncate-prompt).
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
                                    f"exceeds the context length {block_size}; {fix}")
            ids = ids[-room:]
        out.append(list(ids))
    return out


def room_for_new(prompts: list[list[int]], block_size: int, truncate: bool = False,
                 cap: int = DEFAULT_NEW_TOKENS) -> int:
    """The default max_new_tokens: min(cap, block_size - longest prompt), so a default is never invalid.

    A prompt that fills the context is an error naming both numbers, unless truncate (then half the
    context, at most cap, is kept for new tokens and the prompt is cut by fit_prompts).
    """
    if not prompts:
        raise SamplingError("no prompt given")
    longest = max(map(len, prompts))
    room = block_size - longest
    if room >= 1:
        return min(cap, room)
    if truncate:
        return max(1, min(cap, block_size // 2))
    raise SamplingError(f"the prompt ({longest} tokens) leaves no room for new tokens in the context length "
                        f"{block_size}; shorten it, or keep its end with --truncate-prompt")


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


def compiled(fn: Callable, device: torch.device) -> Callable:
    """torch.compile of a decode step: static shapes (one graph per input shape, never a dynamic one); on the CPU
    the graph's wrapper in C++ too (8x512 import: -9% per step, +2 s compile). The server's captured step
    (llm/serve/captured.py) compiles its per-batch-bucket steps through this too."""
    opts = {"cpp_wrapper": True} if device.type == "cpu" else None
    return torch.compile(fn, dynamic=False, options=opts)


def capture(step: Callable[[], Tensor], restore: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """(graph, its output buffer) of a CUDA step that reads and writes only fixed buffers: two warm-up calls on a
    side stream (Triton JIT, cuBLAS handles, the allocator), each followed by restore() (warm-up and capture must
    leave no trace in the state), then the capture, then restore() again. Replaying the graph reruns the step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
            restore()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    restore()
    return graph, out


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
        self.warmup: float | None = None  # seconds of the first compiled / captured step; None until then
        device = cache.lengths.device
        self.i = torch.zeros(1, dtype=torch.long, device=device)  # index of the next uniform
        self.tok = torch.zeros(cache.batch, dtype=torch.long, device=device)  # the graph's input buffer
        if mode == "compile":  # wrapped at the first step, so torch.compile's imports (~1 s) count as compile time
            self.run = None

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
        t0 = time.perf_counter() if self.warmup is None and self.mode != "static" else None
        if self.mode == "graph":
            self.tok.copy_(tok)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            nxt = self.out
        else:
            if self.run is None:
                self.run = compiled(self._step, tok.device)
            nxt = self.run(tok)
        self.cache.advance_host(1)  # the static step moved the device lengths only
        if t0 is not None:  # the first call compiled (or captured) the step: timed apart
            if nxt.is_cuda:
                torch.cuda.synchronize()
            self.warmup = time.perf_counter() - t0
        return nxt

    def _capture(self) -> None:
        snap, i0 = self.cache.snapshot(), self.i.clone()
        seen0 = None if self.seen is None else self.seen.clone()

        def restore() -> None:
            self.cache.restore(snap)
            self.i.copy_(i0)
            if seen0 is not None:
                self.seen.copy_(seen0)

        self.graph, self.out = capture(lambda: self._step(self.tok), restore)


def stream_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                  params: SamplingParams = PLAIN, *, seed: int | None = None,
                  eos_ids: Sequence[int] = (), vocab_limit: int | None = None, prefill_chunk: int | None = None,
                  mode: str | None = None, stop: Callable[[int, int], bool] | None = None,
                  stats: Stats | None = None, training: bool = False) -> Iterator[list[int | None]]:
    """Yield once per step, for each row, its new token id, or None once the row has finished.

    prompts: B lists of ids, any lengths that fit the context (checked before any compute). A row
    finishes after an id in eos_ids, when stop(row, id) returns True (called on every new id), or
    after max_new_tokens ids. Row b draws its uniforms from a generator seeded with seed + b (seed
    None: one from torch's global RNG), so it yields what it yields when run alone. vocab_limit:
    ids >= it are never sampled (the model's vocabulary is padded). mode: a `Decoder` mode (None:
    "graph" on CUDA, "eager" elsewhere). Runs under inference mode (no autograd state on any tensor or view: -3%
    per CPU step at 8x512, -10% tiny) after storing the weights K-major (`decode_layout`). training: a model being
    trained samples (GRPO): no_grad instead, and its weights left as they are (they belong to the optimizer, and
    under FSDP2 the gathered weights must stay normal tensors).
    """
    run = _stream_no_grad if training else _stream_inference
    return run(model, prompts, max_new_tokens, params, seed, eos_ids, vocab_limit, prefill_chunk, mode, stop, stats,
               relayout=not training)


def _stream(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
            seed: int | None, eos_ids: Sequence[int], vocab_limit: int | None, prefill_chunk: int | None,
            mode: str | None, stop: Callable[[int, int], bool] | None, stats: Stats | None,
            relayout: bool) -> Iterator[list[int | None]]:
    """stream_tokens' body (a generator: the grad mode wraps each resumption, see below)."""
    prompts = fit_prompts(prompts, max_new_tokens, model.n_positions)
    t0 = time.perf_counter()
    if relayout:
        model.decode_layout()
    device = model.norm_f.weight.device
    B, V = len(prompts), model.cfg.padded_vocab_size
    vocab = min(vocab_limit or V, V)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    uniforms = None if params.greedy else row_uniforms([seed + b for b in range(B)], max_new_tokens, device)
    seen = seen_mask(prompts, vocab, device) if params.repetition_penalty != 1.0 else None
    cache = model.new_cache(B, max(map(len, prompts)) + max_new_tokens)
    dec = Decoder(model, cache, params, uniforms, seen, vocab, mode or ("graph" if device.type == "cuda" else "eager"))
    tok = dec.first(prefill(model, cache, prompts, prefill_chunk))
    eos, done, new, warm_tokens = set(eos_ids), [False] * B, 0, 0
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
            warm_tokens += step == 1  # the first decode step's tokens (compile / capture time)
            stopped = stop(b, i) if stop is not None else False
            done[b] = i in eos or stopped
        yield out
        if all(done) or step == max_new_tokens - 1:
            break
        tok = dec.step(tok)
    if stats is not None:
        stats.record(prompt_tokens=sum(map(len, prompts)), rows=B, new_tokens=new, total=time.perf_counter() - t0)
        if dec.warmup is not None:  # compile or graph mode
            stats.record(warmup=dec.warmup, warmup_tokens=warm_tokens,
                         warmup_what="compile" if dec.mode == "compile" else "capture")


_stream_inference = torch.inference_mode()(_stream)  # the grad mode is entered around every resumption
_stream_no_grad = torch.no_grad()(_stream)

