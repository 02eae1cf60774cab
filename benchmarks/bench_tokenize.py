"""Tokenization speed of dataset preparation: `prepare` on 1 and 2 worker processes side by side, against
tiktoken's single-thread encode rate (the ceiling per core) and today's threaded batch encoder.

    python -m benchmarks.bench_tokenize [--mb 200] [--sample-mb 30] [--workers 1 2]

The corpus is generated from what every machine has: the running Python's standard-library sources (~30 MB
of .py files, the whole tree), repeated in a shuffled order into folders until it holds --mb megabytes,
written under a temporary folder (deleted at the end). One BPE (--vocab-size, trained on a 4 MB sample, as
`llm data` would) tokenizes everything, so every measurement encodes the same ids.

Rows (MB = 10^6 bytes of UTF-8 text; rates are wall-clock):
  encode, 1 thread        tok.encode on each document of a --sample-mb sample, in a loop: the ceiling per core
  encode_batch, N threads tiktoken's threaded batch encoder (what preparation used before processes), same sample
  prepare, N workers      the real `llm.data.shards.prepare` on the whole corpus (reading, chunking, the worker
                          processes, writing and fsyncing shards): `MB/s` over its tokenizing phase (from the
                          "preparing" line to the "tokenized" summary), `prepare MB/s` over the whole call
                          (checksums and the manifest included)
`CPU s` is the CPU time of this process and its reaped workers, `cores` that over wall time: below n, other
load took the difference, and the ratios between rows mean little (Linux with autogroup scheduling shares
the CPU between sessions, not processes: under other sessions' load a second worker gets no more CPU). The
printed bound `min(n, cores) x CPU(1 worker) / CPU(n workers)` is what n workers can reach on free cores,
from CPU times, which load barely changes. The 1-minute load average is recorded before and after each row.

Results: CSV + PNG + markdown under benchmarks/results/<device>/bench_tokenize.*.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import write_results
from llm.config import DataConfig
from llm.data.shards import load_manifest, prepare
from llm.tokenizer import Tokenizer

SAMPLE_BPE_CHARS = 4_000_000  # text the benchmark's BPE is trained on
PLOT = dict(xlabel="threads (encode_batch) or worker processes (prepare)", ylabel="text tokenized (MB/s)",
            legend="what ran", kind="bars")


def stdlib_texts() -> list[str]:
    """Every .py file of the running Python's standard library (site-packages excluded), as text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file())
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    return [t for t in texts if t.strip()]


def write_corpus(texts: list[str], folder: Path, mb: float, seed: int = 0) -> int:
    """Copies of `texts` in shuffled orders, one folder per copy, until `mb` MB are written; returns bytes."""
    rng, total, copy = random.Random(seed), 0, 0
    while total < mb * 1e6:
        d = folder / f"copy{copy:02d}"
        d.mkdir(parents=True)
        order = list(range(len(texts)))
        rng.shuffle(order)
        for i, j in enumerate(order):
            data = texts[j].encode()
            (d / f"{i:05d}.py").write_bytes(data)
            total += len(data)
            if total >= mb * 1e6:
                break
        copy += 1
    return total


