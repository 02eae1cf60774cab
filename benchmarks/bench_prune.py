"""Pruning without retraining, side by side on one checkpoint: perplexity, weight-file size and decode ms/step.

  python -m benchmarks.bench_prune --checkpoint out [--calib-tokens 8192] [--eval-tokens 8192]

Rows: the original; unstructured 50% by magnitude and by Wanda; 2:4 by both; structured to half the parameters
(llm.prune's --target-params path: width and MLP, before any recovery training); structured to half the layers
(--layers n_layer/2: fewer ops per decode step). Perplexity is llm.eval's over --eval-dataset
(default pystdlib, the first --eval-tokens tokens); calibration reads the training split of --calib-dataset.
Decode: greedy, batch 1, --decode-tokens new tokens after a 16-token prompt, the median ms/step of --rounds
interleaved rounds (the masked unstructured variants compute exactly what the original does: their spread is the
timing noise). Threads and load average are printed with the results.
Writes benchmarks/results/<device>/bench_prune.{csv,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import device_name, short_name, versions, write_results
from llm import checkpoint as ckpt_io
from llm.eval.perplexity import dataset_stream, evaluate
from llm.generate.api import generate
from llm.loading import load_model
from llm.prune import calibrate, structured, unstructured


def decode_ms(models: dict[str, torch.nn.Module], prompt: torch.Tensor, n: int, rounds: int) -> dict[str, float]:
    """Median ms per new token of each model, `rounds` rounds that each time every model once (interleaved, so a
    change of machine load hits every model alike), after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            generate(m, prompt, n, temperature=0.0)
            if r:
                times[k].append((time.perf_counter() - t0) * 1000 / n)
    return {k: statistics.median(v) for k, v in times.items()}


def file_mib(model, tok) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = ckpt_io.save(d, "m", model, tok, pointer=None)
        return (path / ckpt_io.MODEL_FILE).stat().st_size / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--calib-dataset", default="pystdlib")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--eval-dataset", default="pystdlib")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok, _ = load_model(args.checkpoint, "cpu", torch.float32)
    cfg = model.cfg
    rows, got = calibrate.calibration_rows(args.calib_dataset, tok, cfg.block_size, args.calib_tokens)
    stats = calibrate.collect(model, rows)
    ids, _ = dataset_stream(args.eval_dataset, tok, args.eval_tokens)
    prompt = torch.tensor([ids[:16]])
    variants: dict[str, torch.nn.Module] = {"original": model}
    for method in ("magnitude", "wanda"):
        for pattern, label in ((None, "50%"), ((2, 4), "2:4")):
            m = copy.deepcopy(model)
            unstructured.prune(m, stats, 0.5, method, pattern)
            variants[f"{method} {label}"] = m
    half = structured.shape_for_target(cfg, model.num_params() // 2)
    variants[f"structured 1/2 ({half.describe(cfg)})"] = structured.prune(model, stats, half)
    if cfg.n_layer > 1:  # depth: what shortens a dispatch-bound decode step (fewer layers, fewer ops)
        depth = structured.check_shape(cfg, cfg.n_layer // 2, None, None, None, None)
        variants[f"structured depth ({depth.describe(cfg)})"] = structured.prune(model, stats, depth)
    out = []
    for name, m in variants.items():
        m.eval()
        r = evaluate(m, ids)
        out.append({"variant": name, "params": m.num_params(), "perplexity": round(r.perplexity, 3),
                    "weights_MiB": round(file_mib(m, tok), 3)})
        print(out[-1], flush=True)
    load0 = os.getloadavg()[0]
    ms = decode_ms(variants, prompt, args.decode_tokens, args.rounds)
    for r in out:
        r["decode_ms_per_step"] = round(ms[r["variant"]], 3)
    base = out[0]
    for r in out:
        r["ppl_vs_original"] = round(r["perplexity"] / base["perplexity"], 3)
        r["size_vs_original"] = round(r["weights_MiB"] / base["weights_MiB"], 3)
        r["decode_vs_original"] = round(r["decode_ms_per_step"] / base["decode_ms_per_step"], 3)
    summary = (f"{device_name()}; checkpoint {short_name(args.checkpoint)}; calibration {rows.numel()} tokens (of "
               f"{got}); eval {len(ids)} tokens; decode {torch.get_num_threads()} thread(s), load average "
               f"{load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"# {versions()}; {summary}")
    for r in out:
        print(" | ".join(f"{k} {v}" for k, v in r.items()))
    res = write_results("bench_prune", out, x="variant", y="perplexity", series="variant",
                        title="pruning without retraining: perplexity", ylabel="perplexity (lower is better)")
    with (res / "bench_prune.md").open("a") as f:
        f.write(f"\n{summary}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
