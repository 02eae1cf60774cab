"""`llm`: the project's one console command; `llm STAGE ...` runs the command line of that stage.

Each subcommand is exactly the module it names in `COMMANDS` (same flags, same --help, same exit code):
the rest of the command line goes to that module's `main(argv)`, after the subcommand's fixed leading
arguments (`llm chat ...` = `llm sample --chat ...`; `llm export|merge|import-peft ...` = `python -m llm.interop
export|merge|import-peft ...`).

A new stage adds one line to `COMMANDS`. The module is imported only when its subcommand runs, so
`llm --help` starts in well under a second (no torch import). This is the one place in `llm/` that
loads modules by name at run time: it is the top of the import graph (a CLI, like train.py), and no
module imports it (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from llm.config import guard_pipe


class Command(NamedTuple):
    """A subcommand: the module whose `main(argv: list[str]) -> int` runs it, a one-line summary, and
    arguments put before the user's."""

    module: str
    summary: str
    prefix: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    "data": Command("llm.data.__main__", "prepare (and verify) a dataset's token shards ahead of training"),
    "train": Command("llm.train.cli", "pretrain or fine-tune a model (the same as python train.py)"),
    "plan": Command("llm.train.plan", "per-GPU training memory of a model on a cluster: does it fit (DDP/FSDP2/TP)"),
    "sample": Command("llm.generate.cli", "generate text from a checkpoint (the same as python sample.py)"),
    "chat": Command("llm.generate.cli", "chat with a checkpoint, interactive or one --prompt (= llm sample --chat)",
                    ("--chat",)),
    "eval": Command("llm.eval.__main__", "loss and perplexity over a dataset, or lm-evaluation-harness tasks"),
    "quantize": Command("llm.quantize.__main__", "write a weight-only int8 / int4 copy of a checkpoint"),
    "prune": Command("llm.prune.__main__", "write a pruned copy of a checkpoint (structured: smaller; or sparse)"),
    "export": Command("llm.interop.__main__", "write a checkpoint as a Hugging Face model directory",
                      ("export",)),
    "merge": Command("llm.interop.__main__", "fold a LoRA adapter into its base: a plain checkpoint of ours",
                     ("merge",)),
    "import-peft": Command("llm.interop.__main__", "read a Hugging Face PEFT LoRA / prefix adapter as ours",
                           ("import-peft",)),
    "export-gguf": Command("llm.interop.export_gguf", "write a Llama checkpoint as a llama.cpp GGUF file"),
    "serve": Command("llm.serve.__main__", "OpenAI-compatible HTTP server (needs the serve extra)"),
    "checkpoint": Command("llm.checkpoint", "consolidate a sharded (multi-rank) checkpoint into one file"),
    "score": Command("llm.train.score", "score answers with a reward model (trained with --objective reward)"),
}


def usage() -> str:
    """The text of `llm --help`: one line per subcommand, in pipeline order."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    return ("usage: llm COMMAND [ARGS ...]\n\n"
            "A small, fast, hackable decoder-only LM stack: one command per pipeline stage.\n\n"
            f"commands:\n{rows}\n\n"
            "`llm COMMAND --help` lists a command's flags with their defaults. Docs: README.md and docs/.")


def main(argv: list[str] | None = None) -> int:
    """Dispatch `llm COMMAND ARGS...` to the command's module; returns its exit code (141 when a reader of
    its output stopped early, as in `llm train --help | head -3`: no traceback)."""
    return guard_pipe(_dispatch, sys.argv[1:] if argv is None else list(argv))


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"error: unknown command {name!r}; the commands are {', '.join(COMMANDS)} (llm --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(cmd.module)
    return module.main([*cmd.prefix, *rest])


if __name__ == "__main__":
    sys.exit(main())
