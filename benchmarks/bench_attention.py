"""Attention forward / backward: TFLOP/s per provider and % of the measured matmul ceiling.

    python -m benchmarks.bench_attention [--head-dims 64 128] [--seqlens 512 ... 16384] [--tokens 16384]
                                         [--model-dim 2048] [--non-causal] [--providers triton sdpa-flash ...]

Sweep (defaults): bf16, causal, MHA, B * T = 16k tokens, H = model_dim / head_dim (16 heads of 128 or
32 of 64, as FlashAttention's own benchmarks), T = 512 .. 16k. Providers, each in its native layout:
  triton          kernels.attention.attention on (B, T, H, D)
  sdpa-flash      F.scaled_dot_product_attention on (B, H, T, D) under sdpa_kernel(FLASH_ATTENTION)
  sdpa-cudnn      the same under sdpa_kernel(CUDNN_ATTENTION)
  sdpa-efficient  the same under sdpa_kernel(EFFICIENT_ATTENTION)
  flex            torch.compile(flex_attention) with a causal block mask (the torch.compile provider)
  naive           eager softmax(Q K^T) V with (B, H, T, T) fp32 scores; skipped above --naive-gib
A provider that cannot run a shape (backend unavailable, out of memory) is reported and skipped.
Modes: fwd (inputs require grad, as in training), bwd (autograd.grad of a retained graph), fwd+bwd.
FLOPs: fwd 4*B*H*T*T*D (x0.5 causal), bwd 2.5x fwd, fwd+bwd 3.5x fwd, whatever a provider executes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import bench, measure_ceilings, require_cuda, write_results

PROVIDERS = ("triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "naive")


def _sdpa(backend, causal: bool) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def _naive(causal: bool) -> Callable:
    def fn(q, k, v):  # (B, H, T, D)
        s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if causal:
            T = q.shape[2]
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return s.softmax(-1).to(q.dtype) @ v
    return fn


def _providers(names: list[str], causal: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v, T) returning a callable on that provider's layout, or None if unavailable."""
    from torch.nn.attention import SDPBackend

    from kernels.attention import attention

    out: dict[str, Callable] = {}
    for name in names:
        if name == "triton":
            out[name] = lambda T: (lambda q, k, v: attention(q, k, v, causal=causal))
        elif name.startswith("sdpa-"):
            backend = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                       "sdpa-efficient": "EFFICIENT_ATTENTION"}[name]
            if not hasattr(SDPBackend, backend):
                print(f"{name}: SDPBackend.{backend} not in this torch; skipped")
                continue
            fn = _sdpa(getattr(SDPBackend, backend), causal)
            out[name] = lambda T, fn=fn: fn
        elif name == "flex":
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            except ImportError:
                print("flex: torch.nn.attention.flex_attention not importable; skipped")
                continue
            flex = torch.compile(flex_attention)

            def make(T, flex=flex, create_block_mask=create_block_mask):
                mask = None
                if causal:
                    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
                return lambda q, k, v: flex(q, k, v, block_mask=mask)
            out[name] = make
        elif name == "naive":
            fn = _naive(causal)
            out[name] = lambda T, fn=fn: fn
        else:
            raise SystemExit(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return out


def _time(fn: Callable, q, k, v, do, rep: int) -> dict[str, tuple[float, float, float]]:
    """fwd, bwd, fwd+bwd as (median, p20, p80) ms."""
    leaves = (q, k, v)
    o = fn(q, k, v)
    torch.autograd.grad(o, leaves, do, retain_graph=True)  # compile / autotune outside the timings
    res = {"fwd": bench(lambda: fn(q, k, v), rep=rep),
           "bwd": bench(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True), rep=rep),
           "fwd+bwd": bench(lambda: torch.autograd.grad(fn(q, k, v), leaves, do), rep=rep)}
    return res


def main() -> None:
    require_cuda("bench_attention")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, default=16384, help="B * T for every sequence length")
    ap.add_argument("--model-dim", type=int, default=2048, help="H = model_dim / head_dim")
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--naive-gib", type=float, default=8.0, help="skip naive when its fp32 scores exceed this")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition budget (ms)")
    args = ap.parse_args()
    causal = not args.non_causal

    matmul_tflops, _ = measure_ceilings()
    print(f"measured bf16 matmul ceiling: {matmul_tflops:.0f} TFLOP/s")
    providers = _providers(args.providers, causal)
    dtype = torch.bfloat16
    rows: list[dict] = []
    for D in args.head_dims:
        H = args.model_dim // D
        for T in args.seqlens:
            B = max(1, args.tokens // T)
            gen = torch.Generator(device="cuda").manual_seed(0)
            base = [torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]
            flops_fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            ref = None
            for name, make in providers.items():
                if name == "naive" and B * H * T * T * 4 > args.naive_gib * 2**30:
                    print(f"{name:>15} D={D} T={T:>5}: scores would exceed {args.naive_gib} GiB; skipped")
                    continue
                # triton reads (B, T, H, D); everything else (B, H, T, D), contiguous in its own layout.
                q, k, v, do = (x if name == "triton" else x.transpose(1, 2).contiguous() for x in base)
                q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
                try:
                    fn = make(T)
                    with torch.no_grad():
                        o = fn(q, k, v)
                    o = o if name == "triton" else o.transpose(1, 2)
                    ref = o.float() if ref is None else ref
                    err = (o.float() - ref).abs().max().item()
                    res = _time(fn, q, k, v, do, args.rep)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # no kernel for this shape, OOM
                    print(f"{name:>15} D={D} T={T:>5}: skipped ({str(e).splitlines()[0][:100]})")
                    torch.cuda.empty_cache()
                    continue
                for mode, (med, p20, p80) in res.items():
                    flops = flops_fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
                    tflops = flops / med / 1e9
                    rows.append({"provider": name, "D": D, "T": T, "B": B, "H": H, "mode": mode,
                                 "panel": f"hd={D} {mode}", "ms": med, "ms_p20": p20, "ms_p80": p80,
                                 "tflops": tflops, "pct_matmul_peak": 100 * tflops / matmul_tflops})
                print(f"{name:>15} D={D} T={T:>5} B={B:>2}: " + "  ".join(
                    f"{m} {r[0]:7.3f} ms" for m, r in res.items())
                    + f"  fwd {flops_fwd / res['fwd'][0] / 1e9:6.1f} TFLOP/s  |out - first| {err:.2e}")
                q = k = v = do = o = None
                torch.cuda.empty_cache()
    kind = "causal" if causal else "full"
    write_results(f"attention_{kind}", rows, x="T", y="tflops", panels="panel",
                  title=f"attention bf16 {kind}, B*T={args.tokens}, model dim {args.model_dim}",
                  xlabel="sequence length T (tokens)", ylabel="TFLOP/s")


if __name__ == "__main__":
    main()
