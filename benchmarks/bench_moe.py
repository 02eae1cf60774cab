"""Routed MoE experts: the grouped Triton kernel against a per-expert loop and torch._grouped_mm.

    python -m benchmarks.bench_moe [--shapes mixtral deepseek] [--decode-tokens 1 4 16] [--train-tokens 8192]

Providers (bf16 x (N, d), w_gate/w_up (E, F, d), w_down (E, d, F), fp32 routing weights):
  triton      kernels.moe.moe_experts: sorted tokens, gate+up GEMM with SwiGLU epilogue, down GEMM with
              the routing weight and the scatter-add fused; no host synchronization
  loop        one bf16 GEMM chain per expert with torch.where / index_add_ (Hugging Face Mixtral's way;
              a host sync per expert)
  grouped_mm  torch._grouped_mm over the sorted tokens (gate and up as one (E, d, 2F) weight), torch
              SwiGLU, weight multiply and index_add_; only where the installed torch has it
Shapes: `mixtral` (d 4096, F 14336, E 8, top-2) and `deepseek` (fine-grained: d 2048, F 1408, E 64,
top-6). Decode (1-16 tokens, forward without autograd, as sampling runs it) reports TB/s of expert
weights read; training (8k tokens) reports fwd, bwd (= fwd+bwd - fwd) and fwd+bwd in TFLOP/s of the
active expert FLOPs (2 * N * k * 3 * d * F forward, twice that backward), and % of the measured bf16
matmul ceiling.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import bench, measure_ceilings, require_cuda, write_results

SHAPES = {"mixtral": dict(d=4096, F=14336, E=8, k=2), "deepseek": dict(d=2048, F=1408, E=64, k=6)}


def loop(x, w_gate, w_up, w_down, idx, weight):
    """Per-expert bf16 loop (HF Mixtral style)."""
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        rows, slot = torch.where(idx == e)
        if rows.numel() == 0:
            continue
        xe = x[rows]
        h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())
        out = out.index_add(0, rows, (h @ w_down[e].t()) * weight[rows, slot, None].to(x.dtype))
    return out


def make_grouped_mm(w_gate, w_up):
    """torch._grouped_mm provider; the fused (E, d, 2F) gate|up weight is built once, as a model would store it."""
    w13 = torch.cat([w_gate, w_up], 1).detach().requires_grad_(w_gate.requires_grad)  # (E, 2F, d)

    def grouped_mm(x, w_gate_, w_up_, w_down, idx, weight):
        E, Fh = w_down.shape[0], w_down.shape[2]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // idx.shape[1]
        offs = torch.searchsorted(flat[order], torch.arange(E, device=x.device), right=True).to(torch.int32)
        gu = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)  # (R, 2F)
        h = F.silu(gu[:, :Fh]) * gu[:, Fh:]
        y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs) * weight.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add(0, tok, y)

    return grouped_mm, w13


def inputs(N: int, d: int, Fh: int, E: int, k: int, grad: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(N, d, device="cuda", dtype=dt, generator=g)
    ws = [torch.randn(E, Fh, d, device="cuda", dtype=dt, generator=g) * d**-0.5,
          torch.randn(E, Fh, d, device="cuda", dtype=dt, generator=g) * d**-0.5,
          torch.randn(E, d, Fh, device="cuda", dtype=dt, generator=g) * Fh**-0.5]
    logits = torch.randn(N, E, device="cuda", generator=g)
    weight, idx = logits.softmax(-1).topk(k, -1)
    weight = weight / weight.sum(-1, keepdim=True)
    return [t.requires_grad_(grad) for t in (x, *ws)], idx, weight.requires_grad_(grad)


def providers(w_gate, w_up) -> dict:
    from kernels.moe import moe_experts

    out = {"triton": (moe_experts, []), "loop": (loop, [])}
    if hasattr(torch, "_grouped_mm"):
        fn, w13 = make_grouped_mm(w_gate, w_up)
        out["grouped_mm"] = (fn, [w13])
    else:
        print("torch._grouped_mm not in this torch: skipping that provider")
    return out


def main() -> int:
    require_cuda("bench_moe")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--decode-tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--train-tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition budget (ms)")
    args = ap.parse_args()

    matmul_tflops, copy_tbs = measure_ceilings()
    print(f"measured ceilings: bf16 matmul {matmul_tflops:.0f} TFLOP/s, copy {copy_tbs:.2f} TB/s")
    rows: list[dict] = []
    for shape in args.shapes:
        s = SHAPES[shape]
        d, Fh, E, k = s["d"], s["F"], s["E"], s["k"]
        for phase, tokens in (("decode", args.decode_tokens), ("train", args.train_tokens)):
            for N in tokens:
                (x, wg, wu, wd), idx, weight = inputs(N, d, Fh, E, k, grad=phase == "train")
                args_ = (x, wg, wu, wd, idx, weight)
                active = int(idx.unique().numel())
                flops = 2 * N * k * 3 * d * Fh
                wbytes = active * 3 * d * Fh * 2
                for name, (fn, extra) in providers(wg, wu).items():
                    params = [t for t in (x, wg, wu, wd, weight, *extra) if t.requires_grad]
                    try:
                        timings = _time(fn, args_, params, phase == "train", args.rep)
                    except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. _grouped_mm needs sm_90
                        print(f"{name} {shape} N={N}: failed: {str(e).splitlines()[0]}")
                        continue
                    for mode, (med, p20, p80) in timings.items():
                        work = flops * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)
                        tflops = work / med / 1e9
                        tbs = wbytes / med / 1e9 if phase == "decode" else None
                        rows.append({"provider": name, "shape": shape, "phase": phase, "N": N, "E": E, "k": k,
                                     "d": d, "F": Fh, "mode": mode, "panel": f"{shape} {phase} {mode}",
                                     "ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": tflops,
                                     "pct_matmul_peak": 100 * tflops / matmul_tflops, "weight_tbs": tbs,
                                     "pct_copy_peak": tbs and 100 * tbs / copy_tbs})
                    print(f"{name:>11} {shape:>8} {phase:>6} N={N:>5}: " +
                          "  ".join(f"{m} {t[0]:.3f} ms" for m, t in timings.items()))
                for p in (x, wg, wu, wd, weight):
                    p.grad = None
                torch.cuda.empty_cache()
    _speedups(rows)
    write_results("moe", rows, x="N", y="ms", panels="panel", title="MoE experts, bf16", xlabel="tokens N",
                  ylabel="time (ms)")
    return 0


def _time(fn, args_: tuple, params: list[torch.Tensor], train: bool, rep: int) -> dict:
    """{mode: (median, p20, p80) ms}: fwd (no autograd for decode), and for training fwd+bwd and bwd."""
    dy = torch.randn_like(args_[0])

    def fwd():
        with torch.enable_grad() if train else torch.no_grad():
            return fn(*args_)

    def step():
        for p in params:
            p.grad = None
        fn(*args_).backward(dy)

    fwd()  # compile / first allocations outside the measurement
    timings = {"fwd": bench(fwd, rep=rep)}
    if train:
        step()
        timings["fwd+bwd"] = bench(step, rep=rep)
        timings["bwd"] = tuple(a - f for a, f in zip(timings["fwd+bwd"], timings["fwd"]))
    return timings


def _speedups(rows: list[dict]) -> None:
    """Print triton's speed-up over each other provider, per shape / phase / N / mode."""
    key = lambda r: (r["shape"], r["phase"], r["N"], r["mode"])  # noqa: E731
    tri = {key(r): r["ms"] for r in rows if r["provider"] == "triton"}
    for r in rows:
        if r["provider"] != "triton" and key(r) in tri:
            print(f"triton vs {r['provider']:>10} {' '.join(map(str, key(r)))}: {r['ms'] / tri[key(r)]:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
