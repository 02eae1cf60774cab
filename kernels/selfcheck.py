"""GPU self-check: every kernel against its reference in bf16 and fp16 on small shapes, in under a minute.

    python -m kernels.selfcheck        (make check-gpu)

Prints one row per (op, dtype): pass/fail, the largest error of any output or gradient against the
fp32 reference, the FlashAttention-rule bound it had to meet (2x the error of the reference run in
the low precision, plus a floor), and the median time of the kernel's forward (do_bench). Without
CUDA it says so in one line and exits 1; a failing row exits 1 too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

FA_FACTOR = 2.0
FA_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class Result:
    op: str
    dtype: str
    err: float
    bound: float
    ms: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound


def fa_bound(outs: list[torch.Tensor], lowp: list[torch.Tensor], exact: list[torch.Tensor],
             dtype: torch.dtype) -> tuple[float, float]:
    """(max error of outs, its bound) over matching lists of outputs/gradients: each tensor must meet
    |out - exact| <= FA_FACTOR * |lowp - exact| + floor; the worst ratio decides."""
    worst_err, worst_bound, worst_ratio = 0.0, 1.0, -1.0
    for o, lp, ex in zip(outs, lowp, exact, strict=True):
        err = (o.double() - ex.double()).abs().max().item()
        bound = FA_FACTOR * (lp.double() - ex.double()).abs().max().item() + FA_FLOOR[dtype]
        if err / bound > worst_ratio:
            worst_err, worst_bound, worst_ratio = err, bound, err / bound
    return worst_err, worst_bound


def _grads(fn: Callable, inputs: list[torch.Tensor], dy_seed: int) -> list[torch.Tensor]:
    """fn's outputs and, when any input requires grad, the gradients for one fixed random upstream grad."""
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*xs)
    outs = list(out) if isinstance(out, tuple) else [out]
    need = [x for x in xs if x.requires_grad]
    if not need:
        return [o.detach() for o in outs]
    g = torch.Generator(device=outs[0].device).manual_seed(dy_seed)
    dys = [torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, need, dys, allow_unused=True)
    return [o.detach() for o in outs] + [gr if gr is not None else torch.zeros_like(x) for gr, x in zip(grads, need)]


def _sdpa_lowp(q, k, v, causal: bool = True):
    """GQA attention computed in q's dtype by torch (the low-precision baseline of the FA rule); causal
    needs T == S (SDPA aligns the mask top-left), non-causal is what a last-position decode token sees."""
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def cases(dev: str) -> list[tuple[str, Callable, Callable, Callable, Callable]]:
    """(op, make_inputs(dtype) -> list, kernel fn, reference fn, low-precision baseline fn)."""
    from kernels import reference as ref
    from kernels.attention import attention
    from kernels.cross_entropy import cross_entropy
    from kernels.decode import decode_attention
    from kernels.moe import moe_experts
    from kernels.rmsnorm import add_rms_norm, rms_norm
    from kernels.rope import rope
    from kernels.swiglu import swiglu

    def r(*shape, dt, grad=True, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_(grad)

    # RoPE tables (256 positions, head dim 64) as llm.layers.rope_tables builds them (kernels/ never imports llm/)
    inv_freq = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64, device=dev) / 64)
    ang = torch.outer(torch.arange(256, dtype=torch.float64, device=dev), inv_freq)
    cos, sin = ang.cos().float(), ang.sin().float()
    pos = torch.arange(200, device=dev)
    lengths = torch.full((2,), 300, device=dev)
    idx = torch.randint(0, 4, (64, 2), device=dev)
    targets = torch.randint(0, 1000, (64,), device=dev)
    return [
        ("rms_norm", lambda dt: [r(64, 1000, dt=dt), r(1000, dt=dt)], rms_norm, ref.rms_norm_ref, None),
        ("add_rms_norm", lambda dt: [r(64, 1000, dt=dt), r(64, 1000, dt=dt), r(1000, dt=dt)], add_rms_norm,
         ref.add_rms_norm_ref, None),
        ("rope", lambda dt: [r(2, 200, 4, 64, dt=dt)], lambda x: rope(x, cos, sin, pos),
         lambda x: ref.rope_ref(x, cos, sin, pos), None),
        ("swiglu", lambda dt: [r(64, 1000, dt=dt), r(64, 1000, dt=dt)], swiglu, ref.swiglu_ref, None),
        ("cross_entropy", lambda dt: [r(64, 1000, dt=dt)], lambda z: cross_entropy(z, targets),
         lambda z: ref.cross_entropy_ref(z, targets), None),
        ("attention", lambda dt: [r(2, 300, 8, 128, dt=dt), r(2, 300, 2, 128, dt=dt), r(2, 300, 2, 128, dt=dt)],
         attention, ref.attention_ref, _sdpa_lowp),
        ("decode_attention", lambda dt: [r(2, 1, 8, 128, dt=dt, grad=False), r(2, 300, 2, 128, dt=dt, grad=False),
                                         r(2, 300, 2, 128, dt=dt, grad=False)],
         lambda q, k, v: decode_attention(q, k, v, lengths), lambda q, k, v: ref.decode_attention_ref(q, k, v, lengths),
         lambda q, k, v: _sdpa_lowp(q, k, v, causal=False)),
        ("moe_experts", lambda dt: [r(64, 256, dt=dt), r(4, 512, 256, dt=dt, scale=0.05),
                                    r(4, 512, 256, dt=dt, scale=0.05), r(4, 256, 512, dt=dt, scale=0.05),
                                    torch.rand(64, 2, device=dev).to(dt).requires_grad_()],
         lambda x, a, b, c, w: moe_experts(x, a, b, c, idx, w),
         lambda x, a, b, c, w: ref.moe_experts_ref(x, a, b, c, idx, w), None),
    ]


def run_case(op: str, make: Callable, fn: Callable, ref_fn: Callable, lowp_fn: Callable | None,
             dtype: torch.dtype, bench: Callable[[Callable], float]) -> Result:
    torch.manual_seed(0)
    inputs = make(dtype)
    exact_in = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    outs = _grads(fn, inputs, 1)
    exact = _grads(ref_fn, exact_in, 1)
    lowp = _grads(lowp_fn or ref_fn, inputs, 1)
    err, bound = fa_bound(outs, lowp, exact, dtype)
    with torch.no_grad():
        ms = bench(lambda: fn(*inputs))
    return Result(op, str(dtype).replace("torch.", ""), err, bound, ms)


def table(results: list[Result]) -> str:
    lines = [f"{'op':18} {'dtype':9} {'status':6} {'max err':>10} {'bound':>10} {'fwd ms':>8}"]
    for r in results:
        lines.append(f"{r.op:18} {r.dtype:9} {'pass' if r.ok else 'FAIL':6} {r.err:10.3g} {r.bound:10.3g} {r.ms:8.3f}")
    return "\n".join(lines)


def main() -> int:
    if not torch.cuda.is_available():
        print("kernels.selfcheck: no CUDA device; this check runs the Triton kernels on a GPU", file=sys.stderr)
        return 1
    import triton.testing

    def bench(f: Callable) -> float:
        return triton.testing.do_bench(f, warmup=5, rep=20)

    results = [run_case(*c, dt, bench) for c in cases("cuda") for dt in DTYPES]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
