"""Fused LM head + cross-entropy: time and peak memory per provider.

    python -m benchmarks.bench_cross_entropy [--vocab 32000 128256] [--tokens 4096 8192 16384] [--dim 4096]

Providers (bf16 x (N, d) and W (V, d), loss in fp32 like kernels.reference):
  triton         kernels.cross_entropy.linear_cross_entropy (chunked; grads computed in the forward)
  torch          eager, unfused: F.cross_entropy((x @ W.T).float(), t)
  torch.compile  the same function under torch.compile (the GEMM stays a GEMM, the rest fuses)
  liger          Liger-Kernel's fused linear cross-entropy, when it imports

Modes: fwd (loss only, inputs requiring grad, as in training), fwd+bwd (loss.backward() too),
bwd = fwd+bwd - fwd (the fused ops do their gradient work inside the forward, so a separately
timed backward would not compare like with like). For the same reason TFLOP/s (and % of the
measured bf16 matmul ceiling) is given for fwd+bwd only, counting the model's GEMM work
6*N*V*d (logits, grad_x, grad_W) whatever a provider actually executes. Peak memory is
torch.cuda.max_memory_allocated() during one fwd+bwd minus what was allocated before it (the
inputs), so it includes the grads of x and W that every provider has to produce.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import bench, measure_ceilings, require_cuda, write_results


def _providers() -> dict:
    from kernels.cross_entropy import linear_cross_entropy

    def unfused(x, w, t):
        return F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)

    out = {"triton": linear_cross_entropy, "torch": unfused, "torch.compile": torch.compile(unfused)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        print("liger-kernel not importable: skipping the liger provider")
    else:
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        out["liger"] = lambda x, w, t: liger(w, x, t)
    return out


def _peak_mib(step) -> float:
    """Peak bytes allocated by step() above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(fn, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, rep: int):
    """(fwd ms, fwd+bwd ms) as (median, p20, p80) triples, and the fwd+bwd peak MiB."""

    def fwd():
        return fn(x, w, t)

    def step():
        x.grad = w.grad = None
        fn(x, w, t).backward()

    step()  # compile / autotune / first allocations outside the measurements
    peak = _peak_mib(step)
    ms_fwd = bench(fwd, warmup=100, rep=rep)
    ms_all = bench(step, warmup=100, rep=rep)
    x.grad = w.grad = None
    return ms_fwd, ms_all, peak


def main() -> None:
    require_cuda("bench_cross_entropy")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rep", type=int, default=500, help="do_bench repetition budget (ms)")
    args = ap.parse_args()

    matmul_tflops, _ = measure_ceilings()
    print(f"measured bf16 matmul ceiling: {matmul_tflops:.0f} TFLOP/s")
    providers = _providers()
    d, dtype = args.dim, torch.bfloat16
    rows: list[dict] = []
    for V in args.vocab:
        for N in args.tokens:
            gen = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(N, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
            w = (torch.randn(V, d, device="cuda", dtype=dtype, generator=gen) * d**-0.5).requires_grad_()
            t = torch.randint(0, V, (N,), device="cuda", generator=gen)
            for name, fn in providers.items():
                try:
                    ms_fwd, ms_all, peak = _measure(fn, x, w, t, args.rep)
                except torch.cuda.OutOfMemoryError:
                    print(f"{name} V={V} N={N}: out of memory")
                    x.grad = w.grad = None
                    torch.cuda.empty_cache()
                    continue
                timings = {"fwd": ms_fwd, "fwd+bwd": ms_all,
                           "bwd": tuple(a - f for a, f in zip(ms_all, ms_fwd))}
                for mode, (med, p20, p80) in timings.items():
                    tflops = 6 * N * V * d / med / 1e9 if mode == "fwd+bwd" else None
                    rows.append({"provider": name, "V": V, "N": N, "d": d, "mode": mode, "panel": f"V={V} {mode}",
                                 "ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": tflops,
                                 "pct_matmul_peak": tflops and 100 * tflops / matmul_tflops, "peak_mib": peak,
                                 "logits_mib": N * V * 2 / 2**20})
                print(f"{name:>14} V={V:>6} N={N:>5}: fwd {ms_fwd[0]:8.2f} ms  fwd+bwd {ms_all[0]:8.2f} ms  "
                      f"peak {peak:9.0f} MiB")
            x = w = t = None
            torch.cuda.empty_cache()
    title = f"linear + cross-entropy, bf16, d={d}"
    write_results("cross_entropy", rows, x="N", y="ms", panels="panel", title=title, xlabel="rows N (tokens)",
                  ylabel="time (ms)")
    mem = [r for r in rows if r["mode"] == "fwd+bwd"]
    write_results("cross_entropy_memory", mem, x="N", y="peak_mib", panels="V", title=f"{title}: peak memory",
                  xlabel="rows N (tokens)", ylabel="peak memory (MiB)")


if __name__ == "__main__":
    main()
