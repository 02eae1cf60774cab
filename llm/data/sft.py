"""Fine-tuning data: instruction or chat examples -> one token row per example with the prompt masked.

Inputs (`--dataset`):
  stdlib-qa   embedded: "What does json.dumps do?" -> the summary line of its docstring, for every public
              function and class of the running Python's standard library (parsed with `ast`, nothing
              imported), a held-out split by a hash of the name; needs no download
  FILE.jsonl  one example per line: {"instruction", "input"?, "output", "system"?} or
              {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
A bad line is one DataError naming the file and line, before any training.

Each example is rendered with the tokenizer's chat template (llm/chat.py) and only the answer tokens are
scored (targets -100 elsewhere; --score-prompt scores all), each turn closed by its end-of-turn token. An
example longer than block_size + 1 tokens is dropped (--sft-overlong drop, the default: a cut answer would
teach the model not to end its turn) or cut; the counts are printed and kept in the manifest. Examples are
not packed: one per row, rows padded to the longest in the batch, so attention stays inside each example
with the plain causal kernel and no padding is computed beyond the batch's longest row.

Prepared like pretraining data (llm/data/shards.py: a work dir renamed into place, manifest.json with
counts, a sha256 per file and the tokenizer, the same fingerprint a resume checks):
  <data_dir>/<dataset>-sft-T<block>-<tokenizer>/{train,val}.{ids,mask,offsets}.bin, manifest.json
`SFTLoader.batch(i)` depends only on (seed, rank, i, split), like `Loader`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm.chat import ROLES, ChatError, encode_chat
from llm.config import DataConfig
from llm.data.corpus import DataError, _in_val, pystdlib_files
from llm.data.mixture import MixtureLoader
from llm.data.shards import MANIFEST, Loader, Split, load_manifest, tokenizer_slug
from llm.tokenizer import Tokenizer

EMBEDDED = "stdlib-qa"
SKIP_MODULES = {"this", "antigravity"}
IGNORE = -100


def is_sft(cfg: DataConfig) -> bool:
    """Whether --dataset is fine-tuning data: the embedded set, or a .jsonl whose first line has messages or an
    instruction (a pretraining .jsonl has a text field)."""
    if cfg.dataset == EMBEDDED:
        return True
    obj = first_record(cfg.dataset)
    return isinstance(obj, dict) and ("messages" in obj or "instruction" in obj)


def first_record(dataset: str) -> object | None:
    """The first JSON value of a .jsonl file (what kind of data it holds), None for anything else."""
    p = Path(dataset)
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return None
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


# ----------------------------------------------------------------------------- examples


def stdlib_qa() -> Iterator[tuple[str, list[dict]]]:
    """(name, conversation) for every public module-level function and class of the standard library that has
    a one-line docstring summary, in a fixed order."""
    for f in pystdlib_files():
        mod = f.stem
        if mod.startswith("_") or mod in SKIP_MODULES:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip() if doc else ""
            summary = " ".join(summary.split())
            if not 10 <= len(summary) <= 160:
                continue
            name = f"{mod}.{node.name}"
            q = f"What does {name} do?" if isinstance(node, ast.FunctionDef) else f"What is {name}?"
            yield name, [{"role": "user", "content": q}, {"role": "assistant", "content": summary}]


def jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """("path:line", parsed JSON value) per non-blank line; a DataError naming path:line for a line that is not
    JSON. The one reader of fine-tuning and preference .jsonl files (each checks its records' shape)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where} is not valid JSON (.jsonl holds one JSON object per line)") from None
            yield where, obj


def read_jsonl(path: Path) -> Iterator[tuple[str, list[dict]]]:
    """(name "path:line", conversation) per line; a DataError naming path:line for anything malformed."""
    for where, obj in jsonl_records(path):
        yield where, to_messages(obj, where)


def to_messages(obj, where: str) -> list[dict]:
    """An instruction or chat record as checked messages [{role, content}]."""
    if not isinstance(obj, dict) or not ("messages" in obj or "instruction" in obj):
        raise DataError(f"{where}: expected an object with \"messages\" (chat) or \"instruction\" and \"output\" "
                        "(instruction) fields")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
    else:
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: field {key!r} is missing or not a string")
        for key in ("input", "system"):
            if not isinstance(obj.get(key, ""), str):
                raise DataError(f"{where}: field {key!r} must be a string")
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    check_messages(msgs, where)
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def check_messages(msgs: list, where: str) -> None:
    """Roles: an optional system turn, then user and assistant alternating, ending with an assistant answer;
    contents are strings and no answer is empty."""
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be an object with string \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {j} has role {m['role']!r}; roles are {', '.join(ROLES)}")
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise DataError(f"{where}: roles out of order: message {j + len(msgs) - len(turns)} is {m['role']!r} "
                            f"where {want!r} is due (optional system, then user / assistant alternating)")
        if want == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: empty answer (assistant message {j + len(msgs) - len(turns)})")
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant answer")


def examples(cfg: DataConfig) -> Iterator[tuple[str, str, list[dict]]]:
    """(split, name, messages) of the dataset; val by a hash of the name (at least one held out)."""
    rows = list(stdlib_qa() if cfg.dataset == EMBEDDED else read_jsonl(Path(cfg.dataset)))
    if not rows:
        raise DataError(f"dataset {cfg.dataset!r} holds no examples")
    val = {n for n, _ in rows if _in_val(n, cfg.val_fraction)} or {rows[-1][0]}
    for name, msgs in rows:
        yield ("val" if name in val else "train"), name, msgs


# ----------------------------------------------------------------------------- preparation


def dataset_dir(cfg: DataConfig, tok: Tokenizer, block_size: int) -> Path:
    src = cfg.dataset if cfg.dataset == EMBEDDED else \
        f"{Path(cfg.dataset).stem[:40]}-{hashlib.sha1(str(Path(cfg.dataset).resolve()).encode()).hexdigest()[:8]}"
    flags = ("-all" if cfg.score_prompt else "") + ("-cut" if cfg.sft_overlong == "truncate" else "")
    return Path(cfg.data_dir) / f"{src}-sft-T{block_size}{flags}-{tokenizer_slug(tok)}"


def work_dir(out: Path) -> Path:
    """An empty, process-private folder beside `out` to prepare it in (renamed into place by `publish`)."""
    work = out.with_name(out.name + f".partial{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def publish(work: Path, out: Path, manifest: dict) -> None:
    """Write the manifest last, then rename `work` to `out` in one step: a reader sees all of it or nothing."""
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    try:
        os.replace(work, out)
    except OSError:  # a concurrent preparation finished first
        shutil.rmtree(work, ignore_errors=True)


def prepare(cfg: DataConfig, tok: Tokenizer, block_size: int, log: Callable[[str], None] = print) -> Path:
    """Encode the examples once into <dir>; an existing manifest is reused. Returns <dir>."""
    out = dataset_dir(cfg, tok, block_size)
    if (out / MANIFEST).is_file():
        return out
    work = work_dir(out)
    dtype = np.dtype(np.uint16 if tok.n_vocab <= 65536 else np.uint32)
    rows: dict[str, list] = {"train": [], "val": []}
    stats = {s: {"examples": 0, "tokens": 0, "scored": 0, "truncated": 0, "dropped": 0} for s in rows}
    for split, name, msgs in examples(cfg):
        try:
            ids, scored = encode_chat(tok, msgs, cfg.score_prompt)
        except ChatError as e:
            raise DataError(f"{name}: {e}") from None
        st = stats[split]
        if len(ids) > block_size + 1:
            if cfg.sft_overlong == "drop":
                st["dropped"] += 1
                continue
            ids, scored = ids[: block_size + 1], scored[: block_size + 1]
            st["truncated"] += 1
        if not any(scored[1:]):  # nothing left to learn (the answer was cut away)
            st["dropped"] += 1
            continue
        rows[split].append((ids, scored))
        st["examples"] += 1
        st["tokens"] += len(ids)
        st["scored"] += sum(scored[1:])
    splits = {s: stats[s] | {"shards": _write_split(work, s, r, dtype)} for s, r in rows.items()}
    for s, st in stats.items():
        if not st["examples"]:
            raise DataError(f"dataset {cfg.dataset!r}: no {s} example fits block_size + 1 = {block_size + 1} tokens "
                            f"({st['dropped']} dropped)")
    manifest = {"version": 2, "kind": "sft", "dataset": cfg.dataset, "n_vocab": tok.n_vocab, "dtype": dtype.name,
                "block_size": block_size, "tokenizer": tok.save(work), "splits": splits}
    publish(work, out, manifest)
    for s, st in stats.items():
        log(f"{s}: {st['examples']:,} examples, {st['tokens']:,} tokens ({st['scored']:,} scored); over "
            f"block_size + 1 = {block_size + 1} tokens: {st['truncated']} truncated, {st['dropped']} dropped")
    return out


def _write_split(work: Path, split: str, rows: list, dtype: np.dtype) -> list[dict]:
    ids = np.array([i for r, _ in rows for i in r], dtype=dtype)
    mask = np.array([m for _, r in rows for m in r], dtype=np.uint8)
    offsets = np.cumsum([0] + [len(r) for r, _ in rows]).astype(np.int64)
    shards = []
    for kind, arr in (("ids", ids), ("mask", mask), ("offsets", offsets)):
        name = f"{split}.{kind}.bin"
        arr.tofile(work / name)
        shards.append({"file": name, "tokens": int(arr.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
    return shards


# ----------------------------------------------------------------------------- loading


@dataclass
class SFTLoader(Split):
    """Batches of whole examples from one split: x (B, L) ids, y (B, L) next ids or -100 where not scored, L =
    the longest example in the batch minus one, or block_size for every batch when `fixed` (a compiled model
    then sees one shape: the extra positions are padding after each example, unscored, so the loss is the same).
    batch(i) depends only on (seed, rank, i, split)."""

    fixed: bool = False
    pack: bool = False

    def __post_init__(self) -> None:
        m = load_manifest(self.path)
        if m.get("kind") != "sft":
            raise DataError(f"{self.path} is not prepared fine-tuning data")
        files = {s["file"].split(".")[1]: s for s in m["splits"][self.split]["shards"]}
        dt = {"ids": np.dtype(m["dtype"]), "mask": np.dtype(np.uint8), "offsets": np.dtype(np.int64)}
        arrs = {}
        for kind, s in files.items():
            f = Path(self.path) / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * dt[kind].itemsize:
                raise DataError(f"{f} is missing or truncated; delete {self.path} to prepare it again")
            arrs[kind] = np.fromfile(f, dtype=dt[kind])
        self.ids, self.mask, self.offsets = arrs["ids"], arrs["mask"], arrs["offsets"]
        self.n = len(self.offsets) - 1

    def picks(self, step: int) -> np.ndarray:
        """The example indices of batch `step` (drawn with replacement)."""
        rng = np.random.default_rng([self.seed, self.rank, step, 0 if self.split == "train" else 1])
        return rng.integers(0, self.n, size=self.batch_size)

    def batch(self, step: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        if self.pack:
            return self.packed_batch(step, device)
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in self.picks(step)]
        L = self.block_size if self.fixed else max(b - a for a, b in spans) - 1
        x = torch.zeros(self.batch_size, L, dtype=torch.long)
        y = torch.full((self.batch_size, L), IGNORE, dtype=torch.long)
        for r, (a, b) in enumerate(spans):
            ids = torch.from_numpy(self.ids[a:b].astype(np.int64))
            keep = torch.from_numpy(self.mask[a + 1: b].astype(bool))
            x[r, : b - a - 1] = ids[:-1]
            y[r, : b - a - 1] = torch.where(keep, ids[1:], IGNORE)
        return x.to(device), y.to(device)


    def packed_batch(self, step: int, device: str | torch.device = "cpu") -> PackedBatch:
        """batch_size rows of block_size tokens, each packing whole examples one after another (drawn in order
        from a generator seeded by (seed, rank, step, split); an example that does not fit in what is left of a
        row starts the next row; the last one that fits nowhere is dropped). `segments` (B, block_size) numbers
        the examples of each row (the padding tail is one more segment, unscored), for document-masked attention."""
        T, B = self.block_size, self.batch_size
        rng = np.random.default_rng([self.seed, self.rank, step, 2 if self.split == "train" else 3])
        x = torch.zeros(B, T, dtype=torch.long)
        y = torch.full((B, T), IGNORE, dtype=torch.long)
        seg = torch.zeros(B, T, dtype=torch.long)
        r = fill = n_seg = 0
        while r < B:
            i = int(rng.integers(0, self.n))
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            n = b - a - 1
            if fill + n > T:  # close this row: the rest is padding, its own segment
                seg[r, fill:] = n_seg
                r, fill, n_seg = r + 1, 0, 0
                if r == B or n > T:
                    continue
            ids = torch.from_numpy(self.ids[a:b].astype(np.int64))
            keep = torch.from_numpy(self.mask[a + 1: b].astype(bool))
            x[r, fill: fill + n] = ids[:-1]
            y[r, fill: fill + n] = torch.where(keep, ids[1:], IGNORE)
            seg[r, fill: fill + n] = n_seg
            fill, n_seg = fill + n, n_seg + 1
        out = PackedBatch((x.to(device), y.to(device)))
        out.segments = seg.to(device)
        return out


class PackedBatch(tuple):
    """(x, y) of packed fine-tuning rows, plus `segments` (B, T): the example index of every token in its row."""

    segments: torch.Tensor


def open_loader(path: Path, split: str, batch_size: int, block_size: int, seed: int, fixed: bool = False,
                pack: bool = False):
    """The loader for a prepared dataset: SFTLoader for fine-tuning data (`fixed`: every batch block_size long),
    shards.Loader for pretraining data (always block_size long)."""
    kind = load_manifest(path).get("kind")
    if kind == "sft":
        return SFTLoader(path, split, batch_size, block_size, seed, fixed=fixed, pack=pack)
    if kind == "mixture":
        return MixtureLoader(path, split, batch_size, block_size, seed)
    return Loader(path, split, batch_size, block_size, seed)
