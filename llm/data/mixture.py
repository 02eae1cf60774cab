"""Weighted mixtures of pretraining datasets: `--dataset "corpus_a:0.7,corpus_b:0.3"`.

Each source is prepared on its own (llm/data/shards.py, resumable, checksummed); the first one fixes the
tokenizer (a named --tokenizer, or the BPE trained on it) and every other source is tokenized with it. The
mixture is a small directory of its own,

  <data_dir>/mix-<hash>/
    manifest.json   kind "mixture": the sources (dataset, weight, prepared path, fingerprint), the tokenizer,
                    token counts; its "splits" hold every source's fingerprint and weight, so a resume with
                    other weights or other data is refused like any changed dataset
    tokenizer files (when the tokenizer was trained)

`MixtureLoader.batch(i)` draws, for each of the batch_size rows, a source with probability its weight from a
generator seeded by (seed, rank, i, split), then takes the rows from each source's own `Loader.batch(i)`:
batch i depends only on i (an exact resume), and the batch says which source each row came from
(`MixBatch.sources`), which the objective logs as the realised proportions (`mix/<source>` in metrics.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llm.config import DataConfig
from llm.data.corpus import DataError
from llm.data.shards import MANIFEST, MANIFEST_VERSION, Loader, fingerprint, load_manifest, prepare, tokenizer_slug
from llm.tokenizer import Tokenizer


def parse_mixture(spec: str) -> list[tuple[str, float]] | None:
    """[(dataset, weight)] for "a:0.7,b:0.3" (weights normalised to sum 1), None for a plain dataset name.
    A part without a weight, or a weight that is not a positive number, is a DataError naming it."""
    if "," not in spec and not _weighted(spec):
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    out = []
    for part in parts:
        name, sep, w = part.rpartition(":")
        try:
            weight = float(w) if sep and name else math.nan
        except ValueError:
            weight = math.nan
        if math.isnan(weight):
            raise DataError(f"mixture part {part!r} has no weight: write --dataset \"name:weight,name:weight\"")
        if not (weight > 0 and math.isfinite(weight)):
            raise DataError(f"mixture weight of {name!r} must be a positive number, got {w}")
        out.append((name, weight))
    if len({n for n, _ in out}) != len(out):
        raise DataError(f"mixture {spec!r} names a dataset twice")
    total = sum(w for _, w in out)
    return [(n, w / total) for n, w in out]


def _weighted(spec: str) -> bool:
    name, sep, w = spec.rpartition(":")
    try:
        float(w)
    except ValueError:
        return False
    return bool(sep and name)


def prepare_mixture(cfg: DataConfig, log: Callable[[str], None] = print, tokenizer: Tokenizer | None = None) -> Path:
    """Prepare every source of cfg.dataset (a mixture spec) with one tokenizer; returns the mixture directory."""
    parts = parse_mixture(cfg.dataset)
    paths: list[Path] = []
    tok = tokenizer
    for name, _ in parts:
        path = prepare(replace(cfg, dataset=name), log, tokenizer=tok)
        if tok is None:
            tok = Tokenizer.load(path, load_manifest(path)["tokenizer"])
        paths.append(path)
    manifests = [load_manifest(p) for p in paths]
    first = manifests[0]
    ident = tokenizer_slug(tok)
    for (name, _), p, m in zip(parts[1:], paths[1:], manifests[1:]):
        if m["n_vocab"] != first["n_vocab"] or tokenizer_slug(Tokenizer.load(p, m["tokenizer"])) != ident:
            raise DataError(f"mixture sources {parts[0][0]!r} and {name!r} were tokenized differently "
                            f"({first['tokenizer'].get('name', first['tokenizer']['kind'])} vs "
                            f"{m['tokenizer'].get('name', m['tokenizer']['kind'])}); prepare them with one --tokenizer")
    sources = [{"dataset": n, "weight": w, "path": str(p.resolve()), "fingerprint": fingerprint(m)}
               for (n, w), p, m in zip(parts, paths, manifests)]
    key = json.dumps([(s["dataset"], s["weight"], s["fingerprint"]) for s in sources])
    out = Path(cfg.data_dir) / f"mix-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / MANIFEST).is_file():
        return out
    work = out.with_name(out.name + f".partial{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info = tok.save(work)
    splits = {s: {"tokens": sum(m["splits"][s]["tokens"] for m in manifests),
                  "documents": sum(m["splits"][s]["documents"] for m in manifests),
                  "sources": [[x["dataset"], x["weight"], x["fingerprint"]] for x in sources]}
              for s in ("train", "val")}
    manifest = {"version": MANIFEST_VERSION, "kind": "mixture", "dataset": cfg.dataset, "sources": sources,
                "n_vocab": first["n_vocab"], "dtype": first["dtype"], "tokenizer": info, "splits": splits,
                "unigram_entropy": sum(x["weight"] * m["unigram_entropy"] for x, m in zip(sources, manifests))}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    try:
        os.replace(work, out)
    except OSError:  # another process wrote it first
        shutil.rmtree(work, ignore_errors=True)
    log(f"mixture {cfg.dataset}: " + ", ".join(f"{s['dataset']} {s['weight']:.3f}" for s in sources) + f" -> {out}")
    return out


class MixBatch(tuple):
    """(x, y) of a mixture, plus `sources` (batch_size,) int: the source index of every row, and `names`."""

    sources: np.ndarray
    names: list[str]


class MixtureLoader:
    """Rows drawn from the sources of a prepared mixture by weight, deterministically per step (see module doc)."""

    def __init__(self, path: Path, split: str, batch_size: int, block_size: int, seed: int = 0,
                 rank: int = 0) -> None:
        m = load_manifest(path)
        self.split, self.batch_size, self.seed, self.rank = split, batch_size, seed, rank
        self.names = [s["dataset"] for s in m["sources"]]
        self.weights = np.array([s["weight"] for s in m["sources"]], dtype=np.float64)
        self.loaders = [Loader(Path(s["path"]), split, batch_size, block_size, seed, rank) for s in m["sources"]]

    def batch(self, step: int, device: str | torch.device = "cpu") -> MixBatch:
        rng = np.random.default_rng([self.seed, self.rank, step, 2 if self.split == "train" else 3])
        src = rng.choice(len(self.loaders), size=self.batch_size, p=self.weights / self.weights.sum())
        x = torch.empty((self.batch_size, self.loaders[0].block_size), dtype=torch.int64)
        y = torch.empty_like(x)
        for s, loader in enumerate(self.loaders):
            rows = np.flatnonzero(src == s)
            if rows.size:
                xs, ys = loader.batch(step)  # the source's own batch i: its first rows fill this source's slots
                x[rows], y[rows] = xs[: rows.size], ys[: rows.size]
        out = MixBatch((x.to(device), y.to(device)))
        out.sources, out.names = src, self.names
        return out


def mixture_metrics(batch, device: torch.device | str) -> dict[str, torch.Tensor]:
    """{"mix/<source>": fraction of the batch's rows from it} for a MixBatch, {} for any other batch."""
    if not isinstance(batch, MixBatch):
        return {}
    counts = np.bincount(batch.sources, minlength=len(batch.names)) / len(batch.sources)
    return {f"mix/{n}": torch.tensor(float(c), device=device) for n, c in zip(batch.names, counts)}
