"""Perplexity of a checkpoint over a dataset: `python -m llm.eval --checkpoint DIR --dataset NAME|PATH`.

The dataset's documents (`llm.data`: a registered corpus name, or a text file / folder) are encoded
with the checkpoint's tokenizer into one stream, each document after an end-of-text token as in
training: [eot] d1 [eot] d2 ... . Windows of up to `context` tokens (default: the model's context)
start every `stride` tokens (default: context, i.e. disjoint windows); each window scores only the
targets no earlier window scored, so every token after the first is predicted exactly once, with
at least context - stride tokens of context once the first window is past.

  loss = sum_i -log p(x_i | window before x_i) / N   (nats per token)
  perplexity = exp(loss);  bits per byte = sum_i -log2 p(...) / UTF-8 bytes of the documents
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llm.data import corpus_files, read_text


class EvalError(ValueError):
    """Bad evaluation settings; the message is one line."""


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood, nats per token
    perplexity: float  # exp(loss)
    tokens: int  # targets scored
    windows: int
    context: int
    stride: int
    bits_per_byte: float | None = None  # when the byte count of the text is known


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over a stream of n tokens.

    Inputs are ids[begin:end], targets ids[begin + 1:end + 1]; the targets before relative index
    `first` were scored by an earlier window and serve as context only.
    """
    if context < 1 or not 1 <= stride <= context:
        raise EvalError(f"need 1 <= stride <= context, got stride {stride} and context {context}")
    out, begin, done = [], 0, 0  # done: stream positions 1..done are scored
    while done < n - 1:
        end = min(begin + context, n - 1)
        out.append((begin, end, done - begin))
        done, begin = end, begin + stride
    return out


def check_windows(model, context: int | None, stride: int | None) -> tuple[int, int]:
    """(context, stride) with their defaults, or EvalError: before any data is read."""
    context = context or model.cfg.block_size
    if context > model.cfg.block_size:
        raise EvalError(f"context {context} exceeds the model's context length {model.cfg.block_size}")
    stride = stride or context
    windows(2, context, stride)  # checks 1 <= stride <= context
    return context, stride


@torch.no_grad()
def evaluate(model, ids: list[int], context: int | None = None, stride: int | None = None,
             batch_size: int = 1, n_bytes: int | None = None, progress: bool = False) -> EvalResult:
    """Loss and perplexity of `model` on the token stream `ids` (see the module docstring)."""
    context, stride = check_windows(model, context, stride)
    if len(ids) < 2:
        raise EvalError(f"the dataset has {len(ids)} token(s); at least 2 are needed to score one")
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    wins = windows(len(ids), context, stride)
    device = model.lm_head.weight.device
    stream = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:  # windows of one length batch together (all but the last are full)
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch", file=sys.stderr)
    for batch in batches:
        x = torch.stack([stream[b:e] for b, e, _ in batch]).to(device)
        y = torch.stack([stream[b + 1:e + 1] for b, e, _ in batch])
        for r, (_, _, first) in enumerate(batch):
            y[r, :first] = -100  # scored by an earlier window
        y = y.to(device)
        logits, _ = model(x)  # (B, T, V) fp32
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    loss = total / count
    bpb = total / math.log(2) / n_bytes if n_bytes else None
    return EvalResult(loss, math.exp(loss), count, len(wins), context, stride, bpb)


def dataset_stream(dataset: str, tok, max_tokens: int | None = None) -> tuple[list[int], int]:
    """([eot] d1 [eot] d2 ... ids, UTF-8 bytes of the documents) for a corpus name or path."""
    _, files = corpus_files(dataset)
    ids, n_bytes = [], 0
    for f in files:
        text = read_text(f)
        if not text.strip():
            continue
        ids += [tok.eot_id] + tok.encode(text)
        n_bytes += len(text.encode())
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        n_bytes = len(tok.decode_bytes([i for i in ids if i != tok.eot_id]))
    return ids, n_bytes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Loss and perplexity of a checkpoint over a dataset.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, a training --out-dir, or a HF model dir")
    p.add_argument("--dataset", required=True, help="corpus name (pystdlib) or a text file / folder")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the stream")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"), help="override the op backend")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    from llm.checkpoint import load_model
    from llm.trainer import pick_device, pick_dtype

    args = parser().parse_args(argv)
    try:
        if args.max_tokens is not None and args.max_tokens < 2:
            raise EvalError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        model, tok, _ = load_model(args.checkpoint, device, dtype, **overrides)
        check_windows(model, args.context, args.stride)
        ids, n_bytes = dataset_stream(args.dataset, tok, args.max_tokens)
        res = evaluate(model, ids, args.context, args.stride, args.batch_size, n_bytes,
                       progress=not args.json and sys.stderr.isatty())
    except (ValueError, OSError) as e:  # the project's error classes are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": args.dataset, **asdict(res)}))
    else:
        bpb = f" | {res.bits_per_byte:.4f} bits/byte" if res.bits_per_byte is not None else ""
        print(f"{args.dataset}: {res.tokens:,} tokens in {res.windows} window(s) (context {res.context}, "
              f"stride {res.stride}) | loss {res.loss:.4f} nats/token | perplexity {res.perplexity:.3f}{bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
