"""Prompt data for online RL (--objective grpo): conversations whose last answer is held back as the reference
the reward function may compare against; the model samples its own answers during training.

Inputs (`--dataset`):
  stdlib-modules  embedded, offline: "Which module defines dumps?" -> "json", for every public function and
                  class of the standard library in the stdlib-qa set (names defined in more than one module are
                  left out, so the answer is unique); held out by a hash of the name
  anything SFT    the instruction / chat examples of llm/data/sft.py (stdlib-qa, FILE.jsonl): the prompt is the
                  conversation without its last answer, the reference is that answer
Prepared once: <data_dir>/<dataset>-prompts-P<max prompt>-<tokenizer>/{train,val}.jsonl ({"ids", "answer"} per
line: the prompt rendered with the chat template and the assistant's opening) + manifest.json with a sha256
per file. `PromptLoader.batch(i)` gives (prompt ids lists, reference answers, i): B prompts drawn by (seed, rank,
i, split), like every other loader.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.chat import prompt_ids
from llm.config import DataConfig
from llm.data.corpus import DataError, _in_val
from llm.data.sft import examples, publish, stdlib_qa, work_dir
from llm.data.shards import MANIFEST, Split, load_manifest, tokenizer_slug
from llm.tokenizer import Tokenizer

EMBEDDED = "stdlib-modules"


def stdlib_modules() -> Iterator[tuple[str, list[dict]]]:
    """(name, [user question, assistant module name]) for names defined in exactly one stdlib module."""
    names = [name for name, _ in stdlib_qa()]
    count = Counter(n.rpartition(".")[2] for n in names)
    for name in names:
        mod, _, short = name.rpartition(".")
        if count[short] == 1:
            yield name, [{"role": "user", "content": f"Which module defines {short}?"},
                         {"role": "assistant", "content": mod}]


def conversations(cfg: DataConfig) -> Iterator[tuple[str, str, list[dict]]]:
    """(split, name, messages ending with the reference answer)."""
    if cfg.dataset != EMBEDDED:
        yield from examples(cfg)
        return
    rows = list(stdlib_modules())
    val = {n for n, _ in rows if _in_val(n, cfg.val_fraction)} or {rows[-1][0]}
    for name, msgs in rows:
        yield ("val" if name in val else "train"), name, msgs


def dataset_dir(cfg: DataConfig, tok: Tokenizer, max_prompt: int) -> Path:
    src = cfg.dataset if "/" not in cfg.dataset and not cfg.dataset.endswith(".jsonl") else \
        f"{Path(cfg.dataset).stem[:40]}-{hashlib.sha1(str(Path(cfg.dataset).resolve()).encode()).hexdigest()[:8]}"
    return Path(cfg.data_dir) / f"{src}-prompts-P{max_prompt}-{tokenizer_slug(tok)}"


def prepare(cfg: DataConfig, tok: Tokenizer, max_prompt: int, log: Callable[[str], None] = print) -> Path:
    """Render the prompts once into <dir> (a work dir renamed into place); an existing manifest is reused.
    A prompt longer than max_prompt tokens (the context less the answer's room) is dropped (counted)."""
    out = dataset_dir(cfg, tok, max_prompt)
    if (out / MANIFEST).is_file():
        return out
    work = work_dir(out)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    stats = {s: {"prompts": 0, "tokens": 0, "dropped": 0} for s in lines}
    for split, _name, msgs in conversations(cfg):
        ids = prompt_ids(tok, msgs[:-1])
        if len(ids) > max_prompt:
            stats[split]["dropped"] += 1
            continue
        lines[split].append(json.dumps({"ids": ids, "answer": msgs[-1]["content"]}))
        stats[split]["prompts"] += 1
        stats[split]["tokens"] += len(ids)
    splits = {}
    for s, rows in lines.items():
        if not rows:
            raise DataError(f"dataset {cfg.dataset!r}: no {s} prompt fits in {max_prompt} tokens (the context less "
                            f"the answer's room; {stats[s]['dropped']} dropped)")
        data = ("\n".join(rows) + "\n").encode()
        (work / f"{s}.jsonl").write_bytes(data)
        splits[s] = stats[s] | {"file": f"{s}.jsonl", "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"version": 1, "kind": "prompts", "dataset": cfg.dataset, "n_vocab": tok.n_vocab,
                "max_prompt": max_prompt, "tokenizer": tok.save(work), "splits": splits}
    publish(work, out, manifest)
    for s, st in stats.items():
        log(f"{s}: {st['prompts']:,} prompts ({st['tokens']:,} tokens); {st['dropped']} dropped (over "
            f"{max_prompt} tokens)")
    return out


@dataclass
class PromptLoader(Split):
    """B prompts per batch (the sampler makes the rows): (ids lists, reference answers, the batch index)."""

    def __post_init__(self) -> None:
        m = load_manifest(self.path)
        if m.get("kind") != "prompts":
            raise DataError(f"{self.path} is not prepared prompt data")
        f = Path(self.path) / m["splits"][self.split]["file"]
        data = f.read_bytes() if f.is_file() else b""
        if hashlib.sha256(data).hexdigest() != m["splits"][self.split]["sha256"]:
            raise DataError(f"{f} is missing or does not match its checksum; delete {self.path} to prepare it again")
        self.rows = [json.loads(line) for line in data.decode().splitlines()]

    def batch(self, step: int, device=None) -> tuple[list[list[int]], list[str], int]:
        rng = np.random.default_rng([self.seed, self.rank, step, 0 if self.split == "train" else 1])
        picks = rng.integers(0, len(self.rows), size=self.batch_size)
        return [self.rows[i]["ids"] for i in picks], [self.rows[i]["answer"] for i in picks], step
