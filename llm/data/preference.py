"""Preference data: (prompt, chosen answer, rejected answer) triples -> paired token rows with answer masks.

Inputs (`--dataset`, with `--objective reward|dpo`):
  stdlib-prefs  embedded, offline: every stdlib-qa question ("What does json.dumps do?") with its docstring
                summary as the chosen answer and another function's summary as the rejected one (the name
                `json.dumps` a fixed stride further down the list), held out by a hash of the name as stdlib-qa is;
                --pref-negatives such pairs per training question (4, each with another wrong answer), 4 per
                held-out one
  FILE.jsonl    one pair per line, the TRL / Anthropic-HH shape:
                {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}
                or {"messages": [...], "chosen": ..., "rejected": ...}; a string answer is one assistant turn,
                a message list continues the prompt's conversation (it must end with an assistant answer)
A line without the fields, or with a conversation out of order, is one DataError naming the file and line.

Three splits: "val", the held-out pairs (by a hash of the name; the benchmark's test pairs, the same for any
--pref-negatives / --pref-dev-fraction), "dev" (--pref-dev-fraction of the other names by a second hash, 4 pairs
per embedded question: the trainer validates and picks its best checkpoint there, so nothing is selected on the
test pairs), and "train" (the rest).

Both conversations are rendered with the tokenizer's chat template (llm/chat.py) and only the answer tokens
are scored, exactly as SFT data (llm/data/sft.py). A pair where either side is longer than block_size + 1 is
dropped (counted). Prepared once, like SFT data:
  <data_dir>/<dataset>-pref-T<block>-<tokenizer>/{train,val,dev}.{chosen,rejected}.{ids,mask,offsets}.bin + manifest
`PreferenceLoader.batch(i)` gives x, y of shape (2B, L): rows 0..B-1 the chosen conversations, rows B..2B-1
the rejected ones of the same pairs, y = -100 outside the answers (SFT's batch, twice), and depends only on
(seed, rank, i, split).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm.chat import ChatError, encode_chat
from llm.config import DataConfig
from llm.data.corpus import DataError, _in_val
from llm.data.sft import IGNORE, check_messages, first_record, jsonl_records, publish, stdlib_qa, work_dir
from llm.data.shards import MANIFEST, Split, load_manifest, tokenizer_slug
from llm.tokenizer import Tokenizer

EMBEDDED = "stdlib-prefs"
STRIDE = 101  # the rejected answer of pair i is the chosen answer of pair (i + STRIDE) mod n
NEGATIVES = 4  # pairs per question, each with another wrong answer: more pairs to rank, less to memorise
# (held-out questions always get NEGATIVES; training questions get --pref-negatives, NEGATIVES by default)
SIDES = ("chosen", "rejected")


def is_preference(cfg: DataConfig) -> bool:
    """Whether --dataset is preference data: the embedded set, or a .jsonl whose first line has chosen/rejected."""
    if cfg.dataset == EMBEDDED:
        return True
    obj = first_record(cfg.dataset)
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj


# ----------------------------------------------------------------------------- pairs


def split_of(name: str, val_fraction: float, dev_fraction: float) -> str:
    """"val" (held out by a hash of the name, as stdlib-qa holds it out: the test pairs), "dev" (a share
    `dev_fraction` of the other names, by a second hash: the trainer's validation and best checkpoint), or "train"."""
    if _in_val(name, val_fraction):
        return "val"
    return "dev" if _in_val(f"{Path(name).name}#dev", dev_fraction) else "train"


def stdlib_prefs(val_fraction: float, negatives: int = NEGATIVES, dev_fraction: float = 0.0
                 ) -> Iterator[tuple[str, list[dict], list[dict]]]:
    """(name, chosen conversation, rejected conversation): the stdlib-qa question answered by its own docstring
    summary (chosen) and by another question's (rejected; never the same text), `negatives` pairs per training
    question and NEGATIVES per held-out or dev one (the held-out pairs stay the same whatever `negatives` and
    `dev_fraction` are), each with a different wrong answer. Wrong answers come from the same split (held-out
    questions by the rule that holds them out of stdlib-qa fine-tuning; dev questions, carved from the training
    ones by `split_of`, from the dev split): a held-out pair never pits an unseen answer against one that an SFT
    model has learned, and no split's pairs teach another's answers."""
    rows = list(stdlib_qa())
    groups: dict[str, list] = {}
    for name, msgs in rows:
        groups.setdefault(split_of(name, val_fraction, dev_fraction), []).append((name, msgs))
    for split, group in groups.items():
        m, texts = len(group), {msgs[-1]["content"] for _, msgs in group}
        per = negatives if split == "train" else NEGATIVES
        for i, (name, msgs) in enumerate(group):
            answer, used = msgs[-1]["content"], set()
            for k in range(1, min(per, len(texts) - 1) + 1):
                j = (i + k * STRIDE) % m
                while group[j][1][-1]["content"] in used | {answer}:
                    j = (j + 1) % m
                wrong = group[j][1][-1]["content"]
                used.add(wrong)
                yield name, msgs, msgs[:-1] + [{"role": "assistant", "content": wrong}]


def _side(prompt: list[dict], answer, where: str, key: str) -> list[dict]:
    if isinstance(answer, str):
        msgs = prompt + [{"role": "assistant", "content": answer}]
    elif isinstance(answer, list):
        msgs = prompt + answer
    else:
        raise DataError(f"{where}: field {key!r} must be a string (the answer) or a list of messages")
    check_messages(msgs, f"{where} ({key})")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def to_pair(obj, where: str) -> tuple[list[dict], list[dict]]:
    """(chosen messages, rejected messages) of one record; a DataError naming `where` for anything malformed."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise DataError(f"{where}: expected an object with \"chosen\" and \"rejected\" fields (and \"prompt\" or "
                        "\"messages\")")
    prompt = obj.get("prompt", obj.get("messages", []))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise DataError(f"{where}: field \"prompt\" must be a string or a list of messages")
    return _side(prompt, obj["chosen"], where, "chosen"), _side(prompt, obj["rejected"], where, "rejected")


def read_jsonl(path: Path) -> Iterator[tuple[str, list[dict], list[dict]]]:
    """("path:line", chosen, rejected) per line (the SFT reader's lines, llm/data/sft.py); DataError on file:line."""
    for where, obj in jsonl_records(path):
        yield (where, *to_pair(obj, where))


def pairs(cfg: DataConfig) -> Iterator[tuple[str, str, list[dict], list[dict]]]:
    """(split, name, chosen, rejected) of the dataset: "val" by a hash of the name (at least one held out), "dev"
    a share --pref-dev-fraction of the rest by a second hash (at least one when that leaves a training name;
    none with 0), the rest "train"."""
    embedded = cfg.dataset == EMBEDDED
    rows = list(stdlib_prefs(cfg.val_fraction, cfg.pref_negatives, cfg.pref_dev_fraction) if embedded
                else read_jsonl(Path(cfg.dataset)))
    if not rows:
        raise DataError(f"dataset {cfg.dataset!r} holds no preference pairs")
    val = {r[0] for r in rows if _in_val(r[0], cfg.val_fraction)} or {rows[-1][0]}
    rest = list(dict.fromkeys(r[0] for r in rows if r[0] not in val))
    dev = {n for n in rest if split_of(n, cfg.val_fraction, cfg.pref_dev_fraction) == "dev"}
    if not dev and cfg.pref_dev_fraction > 0 and len(rest) > 1:
        dev = {rest[-1]}
    if len(dev) == len(rest) and rest:
        dev.discard(rest[0])  # something left to train on
    for name, chosen, rejected in rows:
        yield ("val" if name in val else "dev" if name in dev else "train"), name, chosen, rejected


# ----------------------------------------------------------------------------- preparation


def dataset_dir(cfg: DataConfig, tok: Tokenizer, block_size: int) -> Path:
    """Where the prepared pairs live: named by the source (for a file: its path, size and modification time, so an
    edited file is prepared again), the block size and the tokenizer."""
    if cfg.dataset == EMBEDDED:
        src = f"{EMBEDDED}-x{cfg.pref_negatives}-val{cfg.val_fraction:g}"  # the pairs depend on all three
        src += f"-dev{cfg.pref_dev_fraction:g}" if cfg.pref_dev_fraction else ""
    else:
        f = Path(cfg.dataset).resolve()
        st = f.stat()
        key = f"{f}:{st.st_size}:{st.st_mtime_ns}"
        src = f"{f.stem[:40]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        src += f"-dev{cfg.pref_dev_fraction:g}" if cfg.pref_dev_fraction else ""
    return Path(cfg.data_dir) / f"{src}-pref-T{block_size}-{tokenizer_slug(tok)}"


def prepare(cfg: DataConfig, tok: Tokenizer, block_size: int, log: Callable[[str], None] = print) -> Path:
    """Encode the pairs once into <dir> (a work dir renamed into place); an existing manifest is reused."""
    out = dataset_dir(cfg, tok, block_size)
    if (out / MANIFEST).is_file():
        return out
    work = work_dir(out)
    dtype = np.dtype(np.uint16 if tok.n_vocab <= 65536 else np.uint32)
    rows: dict[str, dict[str, list]] = {s: {side: [] for side in SIDES} for s in ("train", "val")}
    stats = {s: {"pairs": 0, "tokens": 0, "dropped": 0} for s in rows}
    for split, name, *convs in pairs(cfg):
        if split not in rows:  # "dev": only when the data has one
            rows[split], stats[split] = {side: [] for side in SIDES}, {"pairs": 0, "tokens": 0, "dropped": 0}
        try:
            enc = [encode_chat(tok, msgs) for msgs in convs]
        except ChatError as e:
            raise DataError(f"{name}: {e}") from None
        if any(len(ids) > block_size + 1 for ids, _ in enc):
            stats[split]["dropped"] += 1
            continue
        for side, e in zip(SIDES, enc):
            rows[split][side].append(e)
        stats[split]["pairs"] += 1
        stats[split]["tokens"] += sum(len(ids) for ids, _ in enc)
    for s, st in stats.items():
        if not st["pairs"]:
            raise DataError(f"dataset {cfg.dataset!r}: no {s} pair fits block_size + 1 = {block_size + 1} tokens "
                            f"({st['dropped']} dropped)")
    splits = {s: stats[s] | {side: _write(work, f"{s}.{side}", rows[s][side], dtype) for side in SIDES}
              for s in rows}
    manifest = {"version": 1, "kind": "preference", "dataset": cfg.dataset, "n_vocab": tok.n_vocab,
                "dtype": dtype.name, "block_size": block_size, "tokenizer": tok.save(work), "splits": splits}
    publish(work, out, manifest)
    for s, st in stats.items():
        log(f"{s}: {st['pairs']:,} preference pairs; {st['dropped']} dropped (a side over block_size + 1 = "
            f"{block_size + 1} tokens)")
    return out


def _write(work: Path, stem: str, rows: list, dtype: np.dtype) -> list[dict]:
    arrays = {"ids": np.array([i for r, _ in rows for i in r], dtype=dtype),
              "mask": np.array([m for _, r in rows for m in r], dtype=np.uint8),
              "offsets": np.cumsum([0] + [len(r) for r, _ in rows]).astype(np.int64)}
    out = []
    for kind, arr in arrays.items():
        name = f"{stem}.{kind}.bin"
        arr.tofile(work / name)
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        out.append({"file": name, "kind": kind, "n": int(arr.size), "sha256": digest})
    return out


# ----------------------------------------------------------------------------- loading


@dataclass
class PreferenceLoader(Split):
    """Batches of pairs: x, y (2B, L), chosen rows first; L = the longest conversation in the batch minus one, or
    block_size when `fixed` (one shape for a compiled model)."""

    fixed: bool = False

    def __post_init__(self) -> None:
        m = load_manifest(self.path)
        if m.get("kind") != "preference":
            raise DataError(f"{self.path} is not prepared preference data")
        dt = {"ids": np.dtype(m["dtype"]), "mask": np.dtype(np.uint8), "offsets": np.dtype(np.int64)}
        self.sides: dict[str, dict[str, np.ndarray]] = {}
        for side in SIDES:
            arrs = {}
            for s in m["splits"][self.split][side]:
                f = Path(self.path) / s["file"]
                if not f.is_file() or f.stat().st_size != s["n"] * dt[s["kind"]].itemsize:
                    raise DataError(f"{f} is missing or truncated; delete {self.path} to prepare it again")
                arrs[s["kind"]] = np.fromfile(f, dtype=dt[s["kind"]])
            self.sides[side] = arrs
        self.n = len(self.sides["chosen"]["offsets"]) - 1

    def picks(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, step, 0 if self.split == "train" else 1])
        return rng.integers(0, self.n, size=self.batch_size)

    def batch(self, step: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(self.picks(step), device)

    def rows(self, picks, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (2 len(picks), L) of the pairs numbered `picks` in this split: chosen rows first."""
        spans = [(side, int(self.sides[side]["offsets"][i]), int(self.sides[side]["offsets"][i + 1]))
                 for side in SIDES for i in picks]
        L = self.block_size if self.fixed else max(b - a for _, a, b in spans) - 1
        x = torch.zeros(len(spans), L, dtype=torch.long)
        y = torch.full((len(spans), L), IGNORE, dtype=torch.long)
        for r, (side, a, b) in enumerate(spans):
            ids = torch.from_numpy(self.sides[side]["ids"][a:b].astype(np.int64))
            keep = torch.from_numpy(self.sides[side]["mask"][a + 1: b].astype(bool))
            x[r, : b - a - 1] = ids[:-1]
            y[r, : b - a - 1] = torch.where(keep, ids[1:], IGNORE)
        return x.to(device), y.to(device)
