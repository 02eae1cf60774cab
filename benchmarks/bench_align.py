"""Preference tuning quality (issue 33): reward model, DPO and GRPO on the `make train` model after SFT.

    python -m benchmarks.bench_align all --base out --work /tmp/align      # SFT, RM, DPO, GRPO x 3 seeds
    python -m benchmarks.bench_align eval --checkpoint CKPT --data DIR      # one checkpoint on held-out pairs

Every stage is one `llm train` run (subprocess, the commands printed); the measurements read the checkpoints
back in this process, on every held-out pair of the prepared preference data (not a sample of batches):

* reward model: pairwise accuracy (r(chosen) > r(rejected)) on the held-out pairs;
* policy (SFT, then DPO): preference accuracy (log pi(chosen) > log pi(rejected), summed over the answer
  tokens, as DPO ranks them) and the per-token loss on the chosen answers (is SFT quality kept?);
* GRPO: the mean reward per step from each seed's metrics.jsonl (exact match on the embedded
  `stdlib-modules` task), plotted.

Results: benchmarks/results/<device>/bench_align.{md,csv,png} (the md holds the commands run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LLM = [sys.executable, "-m", "llm"]


@torch.inference_mode()
def eval_pairs(checkpoint: str | Path, data: str | Path, batch: int = 16) -> dict[str, float]:
    """Held-out metrics of one checkpoint on every val pair of prepared preference data `data`."""
    from llm.data.preference import PreferenceLoader
    from llm.loading import load_model
    from llm.train.objectives.pairs import answer_logps
    from llm.train.objectives.reward import scores

    model, _, _ = load_model(checkpoint, "cpu")
    loader = PreferenceLoader(Path(data), "val", batch, model.cfg.block_size, seed=0)
    n = loader.n
    right_pi = right_r = 0
    nll, count = 0.0, 0
    for a in range(0, n, batch):
        idx = list(range(a, min(a + batch, n)))
        x, y = loader.rows(idx)
        h, _ = model(x, hidden=True)
        logps, counts = answer_logps(h, model.lm_head.weight, y)
        pc, pr = logps.chunk(2)
        right_pi += int((pc > pr).sum())
        nc = counts.chunk(2)[0]
        nll += float(-pc.sum())
        count += int(nc.sum())
        if model.reward_head is not None:
            r = scores(model, model.reward_head, x, y)
            rc, rr = r.chunk(2)
            right_r += int((rc > rr).sum())
    out = {"pairs": n, "pref_acc": right_pi / n, "chosen_nll": nll / count}
    if model.reward_head is not None:
        out["reward_acc"] = right_r / n
    return out


def run(cmd: list[str], log: Path) -> float:
    """Run one `llm` command (1 thread), its output to `log`; seconds taken. Raises on a non-zero exit."""
    print("$ " + " ".join(["llm", *cmd]), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(LLM + cmd, stdout=f, stderr=subprocess.STDOUT,
                           env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if p.returncode:
        sys.exit(f"error: the command above failed (rc {p.returncode}); its output: {log}")
    return time.perf_counter() - t


def prepared(out_dir: Path) -> Path:
    """The prepared preference data a run used (its config.toml's data_dir + the manifest it wrote)."""
    cfg = json.loads((out_dir / "latest" / "config.json").read_text()) if (out_dir / "latest").exists() else None
    data_dir = Path((cfg or {}).get("data", {}).get("data_dir", "data"))
    found = sorted(data_dir.glob("stdlib-prefs-pref-*"))
    if not found:
        sys.exit(f"error: no prepared stdlib-prefs data under {data_dir}")
    return found[-1]


def grpo_curve(out_dir: Path) -> list[tuple[int, float]]:
    rows = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "grpo/reward" in m and "step" in m:
            rows.append((int(m["step"]), float(m["grpo/reward"])))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="one checkpoint on the held-out pairs")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="prepared preference data (data/stdlib-prefs-pref-...)")
    args = ap.parse_args(argv)
    if args.cmd == "eval":
        print(json.dumps(eval_pairs(args.checkpoint, args.data)))


if __name__ == "__main__":
    main()
