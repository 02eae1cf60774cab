"""Distillation, measured two ways.

  python -m benchmarks.bench_distill students --teacher DIR [--seeds 3] [--steps 60] [-- extra train.py flags]
      A student (--student-layers, default 2) trained --steps steps with --teacher DIR (distillation, default alpha
      and T) against the same student trained on CE alone, same data and steps, for each seed. Reported: the
      student's validation cross-entropy (val/distill/ce of the distilled run, val_loss of the CE run), the gap per
      seed, its mean and spread (sample standard deviation).
  python -m benchmarks.bench_distill recover --teacher DIR --pruned DIR --work DIR [--steps 600] [--eval-interval 25]
      Prune + distill against scratch: the pruned model trained --init-from PRUNED --teacher DIR, and a model of the
      pruned config trained from scratch on CE, same data and schedule; both validation-CE curves and the first
      step at which the distilled run reaches the scratch run's final validation CE.
  python -m benchmarks.bench_distill memory [--rows N] [--vocab 32768] [--width d] [--reps 5]
      Peak memory and time of one forward + backward of the loss from hidden states: the materialized reference
      (kernels/reference.py linear_distill_ref: both (N, V) logits and their softmaxes exist), the reference under
      torch.compile, and the chunked op (kernels/distill.py: the Triton row kernel on CUDA, bf16; on CPU, fp32, the
      PyTorch row math that ops.linear_distill takes there, and that row math under torch.compile). Peak on
      CUDA: max_memory_allocated above what was allocated before; on CPU: a child process per provider,
      resident-memory high-water mark (VmHWM) above the resident memory before the measured call.
      Times: median of --reps interleaved calls in this process.
Results go to benchmarks/results/<device>/bench_distill_<part>.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, short_name, write_results


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
    def ms(key: str) -> str:
        v = [r[key] for r in rows]
        return f"{statistics.mean(v):.4f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"

    summary = (f"{device_name()}; load {os.getloadavg()[0]:.1f}; student {args.student_layers} layers, {args.steps} "
               f"steps, teacher {short_name(args.teacher)}: CE-only val CE {ms('ce_only_val_ce')}, distilled "
               f"{ms('distilled_val_ce')}, gap (CE-only minus distilled) {ms('gap')} (mean +- sample sd over seeds)")
    out = write_results("bench_distill_students", rows, x="seed", y="gap", series="seed", kind="bars",
                        title=f"distillation: val CE of a CE-only student minus a distilled one "
                        f"({args.student_layers} layers, {args.steps} steps), per seed",
                        ylabel="val CE, CE-only minus distilled (nats/token)")
    _append(out / "bench_distill_students.md", summary)


def _append(md: Path, line: str) -> None:
    """The run's one-line summary under its results table (and on the console)."""
    print("# " + line)
    with md.open("a") as f:
        f.write(f"\n{line}\n")


def _curve(out: Path, key: str) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in recs if key in r]


