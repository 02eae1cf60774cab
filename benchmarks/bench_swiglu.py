"""SwiGLU silu(gate) * up: time, GB/s and % of measured copy bandwidth per provider.

    python -m benchmarks.bench_swiglu [--rows 4096 8192 16384] [--width 4096 8192 14336] [--dtype bf16]

gate and up are (N, F) in --dtype (F = the MLP's intermediate width; 14336 is Llama-3 8B's).
Providers:
  triton         kernels.swiglu.swiglu
  torch          kernels.reference.swiglu_ref, eager
  torch.compile  the same reference under torch.compile
  liger          Liger-Kernel's SiLU-mul (its backward overwrites the saved gate / up with their
                 gradients, which repeated timing tolerates), when it imports
Modes: fwd (inputs requiring grad), bwd (torch.autograd.grad on a retained graph), fwd+bwd.
Bytes, the same for every provider: fwd = read gate, up + write y; bwd = read dy, gate, up + write
d gate, d up. GB/s = bytes / median time; % copy = GB/s / the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_rmsnorm import DTYPES, max_error, raise_recompile_limit, time_modes
from benchmarks.common import measure_ceilings, require_cuda, write_results


def _providers() -> dict:
    from kernels.reference import swiglu_ref
    from kernels.swiglu import swiglu

    out = {"triton": swiglu, "torch": swiglu_ref, "torch.compile": torch.compile(swiglu_ref)}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        print("liger-kernel not importable: skipping the liger provider")
    else:
        out["liger"] = lambda gate, up: LigerSiLUMulFunction.apply(gate, up)
    return out


def main(argv: list[str] | None = None) -> None:
    require_cuda("bench_swiglu")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--width", type=int, nargs="+", default=[4096, 8192, 14336])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition budget (ms)")
    args = ap.parse_args(argv)

    from kernels.reference import swiglu_ref

    raise_recompile_limit()
    _, copy_tbs = measure_ceilings()
    print(f"measured copy bandwidth: {copy_tbs:.2f} TB/s (bytes read + written)")
    dtype = DTYPES[args.dtype]
    providers = _providers()
    rows: list[dict] = []
    for F in args.width:
        for N in args.rows:
            gen = torch.Generator(device="cuda").manual_seed(0)
            inputs = [torch.randn(N, F, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(2)]
            upstream = [torch.randn(N, F, device="cuda", dtype=dtype, generator=gen)]
            e = inputs[0].element_size()
            nbytes = {"fwd": 3 * N * F * e, "bwd": 5 * N * F * e, "fwd+bwd": 8 * N * F * e}
            for name, fn in providers.items():
                try:
                    err = max_error(fn, swiglu_ref, inputs)
                    timings = time_modes(fn, inputs, upstream, args.rep)
                except Exception as ex:  # one provider failing (OOM, API drift) must not stop the others
                    print(f"{name} N={N} F={F}: {type(ex).__name__}: {ex}")
                    torch.cuda.empty_cache()
                    continue
                for mode, (med, p20, p80) in timings.items():
                    gbps = nbytes[mode] / med / 1e6
                    rows.append({"provider": name, "N": N, "F": F, "mode": mode, "panel": f"F={F} {mode}",
                                 "ms": med, "ms_p20": p20, "ms_p80": p80, "GB/s": gbps,
                                 "pct_copy": 100 * gbps / (copy_tbs * 1e3), "max_err": err})
                print(f"{name:>14} N={N:>5} F={F:>5}: " + "  ".join(
                    f"{m} {t[0]:.3f} ms {nbytes[m] / t[0] / 1e6:6.0f} GB/s" for m, t in timings.items())
                    + f"  (max err {err:.2g})")
            inputs = upstream = None
            torch.cuda.empty_cache()
    write_results("swiglu", rows, x="N", y="GB/s", panels="panel", title=f"SwiGLU, {args.dtype}")


if __name__ == "__main__":
    main()
