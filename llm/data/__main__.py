"""`python -m llm.data`: prepare (and verify) a dataset ahead of training."""

from __future__ import annotations

import argparse
import sys

from llm.config import DataConfig, add_dataclass_args, build, run_main
from llm.data.corpus import DataError
from llm.data.shards import prepare, verify
from llm.tokenizer import TokenizerError


def main(argv: list[str] | None = None) -> int:
    """`python -m llm.data --dataset NAME|PATH [--verify]`: prepare ahead of training (e.g. where there is network).

    0 when prepared, 2 for bad input, 130 after Ctrl-C (the same command resumes)."""
    p = argparse.ArgumentParser(prog="llm data", description=main.__doc__)
    add_dataclass_args(p, DataConfig, "data")
    p.add_argument("--verify", action="store_true", help="recompute and check every shard's sha256")
    args = p.parse_args(argv)
    try:
        path = prepare(build(DataConfig, vars(args)))
        if args.verify:
            verify(path)
            print(f"{path}: every shard matches its checksum")
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); run the same command again to resume from the last commit",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    run_main(main)