def recover(args: argparse.Namespace, extra: list[str]) -> None:
    """The pruned model distilled back from the original (--init-from PRUNED --teacher ORIGINAL) against a model
    of the pruned config trained from scratch on CE, both --steps steps on the same data and schedule, validated
    every --eval-interval steps. Reported: both validation-CE curves and the first step at which the distilled
    run is at or below the scratch run's final validation CE."""
    from llm.train.cli import main as train

    cfg = json.loads((Path(args.pruned) / "config.json").read_text())
    cfg = cfg.get("model", cfg)
    shape = ["--n-layer", str(cfg["n_layer"]), "--n-head", str(cfg["n_head"]), "--n-kv-head", str(cfg["n_kv_head"]),
             "--n-embd", str(cfg["n_embd"]), "--head-dim", str(cfg["head_dim"]),
             "--intermediate-size", str(cfg["intermediate_size"])]
    common = ["--max-steps", str(args.steps), "--eval-interval", str(args.eval_interval), "--save-interval",
              str(10 ** 9), *extra]
    out = Path(args.work)
    runs = {"scratch": (out / "scratch", shape, "val_loss"),
            "pruned+distilled": (out / "distilled", ["--init-from", args.pruned, "--teacher", args.teacher],
                                 "val/distill/ce")}
    rows, secs = [], {}
    for name, (d, flags, key) in runs.items():
        if not (d / "metrics.jsonl").exists() or not _curve(d, key) or _curve(d, key)[-1][0] < args.steps:
            t0 = time.perf_counter()
            assert train(common + flags + ["--out-dir", str(d)]) == 0
            secs[name] = round(time.perf_counter() - t0)
        rows += [{"run": name, "step": st, "val_ce": round(v, 4)} for st, v in _curve(d, key)]
    final = [r["val_ce"] for r in rows if r["run"] == "scratch"][-1]
    hit = next((r["step"] for r in rows if r["run"] == "pruned+distilled" and r["val_ce"] <= final), None)
    ratio = f"{hit / args.steps:.3f} of the steps" if hit else "not reached"
    summary = (f"{device_name()}; load {os.getloadavg()[0]:.1f}; pruned {short_name(args.pruned)} "
               f"({cfg['n_layer']} layers, width {cfg['n_embd']}, MLP {cfg['intermediate_size']}), teacher "
               f"{short_name(args.teacher)}, {args.steps} steps each, seconds {secs}: scratch final val CE "
               f"{final:.4f}; pruned+distilled reaches it at step {hit} ({ratio}; goal <= 0.25, eval every "
               f"{args.eval_interval} steps)")
    out = write_results("bench_distill_recover", rows, x="step", y="val_ce", series="run",
                        title="pruned + distilled from the original vs the same shape from scratch",
                        xlabel="optimizer step", ylabel="validation CE (nats/token)", legend="run", zero=False)
    _append(out / "bench_distill_recover.md", summary)


def _inputs(N: int, V: int, d: int, dev: str, dt: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=gen).to(dev, dt).requires_grad_()
    w = (torch.randn(V, d, generator=gen) * d ** -0.5).to(dev, dt).requires_grad_()
    tx, tw = torch.randn(N, d, generator=gen).to(dev, dt), (torch.randn(V, d, generator=gen) * d ** -0.5).to(dev, dt)
    return x, w, tx, tw, torch.randint(0, V, (N,), generator=gen).to(dev)


def _providers(dev: str) -> dict:
    """materialized (the reference: both (N, V) logits and their softmaxes exist), the reference under
    torch.compile, and the chunked op: the Triton kernel on CUDA, the torch row math elsewhere (ops' CPU route)."""
    from functools import partial

    from kernels.distill import linear_distill
    from kernels.reference import linear_distill_ref

    out = {"materialized": linear_distill_ref, "torch.compile": torch.compile(linear_distill_ref),
           "chunked": partial(linear_distill, row_math="triton" if dev == "cuda" else "torch")}
    if dev != "cuda":
        out["chunked, compiled rows"] = partial(linear_distill, row_math="torch-compiled")
    return out


def _step(fn, x, w, tx, tw, y) -> None:
    x.grad = w.grad = None
    loss, _ = fn(x, w, tx, tw, y, 0.5, 2.0, "kl")
    loss.backward()


def _status_kib(key: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1])


def _cpu_peak_mib(args: argparse.Namespace) -> float:
    """(In a child process.) Peak resident memory of one fwd+bwd of --provider above the resident memory just before
    it, after a warm-up call (compilation): the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs.
    The parent sets MALLOC_MMAP_THRESHOLD_ so that freed blocks over 1 MiB go back to the system at once."""
    import gc

    fn = _providers("cpu")[args.provider]
    x, w, tx, tw, y = _inputs(args.rows, args.vocab, args.width, "cpu", torch.float32)
    _step(fn, x, w, tx, tw, y)
    x.grad = w.grad = None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    _step(fn, x, w, tx, tw, y)
    return (_status_kib("VmHWM") - base) / 1024


