"""CPU prefill through int8 / int4 weights: the block-by-block dequantization (kernels/cpu_prefill.py) against the
whole-weight references and fp32, per linear and for a whole prompt, side by side in one process.

    python -m benchmarks.bench_cpu_prefill [--shapes 1536x512 1408x512 512x1408 2048x1024 2816x1024 1024x2816]
                                           [--rows 128] [--model hf-16x1024] [--threads 1] [--repeats 5]

Per weight shape N x K (defaults: the hf-8x512 and hf-16x1024 imports' linears, fused q/k/v, w1 = w3, w2) and
x (rows, K) fp32, providers compute y = x @ W^T with W held as
  fp32          F.linear on the fp32 weight (the floor: no dequantization at all)
  int8 ref      kernels.reference.int8_matmul_ref (the whole weight dequantized, one GEMM)
  int8 chunked  kernels.cpu_prefill.int8_matmul (CHUNK output rows dequantized into one buffer per GEMM)
  int4 ref / int4 chunked   the same for group-64 int4
Then the time to first token of a `--rows`-token prompt on `--model` (llm sample's prefill: the whole model,
eager) for fp32, int8 and int4 weights, with the chunked path and with the reference forced. Medians of
`--repeats` interleaved rounds; 'vs ref' is the reference's time over the chunked one's, 'vs fp32' fp32's
time over the provider's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_decode import IMPORTED, build_imported
from benchmarks.common import device_name, threads_text, weight_shape, write_results
from kernels import cpu_prefill
from kernels import reference as ref
from llm import ops
from llm.quant import make_scheme, quantize_int4, quantize_int8, quantize_model


def _median_ms(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median ms, spread ms) over `repeats` interleaved rounds, after one warm-up call each."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: (statistics.median(v), max(v) - min(v)) for k, v in times.items()}


def bench_shape(N: int, K: int, M: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    x = torch.randn(M, K)
    q8, s8 = quantize_int8(w)
    q4, s4, z4 = quantize_int4(w, 64)
    res = _median_ms({"fp32": lambda: F.linear(x, w),
                      "int8 ref": lambda: ref.int8_matmul_ref(x, q8, s8),
                      "int8 chunked": lambda: cpu_prefill.int8_matmul(x, q8, s8),
                      "int4 ref": lambda: ref.int4_matmul_ref(x, q4, s4, z4, 64),
                      "int4 chunked": lambda: cpu_prefill.int4_matmul(x, q4, s4, z4, 64)}, repeats)
    rows = []
    for k, (ms, spread) in res.items():
        base = res[k.replace("chunked", "ref")][0] if k.endswith("chunked") else None
        rows.append(dict(case=f"{N}x{K}", rows=M, provider=k, ms=ms, spread_ms=spread, vs_fp32=res["fp32"][0] / ms,
                         vs_ref=base / ms if base else None))
        print(f"{N}x{K:<6d} M{M} {k:13s} {ms:8.2f} ms (spread {spread:5.2f})  x{res['fp32'][0] / ms:.2f} vs fp32"
              + (f"  x{base / ms:.2f} vs ref" if base else ""), flush=True)
    return rows


def bench_model(name: str, M: int, repeats: int) -> list[dict]:
    """TTFT of an M-token prompt: the model's forward over the prompt (logits of the last position)."""
    fp32, _ = build_imported(name, M, torch.device("cpu"), torch.float32)
    models = {"fp32": fp32}
    for mode, group in (("int8", None), ("int4", 64)):
        m, _ = build_imported(name, M, torch.device("cpu"), torch.float32)
        quantize_model(m, make_scheme(mode, group))
        models[mode] = m
    ids = torch.randint(0, fp32.cfg.vocab_size, (1, M))
    real = ops._cpu_prefill

    def prefill(m, chunked: bool):
        def run():
            ops._cpu_prefill = real if chunked else (lambda kernels, x: False)
            try:
                with torch.inference_mode():
                    m(ids)
            finally:
                ops._cpu_prefill = real
        return run

    fns = {"fp32": prefill(models["fp32"], True)}
    for mode in ("int8", "int4"):
        fns[f"{mode} ref"] = prefill(models[mode], False)
        fns[f"{mode} chunked"] = prefill(models[mode], True)
    res = _median_ms(fns, repeats)
    rows = []
    for k, (ms, spread) in res.items():
        base = res[k.replace("chunked", "ref")][0] if k.endswith("chunked") else None
        rows.append(dict(case=f"{name} prompt", rows=M, provider=k, ms=ms, spread_ms=spread,
                         vs_fp32=res["fp32"][0] / ms, vs_ref=base / ms if base else None))
        print(f"{name} prompt {M} {k:13s} {ms:8.1f} ms (spread {spread:6.1f})  x{res['fp32'][0] / ms:.2f} vs fp32"
              + (f"  x{base / ms:.2f} vs ref" if base else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=weight_shape,
                   default=[(1536, 512), (1408, 512), (512, 1408), (2048, 1024), (2816, 1024), (1024, 2816)],
                   help="weight shapes N x K")
    p.add_argument("--rows", type=int, default=128, help="prompt tokens (rows of x)")
    p.add_argument("--model", default="hf-16x1024", choices=[*IMPORTED, "none"],
                   help="whole-prompt TTFT on this imported model (none: skip)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per provider, median")
    p.add_argument("--name", default="bench_cpu_prefill", help="result file name under benchmarks/results/<device>/")
    args = p.parse_args(argv)
    if args.rows <= ops.CPU_WOQ_MAX_M:
        p.error(f"--rows must be above {ops.CPU_WOQ_MAX_M} (fewer rows are decode: the C GEMVs, bench_cpu_gemv)")
    torch.set_num_threads(args.threads)
    threads = threads_text(args.threads)
    print(f"CPU prefill through quantized weights on {device_name()} (CPU, {threads}): {args.rows} rows, "
          f"median of {args.repeats}", flush=True)
    rows = []
    for N, K in args.shapes:
        rows += bench_shape(N, K, args.rows, args.repeats)
    if args.model != "none":
        rows += bench_model(args.model, args.rows, args.repeats)
    write_results(args.name, rows, x="case", y="vs_fp32",
                  title=f"CPU prefill, {args.rows} rows, {device_name()} (CPU, {threads})",
                  xlabel="weight N x K, or whole prompt", ylabel="speed vs fp32 F.linear (x, higher is better)",
                  kind="bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
