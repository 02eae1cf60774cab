"""Grouped-GEMM MoE experts (kernels/moe.py) against the reference loop (kernels.reference.moe_experts_ref).

On CPU the kernels run through TRITON_INTERPRET=1 in fp32 (and fp16, whose dots are exact there); bf16
runs on CUDA only, against the FlashAttention-style bound.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, assert_fa_rule, requires_cuda

from kernels.reference import moe_experts_ref, swiglu_ref


def make(N: int, E: int, k: int, d: int = 40, Fh: int = 72, dtype=torch.float32, seed: int = 0):
    """Random inputs (x, w_gate, w_up, w_down, topk_idx, topk_weight) with O(1) outputs; floats require grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    wg = torch.randn(E, Fh, d, generator=g) * d**-0.5
    wu = torch.randn(E, Fh, d, generator=g) * d**-0.5
    wd = torch.randn(E, d, Fh, generator=g) * Fh**-0.5
    probs = torch.randn(N, E, generator=g).softmax(-1)
    w, idx = probs.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    ts = [t.to(DEVICE, dtype).requires_grad_() for t in (x, wg, wu, wd)]
    return (*ts, idx.to(DEVICE), w.to(DEVICE).requires_grad_())


def out_and_grads(fn, args, dy):
    out = fn(*args)
    floats = [a for a in args if a.is_floating_point()]
    return [out, *torch.autograd.grad(out, floats, dy)]


NAMES = ["out", "dx", "dw_gate", "dw_up", "dw_down", "dtopk_weight"]

# A covering subset of tokens {1, 33, 222} x experts {1, 8, 64} x top_k {1, 2, n_experts}.
CASES = [(1, 1, 1), (1, 8, 2), (1, 64, 64), (33, 8, 8), (33, 64, 1), (222, 1, 1), (222, 8, 2), (222, 64, 2)]


@pytest.mark.parametrize("N,E,k", CASES, ids=[f"N{n}-E{e}-k{k}" for n, e, k in CASES])
def test_grouped_equals_loop_forward_and_backward(N, E, k):
    from kernels.moe import moe_experts

    args = make(N, E, k)
    dy = torch.randn(N, args[0].shape[1], device=DEVICE)
    got = out_and_grads(moe_experts, args, dy)
    ref = out_and_grads(moe_experts_ref, args, dy)
    for name, a, b in zip(NAMES, got, ref):
        assert_close(a, b, name=name)


def test_deterministic_mode_sums_rows_in_a_fixed_order():
    # top_k > 2 under torch's deterministic mode: no atomics, rows stored and summed in order.
    from kernels.moe import moe_experts

    args = make(20, 8, 4)
    dy = torch.randn(20, 40, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        first = out_and_grads(moe_experts, args, dy)
        again = out_and_grads(moe_experts, args, dy)
    finally:
        torch.use_deterministic_algorithms(False)
    ref = out_and_grads(moe_experts_ref, args, dy)
    for name, a, b, r in zip(NAMES, first, again, ref):
        assert torch.equal(a, b), name
        assert_close(a, r, name=name)


def test_one_expert_top1_equals_dense_swiglu():
    from kernels.moe import moe_experts

    x, wg, wu, wd, idx, w = make(17, 1, 1)
    w = torch.ones_like(w)  # one expert, top-1: the gate of a renormalized router is 1
    out = moe_experts(x, wg, wu, wd, idx, w)
    dense = F.linear(F.silu(F.linear(x, wg[0])) * F.linear(x, wu[0]), wd[0])
    assert_close(out, dense)


def test_experts_without_tokens_give_no_nan_and_exactly_zero_grad():
    from kernels.moe import moe_experts

    x, wg, wu, wd, _, w = make(30, 8, 2)
    idx = torch.tensor([1, 5], device=DEVICE).repeat(30, 1)  # experts 0, 2, 3, 4, 6, 7 get nothing
    idx[::3] = torch.tensor([5, 1], device=DEVICE)
    dy = torch.randn(30, 40, device=DEVICE)
    got = out_and_grads(moe_experts, (x, wg, wu, wd, idx, w), dy)
    ref = out_and_grads(moe_experts_ref, (x, wg, wu, wd, idx, w), dy)
    idle = [0, 2, 3, 4, 6, 7]
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, name=name)
    for grad in got[2:5]:
        assert torch.equal(grad[idle], torch.zeros_like(grad[idle]))
        assert grad[[1, 5]].abs().min() > 0


def test_decode_path_without_grad_matches_reference():
    # No autograd: nothing is saved for a backward (the decode path); 1..4 tokens.
    from kernels.moe import moe_experts

    for N in (1, 2, 4):
        args = make(N, 8, 2, seed=N)
        with torch.no_grad():
            assert_close(moe_experts(*args), moe_experts_ref(*args), name=f"N={N}")