def memory(args: argparse.Namespace) -> None:
    import subprocess

    if args.provider:  # the child of a CPU run
        print(json.dumps({"peak_MiB": _cpu_peak_mib(args)}))
        return
    N, V, d = args.rows, args.vocab, args.width
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cpu" and not Path("/proc/self/clear_refs").exists():
        print("error: bench_distill memory on CPU reads Linux's /proc/self/clear_refs and VmHWM; not available here")
        raise SystemExit(1)
    x, w, tx, tw, y = _inputs(N, V, d, dev, dt)
    rows = []
    for name, fn in _providers(dev).items():
        t0 = time.perf_counter()
        _step(fn, x, w, tx, tw, y)  # warm-up (compilation)
        warm = time.perf_counter() - t0
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(fn, x, w, tx, tw, y)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:  # a fresh process per provider: this one's allocator holds what the others freed
            cmd = [sys.executable, "-m", "benchmarks.bench_distill", "memory", "--rows", str(N), "--vocab", str(V),
                   "--width", str(d), "--provider", name]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_MiB"]
        rows.append({"provider": name, "rows": N, "vocab": V, "width": d, "dtype": str(dt).split(".")[-1],
                     "peak_MiB": round(peak, 1), "warmup_s": round(warm, 1)})
        print(rows[-1], flush=True)
    fns = _providers(dev)
    times: dict[str, list[float]] = {r["provider"]: [] for r in rows}
    for _ in range(args.reps):  # interleaved, so a change of load hits every provider alike
        for name in times:
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _step(fns[name], x, w, tx, tw, y)
            if dev == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1000)
    for r in rows:
        r["ms_median"] = round(statistics.median(times[r["provider"]]), 1)
        r["ms_min"] = round(min(times[r["provider"]]), 1)
    for r in rows:
        r["peak_vs_materialized"] = round(r["peak_MiB"] / rows[0]["peak_MiB"], 3)
        r["time_vs_compile"] = round(r["ms_median"] / rows[1]["ms_median"], 3)
    summary = (f"{device_name()}; {torch.get_num_threads()} thread(s); load {os.getloadavg()[0]:.1f}; N={N} V={V} "
               f"d={d} alpha=0.5 T=2 kl, fwd+bwd, {args.reps} interleaved reps")
    out = write_results(f"bench_distill_memory_{dev}", rows, x="provider", y="peak_MiB", kind="bars",
                        title=f"distillation loss: peak memory of one fwd+bwd (N={N}, V={V}, d={d})",
                        ylabel=f"peak {'CUDA' if dev == 'cuda' else 'resident'} memory (MiB)")
    _append(out / f"bench_distill_memory_{dev}.md", summary)


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
    r = sub.add_parser("recover")
    r.add_argument("--teacher", required=True, help="the original checkpoint")
    r.add_argument("--pruned", required=True, help="its structurally pruned copy (llm prune --target-params)")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--eval-interval", type=int, default=25)
    r.add_argument("--work", required=True, help="folder for the two runs (kept: a finished run is not redone)")
    m = sub.add_parser("memory")
    m.add_argument("--rows", type=int, default=None, help="N (default 8192 on CUDA, 2048 on CPU)")
    m.add_argument("--vocab", type=int, default=32768)
    m.add_argument("--width", type=int, default=None, help="d (default 1024 on CUDA, 256 on CPU)")
    m.add_argument("--reps", type=int, default=5)
    m.add_argument("--provider", default=None, help=argparse.SUPPRESS)  # a CPU child measuring one provider
    args = p.parse_args(argv)
    if args.part == "memory":
        cuda = torch.cuda.is_available()
        args.rows = args.rows or (8192 if cuda else 2048)
        args.width = args.width or (1024 if cuda else 256)
    if args.part == "students":
        students(args, extra)
    elif args.part == "recover":
        recover(args, extra)
    else:
        memory(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
