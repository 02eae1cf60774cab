"""Corpora -> token shards -> deterministic batches.

`prepare(cfg)` reads a corpus (the embedded default or local text files), trains or
loads the tokenizer, encodes every document (each followed by <|endoftext|>), splits
documents into train/val by a hash of their name, and writes, once:

  <data_dir>/<corpus>-<tokenizer>/
    train.bin, val.bin   flat token ids (uint16 if the vocab fits, else uint32)
    tokenizer.tiktoken   the trained BPE (if one was trained)
    manifest.json        counts, dtype, sha256 of each shard, tokenizer info, unigram entropy

`Loader` draws random windows from a shard; batch number i depends only on (seed,
rank, i), so a resumed run continues at the same place by knowing its step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm.config import DataConfig
from llm.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex", ".c", ".h", ""}


class DataError(ValueError):
    """The dataset cannot be found or used; the message is one line."""


# ----------------------------------------------------------------------------- corpora


def pystdlib_files() -> list[Path]:
    """The top-level modules of the running Python's standard library (~4.7 MB, on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise DataError(f"no Python standard-library sources found under {root}")
    return files


CORPORA = {"pystdlib": pystdlib_files}


def corpus_files(dataset: str) -> tuple[str, list[Path]]:
    """(slug, files) for a registered corpus name or a local file / folder path."""
    if dataset in CORPORA:
        return dataset, CORPORA[dataset]()
    p = Path(dataset).expanduser()
    if not p.exists():
        raise DataError(f"dataset {dataset!r} is neither a known corpus ({', '.join(CORPORA)}) nor an existing path")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"dataset folder {p} holds no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))})")
    else:
        files = [p]
    digest = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', p.name)[:40]}-{digest}", files


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} is not a text file (it contains NUL bytes)")
    return raw.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- preparation


def dataset_dir(cfg: DataConfig) -> Path:
    slug, _ = corpus_files(cfg.dataset)
    tok = cfg.tokenizer or f"bpe{cfg.vocab_size}"
    return Path(cfg.data_dir) / f"{slug}-{tok}"


def prepare(cfg: DataConfig, log=print) -> Path:
    """Prepare the dataset once (idempotent: an existing complete manifest is reused)."""
    out = dataset_dir(cfg)
    if (out / "manifest.json").is_file():
        return out
    _, files = corpus_files(cfg.dataset)
    docs = [(str(f), read_text(f)) for f in files]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise DataError(f"dataset {cfg.dataset!r} is empty: its {len(files)} file(s) hold no text")
    val_names = {n for n, _ in docs if _in_val(n, cfg.val_fraction)}
    if len(docs) > 1 and not val_names:  # always hold out at least one document
        val_names = {docs[-1][0]}
    log(f"preparing {cfg.dataset}: {len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f}M characters")
    if cfg.tokenizer:
        tok = Tokenizer.named(cfg.tokenizer)
    else:
        tok = Tokenizer.train((t for n, t in docs if n not in val_names), cfg.vocab_size)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok_info = tok.save(tmp)
    dtype = np.uint16 if tok.n_vocab <= 65536 else np.uint32
    manifest = {"dataset": cfg.dataset, "documents": len(docs), "n_vocab": tok.n_vocab, "dtype": np.dtype(dtype).name,
                "tokenizer": tok_info, "splits": {}}
    for split in ("train", "val"):
        texts = [t for n, t in docs if (n in val_names) == (split == "val")]
        ids = tok.encode_batch(texts)
        flat = np.fromiter((i for doc in ids for i in (*doc, tok.eot_id)), dtype=dtype)
        if len(docs) == 1:  # one document: split its tokens instead
            all_ids = np.array(tok.encode_batch([docs[0][1]])[0] + [tok.eot_id], dtype=dtype)
            cut = int(len(all_ids) * (1 - cfg.val_fraction))
            flat = all_ids[:cut] if split == "train" else all_ids[cut:]
        flat.tofile(tmp / f"{split}.bin")
        manifest["splits"][split] = {"tokens": int(flat.size), "documents": len(texts) or 1,
                                     "sha256": hashlib.sha256(flat.tobytes()).hexdigest()}
        if split == "train":
            manifest["unigram_entropy"] = unigram_entropy(flat, tok.n_vocab)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():  # a concurrent preparation finished first
        import shutil

        shutil.rmtree(tmp)
        return out
    os.replace(tmp, out)
    log(f"wrote {out}: {manifest['splits']['train']['tokens']:,} train / {manifest['splits']['val']['tokens']:,} "
        f"val tokens, unigram entropy {manifest['unigram_entropy']:.3f} nats")
    return out


def _in_val(name: str, fraction: float) -> bool:
    h = int(hashlib.sha1(Path(name).name.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def unigram_entropy(ids: np.ndarray, n_vocab: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    counts = np.bincount(ids, minlength=n_vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def load_manifest(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


# ----------------------------------------------------------------------------- loading


@dataclass
class Loader:
    """Random (x, y) windows of `block_size` tokens from one split, deterministic per step."""

    path: Path
    split: str
    batch_size: int
    block_size: int
    seed: int = 0
    rank: int = 0

    def __post_init__(self) -> None:
        manifest = load_manifest(self.path)
        self.tokens = np.memmap(Path(self.path) / f"{self.split}.bin", dtype=manifest["dtype"], mode="r")
        need = self.block_size + 1
        if len(self.tokens) < need:
            raise DataError(f"the {self.split} split of {self.path} has {len(self.tokens)} tokens, fewer than "
                            f"one window of block_size + 1 = {need}; use a smaller --block-size or more data")

    def batch(self, step: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, step, 0 if self.split == "train" else 1])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        w = np.stack([self.tokens[s: s + self.block_size + 1].astype(np.int64) for s in starts])
        t = torch.from_numpy(w)
        x, y = t[:, :-1], t[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous().to(device), y.contiguous().to(device)

    def num_windows(self) -> float:
        return len(self.tokens) / self.block_size
