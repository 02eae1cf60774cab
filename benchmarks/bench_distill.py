"""Distillation, measured two ways.

  python -m benchmarks.bench_distill students --teacher DIR [--seeds 3] [--steps 60] [-- extra train.py flags]
      A student (--student-layers, default 2) trained --steps steps with --teacher DIR (distillation, default alpha
      and T) against the same student trained on CE alone, same data and steps, for each seed. Reported: the
      student's validation cross-entropy (val/distill/ce of the distilled run, val_loss of the CE run), the gap per
      seed, its mean and spread (sample standard deviation).
  python -m benchmarks.bench_distill memory [--rows 8192] [--vocab 32768] [--width 1024]
      Peak memory and time of one forward + backward of the loss from hidden states: the materialized reference
      (kernels/reference.py linear_distill_ref: both (N, V) logits and their softmaxes exist) against the fused
      kernel (kernels/distill.py) and the reference under torch.compile. Needs CUDA (the kernel's CPU route is the
      interpreter); without it, one line and exit 1.
Results go to benchmarks/results/<device>/bench_distill_<part>.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, require_cuda, versions, write_results


def _val(out: Path, key: str) -> float:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if key in r][-1][key]


def students(args: argparse.Namespace, extra: list[str]) -> None:
    from llm.train.cli import main as train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            common = ["--n-layer", str(args.student_layers), "--max-steps", str(args.steps), "--eval-interval",
                      str(args.steps), "--seed", str(1337 + seed), "--save-interval", str(10 ** 9), *extra]
            ce_out, kd_out = Path(tmp) / f"ce{seed}", Path(tmp) / f"kd{seed}"
            t0 = time.perf_counter()
            assert train(common + ["--out-dir", str(ce_out)]) == 0
            t1 = time.perf_counter()
            assert train(common + ["--out-dir", str(kd_out), "--teacher", args.teacher]) == 0
            t2 = time.perf_counter()
            ce, kd = _val(ce_out, "val_loss"), _val(kd_out, "val/distill/ce")
            rows.append({"seed": 1337 + seed, "ce_only_val_ce": round(ce, 4), "distilled_val_ce": round(kd, 4),
                         "gap": round(ce - kd, 4), "ce_s": round(t1 - t0, 1), "distill_s": round(t2 - t1, 1)})
            print(rows[-1], flush=True)
    gaps = [r["gap"] for r in rows]
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    print(f"# {device_name()}; {versions()}; student {args.student_layers} layers, {args.steps} steps, teacher "
          f"{args.teacher}: gap (CE-only minus distilled val CE) mean {statistics.mean(gaps):.4f} +- {spread:.4f}")
    write_results("bench_distill_students", rows, x="seed", y="gap", series="seed", kind="bars",
                  title=f"distillation: val CE of a CE-only student minus a distilled one ({args.student_layers} "
                  f"layers, {args.steps} steps), per seed", ylabel="val CE, CE-only minus distilled (nats/token)")


def memory(args: argparse.Namespace) -> None:
    require_cuda("bench_distill memory")
    from kernels.distill import linear_distill
    from kernels.reference import linear_distill_ref

    N, V, d = args.rows, args.vocab, args.width
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(V, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_()
    tx, tw = torch.randn(N, d, device=dev, dtype=dt), torch.randn(V, d, device=dev, dtype=dt) * d ** -0.5
    y = torch.randint(0, V, (N,), device=dev)
    compiled = torch.compile(linear_distill_ref)
    rows = []
    for name, fn in (("materialized", linear_distill_ref), ("torch.compile", compiled), ("fused", linear_distill)):
        for _ in range(2):  # warm-up (compilation), then the measured call
            x.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            loss, _ = fn(x, w, tx, tw, y, 0.5, 2.0, "kl")
            loss.backward()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1000
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append({"provider": name, "rows": N, "vocab": V, "width": d, "peak_MiB": round(peak, 1),
                     "ms": round(ms, 2)})
        print(rows[-1], flush=True)
    for r in rows:
        r["peak_vs_materialized"] = round(r["peak_MiB"] / rows[0]["peak_MiB"], 3)
        r["time_vs_compile"] = round(r["ms"] / rows[1]["ms"], 3)
    write_results("bench_distill_memory", rows, x="provider", y="peak_MiB", title="distillation loss: peak memory",
                  ylabel="peak CUDA memory (MiB)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("students")
    s.add_argument("--teacher", required=True)
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--student-layers", type=int, default=2)
    m = sub.add_parser("memory")
    m.add_argument("--rows", type=int, default=8192)
    m.add_argument("--vocab", type=int, default=32768)
    m.add_argument("--width", type=int, default=1024)
    args = p.parse_args(argv)
    students(args, extra) if args.part == "students" else memory(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
