"""RoPE on q and k: time, GB/s and % of measured copy bandwidth per provider.

    python -m benchmarks.bench_rope [--tokens 4096 8192 16384] [--heads 32:8 64:8] [--head-dim 128]

One op = rotate q (B, T, H, D) and k (B, T, Hkv, D) at positions 0..T-1 (B = 4 sequences, T =
tokens / 4); --heads lists H:Hkv pairs (32:8 is Llama-3 8B, hidden 4096; 64:8 is 70B, hidden 8192).
Providers:
  triton         kernels.rope.rope, called once for q and once for k
  torch          kernels.reference.rope_ref for q and k, eager
  torch.compile  the same two calls under torch.compile
  liger          Liger-Kernel's RoPE (q and k in one launch; it rotates in place), when it imports
Modes: fwd (inputs requiring grad), bwd (torch.autograd.grad on a retained graph), fwd+bwd.
Bytes, the same for every provider: fwd = read q, k + write q', k' + read the cos/sin rows used
(T x D/2 fp32 each); bwd = the same with dq, dk. GB/s = bytes / median time; % copy = GB/s / the
measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import inspect

import torch

from benchmarks.common import DTYPES, bandwidth_rows, copy_bandwidth, require_cuda, write_results

BATCH = 4


def _providers(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> dict:
    from kernels.reference import rope_ref
    from kernels.rope import rope

    def triton_qk(q, k):
        return rope(q, cos, sin, pos), rope(k, cos, sin, pos)

    def torch_qk(q, k):
        return rope_ref(q, cos, sin, pos), rope_ref(k, cos, sin, pos)

    out = {"triton": triton_qk, "torch": torch_qk, "torch.compile": torch.compile(torch_qk)}
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        print("liger-kernel not importable: skipping the liger provider")
        return out
    # Liger wants full-width tables (1, T, D) (both halves repeated) and, in most releases, q/k as
    # (B, H, T, D) views; newer releases take (B, T, H, D) and separate q / k tables.
    cos_full = torch.cat([cos[pos], cos[pos]], dim=-1)[None]
    sin_full = torch.cat([sin[pos], sin[pos]], dim=-1)[None]
    if "q_cos" in inspect.signature(LigerRopeFunction.forward).parameters:
        def liger(q, k):
            return LigerRopeFunction.apply(q, k, cos_full, sin_full, cos_full, sin_full)
    else:
        def liger(q, k):
            qo, ko = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full)
            return qo.transpose(1, 2), ko.transpose(1, 2)
    out["liger"] = liger
    return out


def main(argv: list[str] | None = None) -> None:
    require_cuda("bench_rope")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384], help="B * T, B = 4")
    ap.add_argument("--heads", nargs="+", default=["32:8", "64:8"], help="H:Hkv pairs")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition budget (ms)")
    args = ap.parse_args(argv)

    from llm.layers import rope_tables

    copy_tbs = copy_bandwidth()
    dtype, D = DTYPES[args.dtype], args.head_dim
    rows: list[dict] = []
    for heads in args.heads:
        H, Hkv = (int(v) for v in heads.split(":"))
        for tokens in args.tokens:
            T = tokens // BATCH
            cos, sin = rope_tables(D, T, theta=500000.0, device="cuda")
            pos = torch.arange(T, device="cuda")
            gen = torch.Generator(device="cuda").manual_seed(0)
            shapes = [(BATCH, T, H, D), (BATCH, T, Hkv, D)]
            inputs = [torch.randn(s, device="cuda", dtype=dtype, generator=gen).requires_grad_() for s in shapes]
            upstream = [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in shapes]
            qk_bytes = BATCH * T * (H + Hkv) * D * inputs[0].element_size()
            one_way = 2 * qk_bytes + 2 * T * (D // 2) * 4  # read + write q and k, read cos and sin rows
            nbytes = {"fwd": one_way, "bwd": one_way, "fwd+bwd": 2 * one_way}
            providers = _providers(cos, sin, pos)
            rows += bandwidth_rows(providers, providers["torch"], inputs, upstream, nbytes=nbytes, copy_tbs=copy_tbs,
                                   rep=args.rep, label=f"H={H} Hkv={Hkv} tokens={tokens:>5}",
                                   shape={"tokens": tokens, "H": H, "Hkv": Hkv, "D": D}, panel=f"H={H} Hkv={Hkv}")
            inputs = upstream = None
            torch.cuda.empty_cache()
    write_results("rope", rows, x="tokens", y="GB/s", panels="panel", title=f"RoPE on q and k, {args.dtype}, D={D}",
                  xlabel="tokens", ylabel="bandwidth (GB/s)")


if __name__ == "__main__":
    main()
