"""What Muon and the health telemetry add to a training step, measured side by side in one process.

    python -m benchmarks.bench_step_overhead [--preset tiny] [--batch-size 16] [--reps 30] [--interval 50]

One step = forward + backward + optimizer step on a fixed random batch (fp32 on CPU, bf16 autocast on CUDA), as the
trainer runs it. Providers are interleaved rep by rep (so a shared machine's load hits them alike) and reported as
medians: the AdamW step, the Muon step, and one telemetry round (llm/train/health.py: gradient/weight snapshot
before the update, update ratios after it, and the probe forward on 2 sequences). The telemetry cost per step at
--interval is round / interval / AdamW step. Results: markdown + CSV + PNG under benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.common import write_results
from llm.config import ModelConfig, TrainConfig, preset
from llm.model import Transformer
from llm.train import distributed as dd
from llm.train.health import Health
from llm.train.optim import make_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--interval", type=int, default=TrainConfig.health_interval)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(**{"vocab_size": 2048, **preset(args.preset)}, kernels="auto")
    T = cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, T + 1), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    setups = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = Transformer(cfg).to(device)
        setups[name] = (model, make_optimizer(model, TrainConfig(optimizer=name), device))
    health = Health(setups["adamw"][0], args.interval, dd.Dist(device=device), False)

    def step(name: str) -> None:
        model, opt = setups[name]
        with amp:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def telemetry() -> None:
        model, opt = setups["adamw"]
        with amp:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        t0 = time.perf_counter()
        snap = health.before_update()
        t1 = time.perf_counter()
        opt.step()  # not counted: only the health calls are
        t2 = time.perf_counter()
        health.after_update(snap)
        health.probe(model, x[:2, :-1])
        times["telemetry"].append(t1 - t0 + time.perf_counter() - t2)
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"adamw": [], "muon": [], "telemetry": []}
    for name in ("adamw", "muon"):
        step(name)  # warm-up
    for _ in range(args.reps):
        for name in ("adamw", "muon"):
            sync()
            t = time.perf_counter()
            step(name)
            sync()
            times[name].append(time.perf_counter() - t)
        telemetry()
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    rows = [{"provider": k, "ms": v, "vs_adamw_step": v / med["adamw"]} for k, v in med.items()]
    rows.append({"provider": f"telemetry per step at interval {args.interval}", "ms": med["telemetry"] / args.interval,
                 "vs_adamw_step": med["telemetry"] / args.interval / med["adamw"]})
    write_results("step_overhead", rows, x="provider", y="ms", series="provider",
                  title=f"{args.preset} B={args.batch_size} on {device.type}: step time, Muon and telemetry",
                  xlabel="what is timed", ylabel="time (ms)")


if __name__ == "__main__":
    main()