def test_schedule_tiles_cover_every_row_once_within_one_expert():
    from kernels.moe import schedule

    g = torch.Generator().manual_seed(0)
    E, bm = 6, 16
    idx = torch.randint(0, E, (57, 2), generator=g)
    idx[idx == 3] = 4  # an expert without tokens
    s = schedule(idx, E, bm)
    flat = idx.reshape(-1)
    assert sorted(s.pair.tolist()) == list(range(flat.numel()))
    assert torch.equal(flat[s.pair.long()], flat.sort(stable=True).values)
    seen = []
    for e, r0 in zip(s.tile_expert.tolist(), s.tile_row0.tolist()):
        if e >= E:
            continue
        rows = [r for r in range(r0, r0 + bm) if r < s.seg_end[e]]
        assert rows and all(int(flat[s.pair[r]]) == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(flat.numel()))


def test_bad_inputs_raise_one_clear_error():
    from kernels.moe import moe_experts

    x, wg, wu, wd, idx, w = make(5, 4, 2)
    with pytest.raises(ValueError, match="do not fit"):
        moe_experts(x, wg, wu, wd.transpose(1, 2), idx, w)
    with pytest.raises(ValueError, match="must both be"):
        moe_experts(x, wg, wu, wd, idx[:, :1], w)
    with pytest.raises(ValueError, match="must share one of"):
        moe_experts(x.half(), wg, wu, wd, idx, w)
    with pytest.raises(ValueError, match="must be int32/int64"):
        moe_experts(x, wg, wu, wd, idx.float(), w)


def test_autocast_runs_in_the_autocast_dtype_and_grads_reach_fp32_weights():
    # Under fp16 autocast the kernel runs on fp16 copies (exactly as on explicitly cast inputs), and
    # the casts' backward hands the fp32 leaves their gradients in fp32, as for any autocast matmul.
    from kernels.moe import moe_experts

    args = make(26, 8, 2)
    dy = torch.randn(26, 40, device=DEVICE).half()
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = moe_experts(*args)
    grads = torch.autograd.grad(out, [a for a in args if a.is_floating_point()], dy)
    cast = [a.detach().half().requires_grad_() if i < 4 else a for i, a in enumerate(args)]
    want = out_and_grads(moe_experts, cast, dy)
    assert out.dtype == torch.float16 and torch.equal(out, want[0])
    leaves = [a for a in args if a.is_floating_point()]
    for name, g, leaf, w in zip(NAMES[1:], grads, leaves, want[1:]):
        assert g.dtype == leaf.dtype == torch.float32, name
        assert torch.equal(g, w.float()), name


def lowp_loop(x, wg, wu, wd, idx, w):
    """The loop composed of the reference ops in low precision (the FlashAttention rule's baseline).

    Matmuls in x's dtype; the activation is the project's SwiGLU reference (fp32 math, one rounding),
    as the dense model computes it. Rounding silu(g) to low precision on its own before the product
    (F.silu(g) * u) is a different rounding scheme whose error sometimes cancels the others by chance,
    so against it the max-error ratio of a 66-value gradient swings past 2x on some seeds.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(wg.shape[0]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        xe = x[rows]
        h = swiglu_ref(xe @ wg[e].t(), xe @ wu[e].t())
        out.index_add_(0, rows, (h @ wd[e].t()).float() * w[rows, slot].float()[:, None])
    return out.to(x.dtype)


@pytest.mark.parametrize("N,E,k", [(33, 8, 2), (150, 16, 4)], ids=["N33-E8-k2", "N150-E16-k4"])
def test_fp16_within_fa_rule(N, E, k):
    from kernels.moe import moe_experts

    lp = make(N, E, k, dtype=torch.float16)
    hp = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in lp]
    hp[5] = lp[5]  # the routing weights stay fp32 in every run
    dy = torch.randn(N, 40, device=DEVICE)
    got = out_and_grads(moe_experts, lp, dy.half())
    base = out_and_grads(lowp_loop, lp, dy.half())
    ref = out_and_grads(moe_experts_ref, hp, dy)
    for name, a, b, r in zip(NAMES, got, base, ref):
        assert_fa_rule(a, b, r, name)


@requires_cuda
@pytest.mark.parametrize("N,E,k,d,Fh", [(1, 8, 2, 256, 512), (16, 64, 6, 256, 384), (4096, 8, 2, 512, 1024)],
                         ids=["decode-1", "decode-16-E64", "train-4k"])
def test_bf16_cuda_within_fa_rule(N, E, k, d, Fh):
    from kernels.moe import moe_experts

    lp = make(N, E, k, d, Fh, dtype=torch.bfloat16)
    hp = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in lp]
    hp[5] = lp[5]
    dy = torch.randn(N, d, device=DEVICE)
    got = out_and_grads(moe_experts, lp, dy.bfloat16())
    base = out_and_grads(lowp_loop, lp, dy.bfloat16())
    ref = out_and_grads(moe_experts_ref, hp, dy)
    for name, a, b, r in zip(NAMES, got, base, ref):
        assert_fa_rule(a, b, r, name)