def cpu_s() -> float:
    """CPU seconds of this process and of its children that were reaped (finished worker processes)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn, *args, **kw) -> tuple[float, float, float, float]:
    """(wall s, CPU s, load before, load after) of fn(*args, **kw)."""
    load0, c0, t0 = os.getloadavg()[0], cpu_s(), time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0, cpu_s() - c0, load0, os.getloadavg()[0]


def stamped(events: list[tuple[float, str]]) -> Callable[[str], None]:
    """A `log` for prepare that keeps each line with the time it came."""
    return lambda line: events.append((time.perf_counter(), line))


def row(what: str, workers: int, mb: float, wall: float, cpu: float, load0: float, load1: float,
        prepare_mb_s: float | None = None, tokens: int | None = None, phase_s: float | None = None) -> dict:
    """One result row; `wall` is the whole call, `phase_s` (if given) the tokenizing phase the MB/s is over."""
    dt = phase_s or wall
    r = {"what": what, "n": workers, "MB": round(mb, 1), "seconds": round(dt, 2), "MB/s": mb / dt,
         "prepare MB/s": prepare_mb_s, "tokens/s": (tokens / dt) if tokens else None, "CPU s": round(cpu, 2),
         "cores": cpu / wall, "load before": load0, "load after": load1}
    print(f"{what:<28} {mb / dt:7.2f} MB/s  ({mb:.1f} MB in {dt:.1f} s, {cpu:.1f} CPU s, {cpu / wall:.2f} cores, "
          f"load {load0:.2f} -> {load1:.2f})", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tokenize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (default 200)")
    p.add_argument("--sample-mb", type=float, default=30.0,
                   help="sample the per-core ceiling and the threaded encoder are measured on (default 30)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--prep-workers values (default 1 2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="encode_batch threads (default 1 2)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (default 2048, as llm data)")
    p.add_argument("--tokenizer", help="a named tiktoken encoding (gpt2, ...) instead of a trained BPE")
    p.add_argument("--work", help="folder for the corpus and the prepared shards (default: a temporary one, "
                                  "deleted at the end)")
    p.add_argument("--name", default="bench_tokenize", help="results file name (default bench_tokenize)")
    a = p.parse_args(argv)
    if a.mb <= 0 or a.sample_mb <= 0 or min(a.workers) < 1 or min(a.threads) < 1:
        p.error("--mb and --sample-mb must be > 0, --workers and --threads >= 1")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_tokenize-"))
    try:
        return run(a, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def run(a: argparse.Namespace, work: Path) -> int:
    print(f"cpu cores: {os.cpu_count()} | load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    texts = stdlib_texts()
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    total = write_corpus(texts, corpus, a.mb)
    mb = total / 1e6
    print(f"corpus: {mb:.1f} MB in {sum(1 for _ in corpus.rglob('*.py')):,} files ({len(texts):,} stdlib sources "
          f"repeated) under {corpus}", flush=True)
    if a.tokenizer:
        tok = Tokenizer.named(a.tokenizer)
    else:
        rng, sample, n = random.Random(1), [], 0
        for t in rng.sample(texts, len(texts)):
            sample.append(t)
            n += len(t)
            if n >= SAMPLE_BPE_CHARS:
                break
        tok = Tokenizer.train(sample, a.vocab_size)
    name = a.tokenizer or f"bpe{a.vocab_size}"

    sample, n = [], 0  # the same documents for every in-process row
    for t in texts * (1 + int(a.sample_mb * 1e6 // max(1, sum(map(len, texts))))):
        sample.append(t)
        n += len(t.encode())
        if n >= a.sample_mb * 1e6:
            break
    smb = n / 1e6
    tok.encode(sample[0])  # warm up
    rows = [row(f"encode, 1 thread ({name})", 1, smb, *timed(lambda: [tok.encode(t) for t in sample]))]
    for th in a.threads:
        rows.append(row(f"encode_batch, {th} thread{'s' * (th > 1)}", th, smb,
                        *timed(tok.encode_batch, sample, num_threads=th)))
    for w in a.workers:
        events: list[tuple[float, str]] = []
        out_dir = work / f"prepared-w{w}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = DataConfig(dataset=str(corpus), data_dir=str(out_dir), prep_workers=w)
        wall, cpu, load0, load1 = timed(prepare, cfg, log=stamped(events), tokenizer=tok)
        start = next(t for t, s in events if s.startswith("preparing "))
        end = next(t for t, s in events if s.startswith("tokenized "))
        for _, s in events:
            print(f"  {s}")
        out = next(out_dir.iterdir())
        m = load_manifest(out)
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        rows.append(row(f"prepare, {w} worker{'s' * (w > 1)}", w, mb, wall, cpu, load0, load1,
                        prepare_mb_s=mb / wall, tokens=tokens, phase_s=end - start))
        shutil.rmtree(out_dir, ignore_errors=True)
    ceiling = rows[0]["MB/s"]
    prep = {r["n"]: r["MB/s"] for r in rows if r["what"].startswith("prepare")}
    thr = {r["n"]: r["MB/s"] for r in rows if r["what"].startswith("encode_batch")}
    print()
    if 1 in thr and len(thr) > 1:
        print("threaded batch encoder: " + ", ".join(f"{k} threads {v / thr[1]:.2f}x" for k, v in thr.items() if k > 1)
              + " of 1 thread")
    cpu = {r["n"]: r["CPU s"] for r in rows if r["what"].startswith("prepare")}
    cores = os.cpu_count() or 1
    if 1 in prep:
        print(f"prepare on 1 worker: {prep[1] / ceiling:.2f}x the single-thread encode rate")
        for k, v in prep.items():
            if k > 1:
                goal = "met" if k == 2 and v / prep[1] >= 1.8 else "missed" if k == 2 else ""
                print(f"prepare on {k} workers: {v / prep[1]:.2f}x 1 worker, {v / ceiling:.2f}x the single-thread "
                      f"encode rate" + (f" (goal >= 1.8x: {goal})" if goal else ""))
                # with every core free, k workers can at best run min(k, cores) x faster, less the CPU the
                # processes add (pickling chunks, the main process's reading and writing running beside them)
                print(f"  CPU: {cpu[k]:.1f} s vs {cpu[1]:.1f} s on 1 worker; on {min(k, cores)} free cores the "
                      f"bound is {min(k, cores) * cpu[1] / cpu[k]:.2f}x")
    write_results(a.name, rows, x="n", y="MB/s", series="what",
                  title=f"tokenization MB/s, {mb:.0f} MB stdlib corpus, {name}, {os.cpu_count()} cores",
                  **PLOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
