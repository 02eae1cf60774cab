"""Documents -> token shards (prepared once, resumable) -> deterministic batches.

`prepare(cfg)` tokenizes a dataset once (each document followed by <|endoftext|>) into

  <data_dir>/<dataset>-<tokenizer>/
    train-00000.bin ...  flat token ids (uint16 if the vocab fits, else uint32), ~SHARD_TOKENS each
    val-00000.bin ...
    tokenizer.tiktoken   the trained BPE (if one was trained)
    manifest.json        token and document counts, dtype, sha256 of every shard, tokenizer, unigram entropy

Work happens in `<dir>.partial/`: progress.json records the tokenizer once it is trained, then every
COMMIT_TOKENS tokens the shards are fsynced and progress.json records their lengths and the documents
consumed, so an interrupted preparation resumes where it stopped and gives the same bytes; the folder is
renamed into place at the end.
Documents are tokenized in chunks on `prep_workers` processes (llm.data.encode), written in document
order: the bytes do not depend on the number of workers. A progress line (MB/s, tokens/s) comes every
few seconds through `log`, and a summary at the end.

`Loader` draws random windows from a split's shards; batch number i depends only on
(seed, rank, i), so a resumed run continues at the same place by knowing its step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm.config import DataConfig
from llm.data.corpus import DataError, Source, open_source, read_text
from llm.data.encode import Encoder, Meter
from llm.tokenizer import Tokenizer

MANIFEST, PROGRESS, MANIFEST_VERSION = "manifest.json", "progress.json", 2
SHARD_TOKENS = 100_000_000  # tokens per shard file (windows never cross shards)
COMMIT_TOKENS = 10_000_000  # tokens between progress records of a preparation
BATCH_DOCS = 512  # documents per tokenizer chunk at most
CHUNK_CHARS = 1 << 20  # characters that close a chunk early (chunks of ~1 MB keep the workers balanced)
TOKENIZER_SAMPLE_CHARS = 100_000_000  # text a BPE is trained on at most (streamed datasets are huge)


# ----------------------------------------------------------------------------- preparation


def tokenizer_slug(tok: Tokenizer) -> str:
    """A short identity of a given tokenizer (its name, or a hash of its saved files)."""
    if tok.info.get("kind") == "tiktoken":
        return tok.info["name"]
    h = hashlib.sha1(json.dumps(tok.info, sort_keys=True, default=str).encode())
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        for f in sorted(Path(d).iterdir()):
            h.update(f.read_bytes())
    return f"tok{h.hexdigest()[:10]}"


def dataset_dir(cfg: DataConfig, tokenizer: Tokenizer | None = None, source: Source | None = None) -> Path:
    slug = (source or open_source(cfg)).slug + (f"-max{cfg.max_tokens}" if cfg.max_tokens else "")
    tok = tokenizer_slug(tokenizer) if tokenizer else cfg.tokenizer or f"bpe{cfg.vocab_size}"
    return Path(cfg.data_dir) / f"{slug}-{tok}"


def prepare(cfg: DataConfig, log: Callable[[str], None] = print, tokenizer: Tokenizer | None = None,
            shard_tokens: int = SHARD_TOKENS) -> Path:
    """Prepare the dataset once (an existing manifest is reused; an interrupted run resumes).

    `tokenizer` encodes with a given tokenizer (e.g. a checkpoint's) instead of a named or trained one.
    """
    src = open_source(cfg)
    out = dataset_dir(cfg, tokenizer, src)
    if (out / MANIFEST).is_file():
        return out
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    prog = json.loads((work / PROGRESS).read_text()) if (work / PROGRESS).is_file() else None
    if prog:
        log(f"resuming the preparation of {cfg.dataset}: {prog['docs']:,} documents already done")
        tok = tokenizer or Tokenizer.load(work, prog["tokenizer"])
    else:
        tok = tokenizer or _make_tokenizer(src, cfg, log)
        prog = {"tokenizer": tok.save(work), "docs": 0, "done": False,
                "splits": {s: {"files": [], "length": 0, "tokens": 0, "docs": 0} for s in ("train", "val")}}
        _record(work, prog)  # a run stopped before its first commit keeps the tokenizer it trained
    dtype = np.dtype(np.uint16 if tok.n_vocab <= 65536 else np.uint32)
    writers = {s: _ShardWriter(work, s, dtype, st, shard_tokens) for s, st in prog["splits"].items()}
    if not prog["done"]:
        log(f"preparing {cfg.dataset} with {prog['tokenizer'].get('name', prog['tokenizer']['kind'])} "
            f"tokens into {work}")
        _encode_all(src, cfg, tok, prog, writers, work, log)
    manifest = _finish(cfg, src, tok, prog, work, dtype)
    try:
        os.replace(work, out)
    except OSError:  # a concurrent preparation finished first
        if not (out / MANIFEST).is_file():
            raise
        shutil.rmtree(work, ignore_errors=True)
        return out
    t = manifest["splits"]
    log(f"wrote {out}: {t['train']['tokens']:,} train / {t['val']['tokens']:,} val tokens in "
        f"{len(t['train']['shards']) + len(t['val']['shards'])} shard(s), unigram entropy "
        f"{manifest['unigram_entropy']:.3f} nats")
    return out


def _make_tokenizer(src: Source, cfg: DataConfig, log) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.named(cfg.tokenizer)

    def sample() -> Iterator[str]:
        n = 0
        for split, _, text in src.docs():
            if split == "train" and n < TOKENIZER_SAMPLE_CHARS:
                n += len(text)
                yield text
            if n >= TOKENIZER_SAMPLE_CHARS:
                return

    log(f"training a {cfg.vocab_size}-token BPE on {cfg.dataset}")
    tok = Tokenizer.train(sample(), cfg.vocab_size)
    if tok.n_vocab <= 257:
        raise DataError(f"dataset {cfg.dataset!r} is empty: it holds no text to train a tokenizer on")
    return tok


class _ShardWriter:
    """Appends token arrays to <split>-NNNNN.bin files; `commit` fsyncs and returns the durable state."""

    def __init__(self, work: Path, split: str, dtype: np.dtype, state: dict, shard_tokens: int) -> None:
        self.work, self.split, self.dtype, self.state, self.shard_tokens = work, split, dtype, state, shard_tokens
        self.pending: list[np.ndarray] = []
        if state["files"]:  # resuming: drop whatever was written after the last commit
            with open(work / state["files"][-1], "r+b") as f:
                f.truncate(state["length"] * dtype.itemsize)

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.state["docs"] += 1

    def pending_tokens(self) -> int:
        return sum(a.size for a in self.pending)

    def commit(self) -> None:
        if not self.pending:
            return
        st = self.state
        new = not st["files"] or st["length"] >= self.shard_tokens
        if new:
            st["files"].append(f"{self.split}-{len(st['files']):05d}.bin")
            st["length"] = 0
        data = np.concatenate(self.pending)
        with open(self.work / st["files"][-1], "wb" if new else "ab") as f:
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        st["length"] += data.size
        st["tokens"] += data.size
        self.pending = []


def _chunks(docs: Iterator[tuple[str, str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    """(splits, texts) of consecutive documents: BATCH_DOCS of them, or fewer holding CHUNK_CHARS characters."""
    splits: list[str] = []
    texts: list[str] = []
    chars = 0
    for split, _, text in docs:
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if len(texts) >= BATCH_DOCS or chars >= CHUNK_CHARS:
            yield splits, texts
            splits, texts, chars = [], [], 0
    if texts:
        yield splits, texts


def _encode_all(src: Source, cfg: DataConfig, tok: Tokenizer, prog: dict, writers: dict, work: Path,
                log: Callable[[str], None]) -> None:
    """Tokenize the documents not yet done into the writers, committing every COMMIT_TOKENS tokens.

    Chunks are tokenized on cfg.prep_workers processes (llm.data.encode) and written in document order;
    prog["docs"] only counts documents whose tokens were committed with it.
    """
    def commit() -> None:
        for w in writers.values():
            w.commit()
        _record(work, prog)

    meter = Meter(log, src.size, prog.get("bytes", 0))
    try:
        workers = _encode_docs(src, cfg, tok, prog, writers, meter, commit)
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process died (killed, or out of memory?); run the same command again "
                        "to resume from the last commit, with fewer --prep-workers if memory is short") from None
    prog["done"] = True
    commit()
    log(meter.summary(workers))


def _encode_docs(src: Source, cfg: DataConfig, tok: Tokenizer, prog: dict, writers: dict, meter: Meter,
                 commit: Callable[[], None]) -> int:
    """The encoding loop of `_encode_all`; returns the number of processes that tokenized."""
    dtype = writers["train"].dtype
    with Encoder(tok, dtype, cfg.prep_workers) as enc:
        if src.single is not None:  # one document: split its tokens
            text = read_text(src.single)
            if not text.strip():
                raise DataError(f"dataset {cfg.dataset!r} is empty: {src.single} holds no text")
            [(_, e)] = enc.map([(None, [text])])
            cut = int(e.ids.size * (1 - cfg.val_fraction))
            writers["train"].add(e.ids[:cut][: cfg.max_tokens])
            writers["val"].add(e.ids[cut:])
            prog["docs"] = 1
            meter.add(e.n_bytes, e.ids.size, 1)
        else:
            cap = cfg.max_tokens or 1 << 62
            for splits, e in enc.map(_chunks(itertools.islice(src.docs(), prog["docs"], None))):
                for split, ids in zip(splits, np.split(e.ids, np.cumsum(e.lengths)[:-1])):
                    writers[split].add(ids)
                prog["docs"] += len(splits)
                prog["bytes"] = prog.get("bytes", 0) + e.n_bytes  # text done: the progress line's share
                meter.add(e.n_bytes, e.ids.size, len(splits))
                if sum(w.pending_tokens() for w in writers.values()) >= COMMIT_TOKENS:
                    commit()
                if writers["train"].state["tokens"] + writers["train"].pending_tokens() >= cap:
                    break
        return enc.used


def _record(work: Path, prog: dict) -> None:
    """Write progress.json atomically (after the shards it describes are fsynced)."""
    tmp = work / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(prog))
    os.replace(tmp, work / PROGRESS)


def _finish(cfg: DataConfig, src: Source, tok: Tokenizer, prog: dict, work: Path, dtype: np.dtype) -> dict:
    """Checksums, counts and unigram entropy of the written shards -> manifest.json."""
    splits, counts = {}, np.zeros(tok.n_vocab, dtype=np.int64)
    for split, st in prog["splits"].items():
        if st["tokens"] == 0 and split == "train":
            raise DataError(f"dataset {cfg.dataset!r} is empty: it holds no text")
        if st["tokens"] == 0:
            raise DataError(f"dataset {cfg.dataset!r} has no validation documents: raise --val-fraction "
                            f"(now {cfg.val_fraction}) or add documents")
        shards = []
        for name in st["files"]:
            arr = np.fromfile(work / name, dtype=dtype)
            shards.append({"file": name, "tokens": int(arr.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
            if split == "train":
                counts += np.bincount(arr, minlength=tok.n_vocab)[: tok.n_vocab]
        splits[split] = {"tokens": st["tokens"], "documents": st["docs"], "shards": shards}
    p = counts[counts > 0] / counts.sum()
    manifest = {"version": MANIFEST_VERSION, "dataset": cfg.dataset, "source": src.slug, "documents": prog["docs"],
                "n_vocab": tok.n_vocab, "dtype": dtype.name, "tokenizer": prog["tokenizer"], "splits": splits,
                "unigram_entropy": float(-(p * np.log(p)).sum())}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (work / PROGRESS).unlink()
    return manifest


def load_manifest(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise DataError(f"{path} is not a prepared dataset (no {MANIFEST})")
    return json.loads(f.read_text())


def shard_list(manifest: dict, split: str) -> list[dict]:
    """[{"file", "tokens", "sha256"}] of a split (manifests before version 2 had one <split>.bin)."""
    info = manifest["splits"][split]
    return info.get("shards") or [{"file": f"{split}.bin", "tokens": info["tokens"], "sha256": info.get("sha256")}]


def fingerprint(manifest: dict) -> str:
    """A short hash of the prepared data (every shard's checksum): the identity a resume checks."""
    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()[:16]


def verify(path: Path) -> None:
    """Recompute every shard's sha256 and compare with the manifest; DataError on a mismatch."""
    m = load_manifest(path)
    for split in m["splits"]:
        for s in shard_list(m, split):
            f = Path(path) / s["file"]
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != s["sha256"]:
                raise DataError(f"{f} is missing or corrupted (sha256 differs from {MANIFEST}); "
                                f"delete {path} to prepare it again")



# ----------------------------------------------------------------------------- loading


@dataclass
class Split:
    """What a batch loader reads: one split of a prepared dataset, for one rank, in batches of
    batch_size x block_size; shared by pretraining's Loader and fine-tuning's SFTLoader."""

    path: Path
    split: str
    batch_size: int
    block_size: int
    seed: int = 0
    rank: int = 0


@dataclass
class Loader(Split):
    """Random (x, y) windows of `block_size` tokens from one split, deterministic per step.

    Window starts are drawn uniformly over every position of every shard that leaves
    block_size + 1 tokens; batch(i) depends only on (seed, rank, i, split).
    """

    def __post_init__(self) -> None:
        manifest = load_manifest(self.path)
        dtype = np.dtype(manifest["dtype"])
        self.shards: list[np.memmap] = []
        for s in shard_list(manifest, self.split):
            f = Path(self.path) / s["file"]
            size = f.stat().st_size if f.is_file() else -1
            if size != s["tokens"] * dtype.itemsize:
                raise DataError(f"{f} is missing or truncated ({max(size, 0)} bytes, the manifest says "
                                f"{s['tokens'] * dtype.itemsize}); delete {self.path} to prepare it again")
            if s["tokens"]:
                self.shards.append(np.memmap(f, dtype=dtype, mode="r"))
        need = self.block_size + 1
        self.counts = np.array([max(0, len(t) - self.block_size) for t in self.shards], dtype=np.int64)
        if not self.counts.sum():
            longest = max((len(t) for t in self.shards), default=0)
            where = " in its largest shard" if len(self.shards) > 1 else ""
            raise DataError(f"the {self.split} split of {self.path} has {longest} tokens{where}, fewer than one "
                            f"window of block_size + 1 = {need}; use a smaller --block-size or more data")
        self.cum = np.cumsum(self.counts)

    def batch(self, step: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (batch_size, block_size) int64: y is x shifted by one token."""
        rng = np.random.default_rng([self.seed, self.rank, step, 0 if self.split == "train" else 1])
        g = rng.integers(0, self.cum[-1], size=self.batch_size)
        shard = np.searchsorted(self.cum, g, side="right")
        starts = g - (self.cum[shard] - self.counts[shard])
        w = np.stack([self.shards[i][s: s + self.block_size + 1].astype(np.int64) for i, s in zip(shard, starts)])
        t = torch.from_numpy(w)
        x, y = t[:, :-1], t[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous().to(device), y.contiguous().to(device)

