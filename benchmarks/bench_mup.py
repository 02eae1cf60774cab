"""µP learning-rate transfer: sweep AdamW learning rates at two widths, with and without µP, and plot the curves.

    python -m benchmarks.bench_mup [--widths 64 512] [--lrs 1.25e-3 2.5e-3 5e-3 1e-2 2e-2 4e-2] [--steps 100]
                                   [--parametrisations mup sp] [--dataset pystdlib]

Every run trains the same small model (2 layers, 4 heads / 2 kv heads, context 64, micro-batch 8) through
train.py's code path, n_embd = width, for --steps steps (warmup 10, cosine), and records the final validation
loss (fixed validation batches). µP runs use --mup --mup-base-width <smallest width>. Reported: the best LR per
(parametrisation, width) and how many grid steps apart the best LRs of the two widths are. The µP coordinate check
(activation RMS per layer vs width) is tests/test_mup.py. Results: CSV + PNG (final validation loss against LR, one
line per width and parametrisation) + markdown under benchmarks/results/<device>/mup.*
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write_results
from llm.train.cli import main as train_main


def one_run(width: int, lr: float, param: str, args, tmp: Path) -> float:
    out = tmp / f"{param}-{width}-{lr:g}"
    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--out-dir", str(out), "--n-layer", "2",
            "--n-head", "4", "--n-kv-head", "2", "--n-embd", str(width), "--block-size", "64", "--batch-size", "8",
            "--max-steps", str(args.steps), "--warmup-steps", "10", "--eval-interval", str(args.steps),
            "--eval-iters", "8", "--log-interval", str(args.steps), "--save-interval", str(10 * args.steps),
            "--lr", str(lr), "--min-lr", str(lr / 10), "--seed", str(args.seed), "--device", "cpu",
            "--kernels", "torch", "--health-interval", "0"]
    if param == "mup":
        argv += ["--mup", "--mup-base-width", str(min(args.widths))]
    assert train_main(argv) == 0, argv
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in rows if "val_loss" in r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs=2, default=[64, 512])
    p.add_argument("--lrs", type=float, nargs="+", default=[1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2])
    p.add_argument("--parametrisations", nargs="+", default=["mup", "sp"], choices=["mup", "sp"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="pystdlib")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for param in args.parametrisations:
            for width in args.widths:
                for lr in args.lrs:
                    val = one_run(width, lr, param, args, Path(tmp))
                    rows.append({"parametrisation": param, "width": width, "lr": lr, "log2_lr": math.log2(lr),
                                 "val_loss": val, "run": f"{param} width {width}"})
                    print(f"RESULT {param} width={width} lr={lr:g}: val {val:.4f}", flush=True)
    write_results("mup", rows, x="lr", y="val_loss", series="run",
                  title=f"final val loss after {args.steps} steps vs LR", zero=False,
                  xlabel="AdamW learning rate (log scale)", ylabel=f"val loss after {args.steps} steps (nats/token)",
                  legend="parametrisation, width")
    for param in args.parametrisations:
        best = {w: min((r for r in rows if r["parametrisation"] == param and r["width"] == w),
                       key=lambda r: r["val_loss"]) for w in args.widths}
        i = [args.lrs.index(best[w]["lr"]) for w in args.widths]
        print(f"{param}: best lr " + ", ".join(f"width {w}: {best[w]['lr']:g} (val {best[w]['val_loss']:.4f})"
                                               for w in args.widths) + f"; {abs(i[0] - i[1])} grid step(s) apart")


if __name__ == "__main__":
    main()
