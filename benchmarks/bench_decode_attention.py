"""Decode attention (one new token against a KV cache): latency and achieved K/V bandwidth per provider.

    python -m benchmarks.bench_decode_attention [--lengths 1024 ... 65536] [--batches 1 16]
                                                [--heads 32] [--kv-heads 8] [--head-dim 128] [--tq 1]

Every row of the batch holds `length` valid entries of a (B, length, Hkv, D) bf16 cache (the layout
llm.kvcache keeps). Providers on the same cache:
  triton         kernels.decode.decode_attention (split-KV, no host sync on lengths)
  sdpa           F.scaled_dot_product_attention(enable_gqa=True) on the cache viewed as (B, Hkv, L, D)
                 (the dispatcher's backend; K/V repeated to H heads if this torch cannot do GQA)
  torch          eager grouped matmuls: q (B, Hkv, G*Tq, D) @ K^T, fp32 softmax, @ V
  torch.compile  the same function compiled (dynamic shapes, so one compile covers every length)
GB/s counts the K and V bytes read (2 * B * L * Hkv * D * 2), the traffic a decode step cannot avoid;
% is against the measured device-to-device copy bandwidth (bytes read + written) of `measure_ceilings`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import bench, measure_ceilings, require_cuda, write_results


def _grouped(q, k_cache, v_cache, L: int):
    """Eager reference-style decode: (B, Tq, H, D) against the first L cache entries, no K/V copies."""
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    G = H // Hkv
    qg = q.view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)
    k = k_cache[:, :L].permute(0, 2, 3, 1)  # (B, Hkv, D, L)
    v = v_cache[:, :L].permute(0, 2, 1, 3)  # (B, Hkv, L, D)
    s = (qg @ k).float() * D ** -0.5
    if Tq > 1:
        pos = L - Tq + torch.arange(Tq, device=q.device).repeat(G)
        s = s.masked_fill(torch.arange(L, device=q.device)[None, :] > pos[:, None], float("-inf"))
    o = s.softmax(-1).to(q.dtype) @ v  # (B, Hkv, G*Tq, D)
    return o.view(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)


def _sdpa_fn() -> Callable:
    def gqa(q, k_cache, v_cache, L):
        Tq = q.shape[1]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :L].transpose(1, 2),
                                           v_cache[:, :L].transpose(1, 2), is_causal=False, enable_gqa=True,
                                           attn_mask=_causal_tail(Tq, L, q.device))
        return o.transpose(1, 2)

    def repeat(q, k_cache, v_cache, L):
        G = q.shape[2] // k_cache.shape[2]
        k = k_cache[:, :L].repeat_interleave(G, dim=2).transpose(1, 2)
        v = v_cache[:, :L].repeat_interleave(G, dim=2).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=_causal_tail(q.shape[1], L, q.device))
        return o.transpose(1, 2)

    q = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    try:
        gqa(q, kv, kv, 8)
        return gqa
    except (RuntimeError, TypeError) as e:
        print(f"sdpa: enable_gqa unavailable ({str(e).splitlines()[0][:80]}); repeating K/V to H heads")
        return repeat


def _causal_tail(Tq: int, L: int, device) -> torch.Tensor | None:
    """Mask for Tq new tokens at the end of L keys (None for one token: it sees everything)."""
    if Tq == 1:
        return None
    pos = L - Tq + torch.arange(Tq, device=device)
    return torch.arange(L, device=device)[None, :] <= pos[:, None]


def main() -> None:
    require_cuda("bench_decode_attention")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tq", type=int, default=1, help="new tokens per row (1 = plain decoding)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition budget (ms)")
    args = ap.parse_args()

    from kernels.decode import decode_attention

    _, copy_tbs = measure_ceilings()
    print(f"measured copy bandwidth (read + write): {copy_tbs:.2f} TB/s")
    H, Hkv, D, Tq, dtype = args.heads, args.kv_heads, args.head_dim, args.tq, torch.bfloat16
    providers: dict[str, Callable] = {
        "triton": lambda q, k, v, L, lens: decode_attention(q, k, v, lens),
        "sdpa": (lambda f: lambda q, k, v, L, lens: f(q, k, v, L))(_sdpa_fn()),
        "torch": lambda q, k, v, L, lens: _grouped(q, k, v, L),
    }
    compiled = torch.compile(_grouped, dynamic=True)
    providers["torch.compile"] = lambda q, k, v, L, lens: compiled(q, k, v, L)

    rows: list[dict] = []
    for B in args.batches:
        for L in args.lengths:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, Tq, H, D, device="cuda", dtype=dtype, generator=gen)
            k = torch.randn(B, L, Hkv, D, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn(B, L, Hkv, D, device="cuda", dtype=dtype, generator=gen)
            lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
            kv_bytes = 2 * B * L * Hkv * D * k.element_size()
            ref = None
            for name, fn in providers.items():
                step = lambda fn=fn, q=q, k=k, v=v, L=L, lens=lens: fn(q, k, v, L, lens)
                try:
                    with torch.inference_mode():
                        out = step()
                        ref = out.float() if ref is None else ref
                        err = (out.float() - ref).abs().max().item()
                        med, p20, p80 = bench(step, rep=args.rep)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    print(f"{name:>14} B={B:>2} L={L:>6}: skipped ({str(e).splitlines()[0][:100]})")
                    torch.cuda.empty_cache()
                    continue
                gbs = kv_bytes / med / 1e6
                rows.append({"provider": name, "B": B, "L": L, "H": H, "Hkv": Hkv, "D": D, "Tq": Tq,
                             "panel": f"batch {B}", "ms": med, "ms_p20": p20, "ms_p80": p80, "us": 1e3 * med,
                             "gbps": gbs, "pct_copy_bw": 100 * gbs / (copy_tbs * 1e3)})
                print(f"{name:>14} B={B:>2} L={L:>6}: {1e3 * med:9.1f} us  {gbs:7.0f} GB/s  "
                      f"({100 * gbs / (copy_tbs * 1e3):5.1f}% of copy)  |out - first| {err:.2e}")
            q = k = v = None
            torch.cuda.empty_cache()
    title = f"decode attention bf16, H={H} Hkv={Hkv} D={D} Tq={Tq}"
    write_results("decode_attention", rows, x="L", y="gbps", panels="panel", title=title,
                  xlabel="KV length L (tokens)", ylabel="bandwidth (GB/s)")
    write_results("decode_attention_latency", rows, x="L", y="us", panels="panel", title=f"{title}: latency",
                  xlabel="KV length L (tokens)", ylabel="latency (us)")


if __name__ == "__main__":
    main()
