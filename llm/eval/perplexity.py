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

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.config import DataConfig
from llm.data.corpus import open_source, read_text


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
    context = context or model.n_positions
    if context > model.n_positions:
        raise EvalError(f"context {context} exceeds the model's context length {model.n_positions}")
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


SPLITS = ("val", "train", "all")


def dataset_stream(dataset: str, tok, max_tokens: int | None = None, split: str = "val",
                   val_fraction: float = DataConfig.val_fraction, data_dir: str = "data") -> tuple[list[int], int]:
    """([eot] d1 [eot] d2 ... ids, UTF-8 bytes of the documents) of one split of a corpus name or path.

    split "val": the documents the trainer holds out and validates on (the same rule: llm.data.corpus, by
    val_fraction; a one-document corpus, its last val_fraction of tokens); "train": the others; "all": every
    document in order (a text that was not trained on).
    """
    if split not in SPLITS:
        raise EvalError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    src = open_source(DataConfig(dataset=dataset, data_dir=data_dir, val_fraction=val_fraction))
    ids, n_bytes = [], 0
    if src.single is not None and split != "all":  # its tokens are split as llm.data.shards splits them
        text = read_text(src.single)
        doc = tok.encode(text) + [tok.eot_id]
        cut = int(len(doc) * (1 - val_fraction))
        ids = [tok.eot_id] + (doc[cut:-1] if split == "val" else doc[:cut])
        n_bytes = len(tok.decode_bytes([i for i in ids if i != tok.eot_id]))
    else:
        for part, _, text in src.docs():
            if split != "all" and part != split:
                continue
            ids += [tok.eot_id] + tok.encode(text)
            n_bytes += len(text.encode())
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        n_bytes = len(tok.decode_bytes([i for i in ids if i != tok.eot_id]))
    return ids, n_bytes
