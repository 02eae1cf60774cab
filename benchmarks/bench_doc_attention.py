"""Document-masked attention (packed rows) against full causal attention: work skipped and time.

    python -m benchmarks.bench_doc_attention --tiles        # any machine: tile counts under TRITON_INTERPRET=1
    python -m benchmarks.bench_doc_attention [--seqlens 2048 4096 8192] [--tokens 16384] [--head-dim 128]

--tiles runs kernels/attention.py's doc_attention in the interpreter (T = 512, interpreter tiles) and counts the
tl.dot calls it executes, forward and backward, for documents of mean length T/2 .. T/16 (fixed and random
lengths), next to full causal attention: the work done as a fraction of causal, against the fraction of
(query, key) pairs the block-diagonal mask leaves visible. Without --tiles (CUDA only): bf16 time of fwd and
fwd+bwd, causal vs document-masked at mean document length T/8 (random lengths, seeded), B * T = --tokens.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import bench, require_cuda, write_results


def random_lengths(T: int, mean: int, gen: torch.Generator) -> list[int]:
    """Document lengths summing to T, uniform in [1, 2 * mean - 1] (the last one cut to fit)."""
    out, left = [], T
    while left > 0:
        n = min(left, int(torch.randint(1, 2 * mean, (1,), generator=gen)))
        out.append(n)
        left -= n
    return out


def segments(B: int, T: int, mean: int | None, seed: int = 0, fixed: bool = False) -> torch.Tensor | None:
    if mean is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    rows = [[mean] * (T // mean) if fixed else random_lengths(T, mean, gen) for _ in range(B)]
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in rows])


def visible_fraction(seg: torch.Tensor | None, T: int) -> float:
    if seg is None:
        return 1.0
    pairs = sum(sum(n * (n + 1) // 2 for n in torch.unique_consecutive(row, return_counts=True)[1].tolist())
                for row in seg)
    return pairs / (seg.shape[0] * T * (T + 1) / 2)


def tiles(T: int = 512) -> list[dict]:
    """Dot calls of causal vs document-masked attention in the interpreter (fwd, and fwd+bwd)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: @triton.jit reads it then
    import triton.runtime.interpreter as interp

    from kernels.attention import attention, doc_attention

    calls = {"n": 0}
    real = interp.InterpreterBuilder.create_dot

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    interp.InterpreterBuilder.create_dot = counting
    q, k, v = (torch.randn(1, T, 1, 16, requires_grad=True) for _ in range(3))
    rows, base = [], None
    for name, mean, fixed in [("causal", None, True), ("T/2", T // 2, True), ("T/4", T // 4, True),
                              ("T/8", T // 8, True), ("T/16", T // 16, True), ("T/8 random", T // 8, False)]:
        seg = segments(1, T, mean, fixed=fixed)
        calls["n"] = 0
        o = attention(q, k, v) if seg is None else doc_attention(q, k, v, seg)
        fwd = calls["n"]
        o.backward(torch.randn_like(o))
        total = calls["n"]
        base = base or (fwd, total)
        rows.append(dict(documents=name, T=T, fwd_dots=fwd, fwd_bwd_dots=total, visible=visible_fraction(seg, T),
                         fwd_work=fwd / base[0], fwd_bwd_work=total / base[1]))
    interp.InterpreterBuilder.create_dot = real
    return rows


def _time_modes(q, k, v, do, seg) -> dict[str, tuple[float, float]]:
    """{mode: (causal ms, document-masked ms)} for fwd and fwd+bwd."""
    from kernels.attention import attention, doc_attention

    fns = (lambda: attention(q, k, v), lambda: doc_attention(q, k, v, seg))
    fwd = tuple(bench(f)[0] for f in fns)
    both = tuple(bench(lambda f=f: torch.autograd.grad(f(), (q, k, v), do))[0] for f in fns)
    return {"fwd": fwd, "fwd+bwd": both}


def timings(seqlens: list[int], tokens: int, D: int, H: int) -> list[dict]:
    rows = []
    for T in seqlens:
        B = max(1, tokens // T)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        seg = segments(B, T, T // 8)
        for mode, (causal, doc) in _time_modes(q, k, v, torch.randn_like(q), seg.cuda()).items():
            rows.append(dict(T=T, B=B, mode=mode, causal_ms=causal, doc_ms=doc, speedup=causal / doc,
                             visible=visible_fraction(seg, T)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", action="store_true", help="count tile work in the interpreter (CPU, no GPU needed)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=16384, help="B * T per measurement")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args()
    if args.tiles:
        write_results("doc_attention_tiles", tiles(), x="documents", y="fwd_work", series="T", legend="T (tokens)",
                      xlabel="document length", ylabel="forward work vs causal (tl.dot calls)",
                      title="document-masked attention: work (tl.dot calls) vs causal")
        return
    require_cuda("bench_doc_attention")
    write_results("doc_attention", timings(args.seqlens, args.tokens, args.head_dim, args.heads), x="T",
                  y="speedup", series="mode", title="document-masked (mean length T/8) vs causal attention, bf16",
                  xlabel="sequence length T (tokens)", ylabel="speedup vs causal (x)")


if __name__ == "__main__":
    main()
