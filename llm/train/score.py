"""`llm score` (python -m llm.train.score): score answers with a reward model (a checkpoint trained with
`llm train --objective reward`).

  llm score --checkpoint out-rm --prompt "What does json.dumps do?" --answer "Serialize obj to a JSON string."
  llm score --checkpoint out-rm --prompt "..." --answer "first" --answer "second"     (one score per answer)
  llm score --checkpoint out-rm --jsonl pairs.jsonl       (preference pairs: the share ranked right, per line)
  llm score --checkpoint rm-a --checkpoint rm-b ...       (an ensemble: the mean of the models' scores)
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from llm.checkpoint import CheckpointError
from llm.config import ConfigError, run_main
from llm.data.corpus import DataError
from llm.data.preference import read_jsonl
from llm.loading import load_model
from llm.train.objectives.pairs import check_same_tokenizer
from llm.train.objectives.reward import score as score_one


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llm score", description="Score answers with a reward model (llm train --objective reward): "
                "the scalar head on the answer's last token; higher is preferred.")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="the reward model: a checkpoint dir or a training out-dir; repeat it for an ensemble (the mean "
                        "of the models' scores)")
    p.add_argument("--prompt", help="the user's message")
    p.add_argument("--system", help="an optional system message before it")
    p.add_argument("--answer", action="append", default=[], help="an assistant answer to score (repeatable)")
    p.add_argument("--jsonl", help="preference pairs ({prompt, chosen, rejected} lines): print each pair's two "
                                   "scores and the share of pairs where chosen scores higher")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if bool(args.jsonl) == bool(args.prompt and args.answer):
        print("error: give --prompt with one or more --answer, or --jsonl FILE", file=sys.stderr)
        return 2
    try:
        models, tok = [], None
        for c in args.checkpoint:
            model, t, _ = load_model(c)
            if model.reward_head is None:
                raise ConfigError(f"{c} has no reward head: train one with llm train --objective reward")
            if models:
                check_same_tokenizer(tok, t, models[0].cfg.padded_vocab_size, model.cfg.padded_vocab_size, "reward", c)
            else:
                tok = t
            models.append(model)

        def score(msgs: list[dict]) -> float:  # one model's score, or the ensemble's mean
            return sum(score_one(m, tok, msgs) for m in models) / len(models)

        if args.jsonl:
            rows = [(where, score(c), score(r)) for where, c, r in read_jsonl(Path(args.jsonl))]
            acc = sum(c > r for _, c, r in rows) / len(rows) if rows else 0.0
            if args.json:
                print(json.dumps({"pairs": len(rows), "accuracy": acc,
                                  "scores": [{"line": w, "chosen": c, "rejected": r} for w, c, r in rows]}))
            else:
                for where, c, r in rows:
                    print(f"{where}: chosen {c:+.4f}  rejected {r:+.4f}")
                print(f"{len(rows)} pairs: chosen scored higher in {acc:.1%}")
            return 0
        head = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        scores = [score(head + [{"role": "assistant", "content": a}]) for a in args.answer]
        if args.json:
            print(json.dumps([{"answer": a, "score": s} for a, s in zip(args.answer, scores)]))
        else:
            for a, s in zip(args.answer, scores):
                print(f"{s:+.4f}  {a}")
        return 0
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_main(main)
