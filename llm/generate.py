"""KV-cached generation: prefill the prompt once, then one token per step.

`generate` returns token ids; `stream` yields them as they are sampled; `main` is the
command line of sample.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from llm.model import Transformer


class SamplingError(ValueError):
    """Bad sampling parameters or prompt; the message is one line."""


def check_params(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise SamplingError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from logits (B, V): greedy at temperature 0, else temperature -> top-k -> top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: Transformer, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
           vocab_limit: int | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), max_new_tokens times or until every row hit eos_id.

    prompt (B, T) ids. Rows that have produced eos_id keep yielding eos_id.
    """
    check_params(temperature, top_k, top_p)
    B, T = prompt.shape
    total = T + max_new_tokens
    if total > model.cfg.block_size:
        raise SamplingError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                            f"context length {model.cfg.block_size}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = model.new_cache(B, total)
    logits, _ = model(prompt, cache=cache)  # prefill: (B, T, V)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        last = logits[:, -1]
        if vocab_limit is not None:
            last = last[:, :vocab_limit]
        nxt = sample_next(last, temperature, top_k, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        yield nxt
        if eos_id is not None and bool(done.all()):
            return
        logits, _ = model(nxt[:, None], cache=cache)


def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, **kw) -> Tensor:
    """prompt (B, T) -> (B, T + n) ids; see `stream` for the keyword arguments."""
    out = [prompt] + [t[:, None] for t in stream(model, prompt, max_new_tokens, **kw)]
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Generate text from a checkpoint directory (or a training out dir).")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a training --out-dir (uses its latest)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (one batch)")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep only the last prompt tokens that fit the context instead of refusing")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"), help="override the op backend")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    return p


def main(argv: list[str] | None = None) -> int:
    from llm.checkpoint import CheckpointError, load_model
    from llm.tokenizer import TokenizerError
    from llm.trainer import pick_device, pick_dtype

    args = parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise SamplingError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.num_samples < 1:
            raise SamplingError(f"--num-samples must be >= 1, got {args.num_samples}")
        check_params(args.temperature, args.top_k, args.top_p)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        model, tok, _ = load_model(args.checkpoint, device, dtype, **overrides)
        ids = tok.encode(args.prompt) or [tok.eot_id]
        room = model.cfg.block_size - args.max_new_tokens
        if len(ids) > room:
            if not args.truncate_prompt or room < 1:
                raise SamplingError(f"prompt ({len(ids)} tokens) + max_new_tokens ({args.max_new_tokens}) exceeds "
                                    f"the context length {model.cfg.block_size}; shorten them or pass "
                                    "--truncate-prompt")
            ids = ids[-room:]
        prompt = torch.tensor([ids] * args.num_samples, device=device)
        t0 = time.perf_counter()
        out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, eos_id=tok.eot_id, vocab_limit=tok.n_vocab)
        dt = time.perf_counter() - t0
    except (CheckpointError, TokenizerError, SamplingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(out.tolist()):
        new = row[len(ids):]
        if tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        text = tok.decode(new)
        if args.quiet:
            print(text)
        else:
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(args.prompt + text)
    if not args.quiet:
        n = out.shape[0] * (out.shape[1] - len(ids))
        print(f"--- {n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s)", file=sys.stderr)
    return 0
