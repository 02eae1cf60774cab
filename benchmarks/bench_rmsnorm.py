"""RMSNorm and fused residual-add + RMSNorm: time, GB/s and % of measured copy bandwidth per provider.

    python -m benchmarks.bench_rmsnorm [--rows 4096 8192 16384] [--hidden 4096 8192] [--dtype bf16]

Providers (x (N, C) in --dtype, an fp32 weight as in mixed-precision training):
  triton         kernels.rmsnorm.rms_norm / add_rms_norm
  torch          kernels.reference.rms_norm_ref / add_rms_norm_ref, eager
  torch.compile  the same reference under torch.compile
  liger          Liger-Kernel's RMSNorm / fused add RMSNorm (casting_mode "gemma": all math in fp32,
                 like ours; in_place=False so dy is not overwritten between repetitions), when it imports

Modes: fwd (inputs requiring grad, as in training), bwd (torch.autograd.grad on a retained graph, so
nothing accumulates into .grad), fwd+bwd. Bytes follow ANCHORS.md, the same count for every provider
(what the op must move, not what a provider happens to move):
  rms_norm      fwd = read x + write y + read w;  bwd = read x, dy, rstd + write dx + read w, write dw
  add_rms_norm  fwd = read x, residual + write h, y + read w;  bwd = read h, dy, dh, rstd + write dx
                (the residual's gradient is the same tensor) + read w, write dw
GB/s = bytes / median time; % copy = GB/s / the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import DTYPES, bandwidth_rows, copy_bandwidth, require_cuda, write_results

EPS = 1e-6


def _providers(op: str) -> dict:
    from kernels import reference as ref
    from kernels.rmsnorm import add_rms_norm, rms_norm

    if op == "rms_norm":
        out = {"triton": rms_norm, "torch": ref.rms_norm_ref, "torch.compile": torch.compile(ref.rms_norm_ref)}
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        except ImportError:
            print("liger-kernel not importable: skipping the liger provider")
        else:
            out["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "gemma", False)
        return out
    out = {"triton": add_rms_norm, "torch": ref.add_rms_norm_ref,
           "torch.compile": torch.compile(ref.add_rms_norm_ref)}
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except ImportError:
        pass
    else:
        def liger(x, r, w, eps):
            y, h = LigerFusedAddRMSNormFunction.apply(x, r, w, eps, 0.0, "gemma", False)
            return h, y

        out["liger"] = liger
    return out


def _bytes(op: str, N: int, C: int, e: int, we: int) -> dict[str, int]:
    """Bytes each mode must move: e = activation element size, we = weight element size."""
    big = 2 if op == "rms_norm" else 4  # (N, C) tensors read + written in fwd
    fwd = big * N * C * e + C * we
    bwd = (3 if op == "rms_norm" else 4) * N * C * e + 4 * N + 2 * C * we
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, grad: bool = False) -> torch.Tensor:
    return torch.randn(shape, device="cuda", dtype=dtype, generator=gen).requires_grad_(grad)


def main(argv: list[str] | None = None) -> None:
    require_cuda("bench_rmsnorm")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--ops", nargs="+", choices=["rms_norm", "add_rms_norm"], default=["rms_norm", "add_rms_norm"])
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition budget (ms)")
    args = ap.parse_args(argv)

    copy_tbs = copy_bandwidth()
    dtype = DTYPES[args.dtype]
    from kernels import reference as ref

    for op in args.ops:
        providers = _providers(op)
        reference = ref.rms_norm_ref if op == "rms_norm" else ref.add_rms_norm_ref
        rows: list[dict] = []
        for C in args.hidden:
            for N in args.rows:
                gen = torch.Generator(device="cuda").manual_seed(0)
                x, w = _randn((N, C), dtype, gen, True), _randn((C,), torch.float32, gen, True)
                if op == "rms_norm":
                    inputs, upstream = [x, w], [_randn((N, C), dtype, gen)]
                else:
                    r = _randn((N, C), dtype, gen, True)
                    inputs, upstream = [x, r, w], [_randn((N, C), dtype, gen), _randn((N, C), dtype, gen)]
                rows += bandwidth_rows(providers, reference, inputs, upstream, args=(EPS,),
                                       nbytes=_bytes(op, N, C, x.element_size(), w.element_size()),
                                       copy_tbs=copy_tbs, rep=args.rep, label=f"{op} N={N:>5} C={C:>5}",
                                       shape={"N": N, "C": C}, panel=f"C={C}")
                inputs = upstream = x = w = r = None
                torch.cuda.empty_cache()
        write_results(op, rows, x="N", y="GB/s", panels="panel", title=f"{op}, {args.dtype}, fp32 weight",
                      xlabel="rows N", ylabel="bandwidth (GB/s)")


if __name__ == "__main__":
    main()
