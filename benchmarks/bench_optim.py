"""Token efficiency of the optimizers: steps Muon needs to reach the validation loss AdamW reaches at the end.

    python -m benchmarks.bench_optim [--steps 600] [--seeds 0 1 2] [--adamw-lrs 1e-3 3e-3 1e-2]
                                     [--muon-lrs 0.01 0.02 0.04] [--preset tiny] [--dataset pystdlib]

Protocol: every (optimizer, learning rate, seed) trains the same preset on the same data with the same
schedule (warmup, cosine to max_steps) through train.py's own code path; the validation loss is measured
every --eval-interval steps on the same fixed validation batches. Per seed, each optimizer is taken at its
best learning rate (lowest final validation loss); the target is AdamW's final validation loss, and Muon's
steps-to-target is the first evaluation step at which its validation loss is <= the target (so the answer
has the granularity of --eval-interval). Time per step: the median of the per-step times logged in
metrics.jsonl (steps 2.., evaluation excluded), side by side in the same process. Muon's AdamW part (embeddings,
head, norms) runs at the AdamW --lr default. Results: CSV + PNG (validation curves) + markdown under
benchmarks/results/<device>/optim.*
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write_results
from llm.train.cli import main as train_main


def one_run(opt: str, lr: float, seed: int, args, tmp: Path) -> dict:
    out = tmp / f"{opt}-{lr:g}-{seed}"
    argv = ["--preset", args.preset, "--dataset", args.dataset, "--data-dir", args.data_dir, "--out-dir", str(out),
            "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup), "--eval-interval",
            str(args.eval_interval), "--eval-iters", str(args.eval_iters), "--log-interval", "1",
            "--save-interval", str(10 * args.steps), "--seed", str(seed), "--device", "cpu", "--kernels", "torch",
            "--optimizer", opt, "--keep-last", "1"]
    argv += ["--lr", str(lr)] if opt == "adamw" else ["--muon-lr", str(lr)]
    assert train_main(argv) == 0, argv
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "tokens" in r]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1
             and r["step"] % args.eval_interval != 1]  # a step right after an evaluation carries its time
    tokens = train[0]["tokens"] / train[0]["step"]  # tokens per optimizer step
    return {"optimizer": opt, "lr": lr, "seed": seed, "val": val, "final_val": val[args.steps],
            "step_ms": 1000 * statistics.median(tokens / t for t in tok_s)}


def steps_to(val: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(val) if val[s] <= target), None)


def summarise(runs: list[dict], seeds: list[int], steps: int) -> tuple[list[dict], list[str]]:
    """(curve rows of each optimizer at its best LR per seed, summary lines)."""
    rows, lines, ratios, times = [], [], [], []
    for seed in seeds:
        best = {o: min((r for r in runs if r["optimizer"] == o and r["seed"] == seed), key=lambda r: r["final_val"])
                for o in ("adamw", "muon")}
        target = best["adamw"]["final_val"]
        k = steps_to(best["muon"]["val"], target)
        ratios.append(k / steps if k else float("inf"))
        times.append(best["muon"]["step_ms"] / best["adamw"]["step_ms"])
        lines.append(f"seed {seed}: AdamW best lr {best['adamw']['lr']:g} -> val {target:.4f} at step {steps}; "
                     f"Muon best lr {best['muon']['lr']:g} -> val {best['muon']['final_val']:.4f}, reaches "
                     f"{target:.4f} at step {k} ({ratios[-1]:.2f}x the steps); step time "
                     f"{best['muon']['step_ms']:.0f} vs {best['adamw']['step_ms']:.0f} ms ({times[-1]:.2f}x)")
        for o, r in best.items():
            rows += [{"run": f"{o} lr={r['lr']:g} seed={seed}", "step": s, "val_loss": v} for s, v in r["val"].items()]
    lines.append(f"median over {len(seeds)} seed(s): Muon needs {statistics.median(ratios):.2f}x AdamW's steps, "
                 f"at {statistics.median(times):.2f}x its time per step (runs one after another: on a shared "
                 "machine prefer bench_step_overhead's interleaved timing)")
    return rows, lines


def from_logs(paths: list[str]) -> list[dict]:
    """The runs printed as RESULT lines by earlier (possibly interrupted or partial) invocations."""
    pat = re.compile(r"^RESULT (\w+) lr=([\d.e+-]+) seed=(\d+): final val ([\d.]+), (\d+) ms/step, curve (.*)$")
    runs = []
    for path in paths:
        for m in filter(None, map(pat.match, Path(path).read_text().splitlines())):
            val = {int(k): v for k, v in json.loads(m[6]).items()}
            runs.append({"optimizer": m[1], "lr": float(m[2]), "seed": int(m[3]), "final_val": float(m[4]),
                         "step_ms": float(m[5]), "val": val})
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dataset", default="pystdlib")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--adamw-lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=float, nargs="*", default=[0.01, 0.02, 0.04])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-logs", nargs="+", help="summarise the RESULT lines of earlier runs' output instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_logs:
        runs = from_logs(args.from_logs)
        seeds = sorted({r["seed"] for r in runs if r["optimizer"] == "muon"})
        rows, lines = summarise(runs, seeds, max(max(r["val"]) for r in runs))
        write_results("optim", rows, x="step", y="val_loss", series="run", title="validation loss, best LR each",
                      zero=False, ylabel="val loss (nats/token)", legend="optimizer, LR, seed")
        print("\n".join(lines))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for opt, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
                for lr in lrs:
                    runs.append(one_run(opt, lr, seed, args, Path(tmp)))
                    r = runs[-1]
                    print(f"RESULT {opt} lr={lr:g} seed={seed}: final val {r['final_val']:.4f}, "
                          f"{r['step_ms']:.0f} ms/step, curve {json.dumps(r['val'])}", flush=True)
    if not (args.adamw_lrs and args.muon_lrs):
        return  # a partial sweep: the RESULT lines are the output
    rows, lines = summarise(runs, args.seeds, args.steps)
    write_results("optim", rows, x="step", y="val_loss", series="run",
                  title=f"{args.preset}: validation loss, each optimizer at its best LR", zero=False,
                  ylabel="val loss (nats/token)", legend="optimizer, LR, seed")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
