"""CPU decode GEMVs side by side: microseconds per call and weight bytes streamed per second, one process.

    python -m benchmarks.bench_cpu_gemv [--shapes 1024x512 1408x512 512x1408 2816x1024 1024x2816]
                                        [--rows 1] [--threads 1] [--repeats 5] [--name bench_cpu_gemv]
                                        [--providers fp32 f16 ...]

For each weight shape N x K (the default ones are the hf-8x512 and hf-16x1024 imports' linears: fused
q/k/v, w1 = w3 and w2) and x (rows, K) fp32, the providers compute y = x @ W^T with W held as:
  fp32           F.linear on the fp32 weight (torch's GEMV)
  fp32 kmajor    F.linear on the same weight stored K-major (Transformer.decode_layout: what fp32 decode runs
                 for N > K)
  C fp32 rows    kernels.cpu_gemv.f32_rows_gemm on the N-major weight (f32_nmajor_gemm, the speculative verify
                 pass's few-row kernel), at any row count (1 row: what it would give a plain decode step)
  C fp32 kmajor  the same on the K-major weight (f32_kmajor_gemm)
  f16            kernels.cpu_gemv.w16_gemv, fp16 weight widened in registers, fp32 FMA
  int8 a16/a8    kernels.cpu_gemv.int8_gemv, per-channel int8 codes, activations rounded to int16 (vpmaddwd)
                 or int8 per 32 values (vpmaddubsw: llama.cpp's q8_0 activations)
  int4 a16/a8    kernels.cpu_gemv.int4_gemv, group 64 with offsets, the same two activation precisions
Each call is timed as the median of `--repeats` interleaved rounds (so load changes hit every provider
alike), each round the mean of enough calls to stream ~256 MB of that provider's weight bytes (the weights do
not fit in the caches between calls unless the whole set is small: the providers cycle through 8 copies).
GB/s counts the bytes a provider must read (codes + scales + offsets); 'vs fp32' is fp32's time over the
provider's, 'vs a16' is the 8-bit-activation kernel against the 16-bit one of the same weight format.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import device_name, threads_text, weight_shape, write_results
from kernels import cpu_gemv
from llm.quant import quantize_int4, quantize_int8

COPIES = 8
PROVIDERS = ("fp32", "fp32 kmajor", "C fp32 rows", "C fp32 kmajor", "f16", "int8 a16", "int8 a8", "int4 a16", "int4 a8")


def _providers(N: int, K: int) -> dict[str, tuple[list, int]]:
    """name -> (COPIES argument tuples, bytes one call reads)."""
    torch.manual_seed(0)
    ws = [torch.randn(N, K) * 0.05 for _ in range(COPIES)]
    i8 = [quantize_int8(w) for w in ws]
    i4 = [quantize_int4(w, 64) for w in ws]
    f16 = [w.half() for w in ws]
    b8 = N * K + 4 * N
    b4 = N * ((K + 1) // 2) + 2 * 4 * N * (-(-K // 64))
    return {"fp32": ([("fp32", w) for w in ws], 4 * N * K),
            "fp32 kmajor": ([("fp32", w.t().contiguous().t()) for w in ws], 4 * N * K),
            "C fp32 rows": ([("C", w) for w in ws], 4 * N * K),
            "C fp32 kmajor": ([("C", w.t().contiguous().t()) for w in ws], 4 * N * K),
            "f16": ([("f16", w) for w in f16], 2 * N * K),
            "int8 a16": ([("int8", q, s, 16) for q, s in i8], b8),
            "int8 a8": ([("int8", q, s, 8) for q, s in i8], b8),
            "int4 a16": ([("int4", q, s, z, 16) for q, s, z in i4], b4),
            "int4 a8": ([("int4", q, s, z, 8) for q, s, z in i4], b4)}


def _call(x: torch.Tensor, a: tuple) -> torch.Tensor:
    kind = a[0]
    if kind == "fp32":
        return F.linear(x, a[1])
    if kind == "C":
        return cpu_gemv.f32_rows_gemm(x, a[1])
    if kind == "f16":
        return cpu_gemv.w16_gemv(x, a[1])
    if kind == "int8":
        return cpu_gemv.int8_gemv(x, a[1], a[2], act_bits=a[3])
    return cpu_gemv.int4_gemv(x, a[1], a[2], a[3], 64, act_bits=a[4])


def bench_shape(N: int, K: int, M: int, repeats: int, names: list[str]) -> list[dict]:
    provs = {k: v for k, v in _providers(N, K).items() if k in names}
    x = torch.randn(M, K)
    calls = {k: max(8, int(256e6 // nbytes)) for k, (_, nbytes) in provs.items()}
    for args, _ in provs.values():  # warm-up (and the first build of the library)
        for a in args:
            _call(x, a)
    times: dict[str, list[float]] = {k: [] for k in provs}
    for _ in range(repeats):
        for k, (args, _) in provs.items():
            n = calls[k]
            t = time.perf_counter()
            for i in range(n):
                _call(x, args[i % COPIES])
            times[k].append((time.perf_counter() - t) / n)
    base = statistics.median(times["fp32"])
    rows = []
    for k, (_, nbytes) in provs.items():
        t = statistics.median(times[k])
        a16 = k.replace(" a8", " a16")
        row = dict(shape=f"{N}x{K}", rows=M, provider=k, us=1e6 * t, spread_us=1e6 * (max(times[k]) - min(times[k])),
                   gb_s=nbytes / t / 1e9, vs_fp32=base / t,
                   vs_a16=statistics.median(times[a16]) / t if k.endswith(" a8") else None)
        rows.append(row)
        print(f"{row['shape']:>10s} M{M:<2d} {k:11s} {row['us']:9.1f} us (spread {row['spread_us']:6.1f})  "
              f"{row['gb_s']:6.2f} GB/s  x{row['vs_fp32']:.2f} vs fp32"
              + (f"  x{row['vs_a16']:.2f} vs a16" if row["vs_a16"] else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=weight_shape,
                   default=[(1024, 512), (1408, 512), (512, 1408), (2816, 1024), (1024, 2816)],
                   help="weight shapes N x K (output features x input features)")
    p.add_argument("--rows", type=int, default=1, help=f"rows of x (decode batch), 1 .. {cpu_gemv.MAX_M}")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch's and the kernels' OpenMP)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per provider, median")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS),
                   help=f"which to run (fp32 always runs: the baseline), of {', '.join(PROVIDERS)}")
    p.add_argument("--name", default="bench_cpu_gemv", help="result file name under benchmarks/results/<device>/")
    args = p.parse_args(argv)
    bad = [k for k in args.providers if k not in PROVIDERS]
    if bad:
        p.error(f"--providers: unknown {', '.join(bad)}; choose from {', '.join(PROVIDERS)}")
    if not 1 <= args.rows <= cpu_gemv.MAX_M:
        p.error(f"--rows must be 1 .. {cpu_gemv.MAX_M}")
    if not cpu_gemv.available():
        print("error: the C GEMVs did not build (no C compiler?): nothing to measure", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    where = f"{device_name()} (CPU, {threads_text(args.threads)})"
    print(f"CPU GEMV benchmark on {where}: {args.rows} row(s) of x, median of {args.repeats}", flush=True)
    rows = []
    for N, K in args.shapes:
        rows += bench_shape(N, K, args.rows, args.repeats, ["fp32"] + [k for k in args.providers if k != "fp32"])
    write_results(args.name, rows, x="shape", y="gb_s", title=f"CPU decode GEMVs, {where}, {args.rows} row(s)",
                  xlabel="weight N x K", ylabel="weight bytes read (GB/s)", kind="bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
