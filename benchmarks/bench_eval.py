"""lm-eval requests/s: our backend (llm/eval/harness.py: shared contexts prefilled once, batched by length)
against lm-eval's `hf` backend on the same weights (our checkpoint exported with llm.interop), side by side in
one run, on the local multiple-choice task (tests/data/lm_eval/pystdlib_mc.yaml) or any task given.

  python -m benchmarks.bench_eval --checkpoint out [--tasks ...] [--repeats 3] [--threads 1]

Models are loaded before the clock starts; each provider's time is the median over repeats of one
simple_evaluate call. Writes benchmarks/results/<device>/bench_eval.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_results

ROOT = Path(__file__).resolve().parent.parent
MC = str(ROOT / "tests" / "data" / "lm_eval" / "pystdlib_mc.yaml")


def run(lm, tasks: list[str], harness) -> tuple[float, dict, int]:
    """(seconds, results, requests) of one evaluation."""
    t0 = time.perf_counter()
    out = harness.run_tasks(lm, tasks)
    dt = time.perf_counter() - t0
    n = sum(len(s["resps"]) for samples in out["samples"].values() for s in samples)
    return dt, out["results"], n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="out", help="our checkpoint or training out-dir (default: make train's)")
    p.add_argument("--tasks", default=MC, help="comma-separated task names or YAML paths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    try:
        from lm_eval.models.huggingface import HFLM

        from llm.eval import harness
        from llm.interop.hf_export import export
    except Exception as e:  # lm-eval, accelerate or transformers missing
        print(f"bench_eval needs the eval extra, accelerate and transformers: {e}", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ours = harness.LLMEvalLM(args.checkpoint, device="cpu", dtype="float32", batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as d:
        hf_dir = export(args.checkpoint, Path(d) / "hf")
        theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch_size)
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        results, requests = {}, {}
        for _ in range(args.repeats):  # interleaved, so load swings hit both alike
            for name, lm in (("ours", ours), ("hf", theirs)):
                dt, res, n = run(lm, tasks, harness)
                times[name].append(dt)
                results[name], requests[name] = res, n
    rows = []
    for name in ("ours", "hf"):
        med = statistics.median(times[name])
        acc = {f"{t}:{k.split(',')[0]}": round(v, 4) for t, r in results[name].items() for k, v in r.items()
               if isinstance(v, float) and "stderr" not in k}
        rows.append(dict(provider=name, requests=requests[name], seconds=round(med, 3),
                         requests_per_s=round(requests[name] / med, 1), **acc))
    base = rows[1]["requests_per_s"]
    for r in rows:
        r["vs_hf"] = round(r["requests_per_s"] / base, 3)
    write_results("bench_eval", rows, x="provider", y="requests_per_s", series="provider",
                  title="lm-eval requests/s: ours vs hf backend", xlabel="backend",
                  ylabel="lm-eval requests/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
