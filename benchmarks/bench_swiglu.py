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

from benchmarks.common import DTYPES, bandwidth_rows, copy_bandwidth, require_cuda, write_results


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

    copy_tbs = copy_bandwidth()
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
            rows += bandwidth_rows(providers, swiglu_ref, inputs, upstream, nbytes=nbytes, copy_tbs=copy_tbs,
                                   rep=args.rep, label=f"N={N:>5} F={F:>5}", shape={"N": N, "F": F}, panel=f"F={F}")
            inputs = upstream = None
            torch.cuda.empty_cache()
    write_results("swiglu", rows, x="N", y="GB/s", panels="panel", title=f"SwiGLU, {args.dtype}", xlabel="rows N",
                  ylabel="bandwidth (GB/s)")


if __name__ == "__main__":
    main()
