"""The CPU decode GEMVs (kernels/cpu_gemv.c through kernels/cpu_gemv.py) vs the references, and their routing.

Awkward shapes on purpose: K odd (the last int4 byte half used), K not a multiple of the group size (the
int4 cliff of issue 32: 1376 = 21.5 groups of 64), K below one 16/32-wide vector step, odd N, M = 1..16;
fp32, fp16 and bf16 activations; 1 and 2 OpenMP threads (rows split across threads).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FA_FLOOR, assert_fa_rule

from kernels import cpu_gemv
from kernels import reference as ref
from llm import ops, quant

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build kernels/cpu_gemv.c")

SHAPES = [(1, 75, 201), (5, 48, 1376), (16, 33, 96), (1, 7, 5), (3, 130, 64)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def _check(out, hp, lp, dtype, name, act_bound=None):
    """The FlashAttention rule against fp64 (fp32: K up to 1376 sums, so the fp32 reference itself is off by a
    few ulps; 16-bit activations: against the reference run in that dtype, its output rounding), plus, for the
    integer kernels, the bound of their int16 activations (act_bound, per output)."""
    assert out.dtype == dtype and out.shape == hp.shape
    if act_bound is None:
        assert_fa_rule(out, lp, hp, name=name)
        return
    err = (out.double() - hp).abs()
    bound = 2 * (lp.double() - hp).abs().max() + FA_FLOOR[dtype] + act_bound
    assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


def _int16_activation_bound(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """(M, N) bound on |sum_k w_nk (x_mk - xq_mk xs)|: x is rounded to int16 per block of `block` values with
    xs = max|x| / 32767, so each value moves by at most xs / 2 (kernels/cpu_gemv.c)."""
    M, K = x.shape
    nb = -(-K // block)
    xa = torch.nn.functional.pad(x.double().abs(), (0, nb * block - K)).view(M, nb, block)
    half_step = xa.amax(dim=2) / 32767 / 2  # (M, nb)
    wa = torch.nn.functional.pad(w.double().abs(), (0, nb * block - K)).view(w.shape[0], nb, block).sum(2)
    return half_step @ wa.t()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)],
                         ids=["int8", "int4g32", "int4g64", "int4g128"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_quantized_gemv_equals_reference(M, N, K, bits, group, dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1)  # rows not centred on 0
        x = torch.randn(M, K).to(dtype)
        bias = (torch.randn(N) * 0.1).to(dtype)
        if bits == 8:
            q, s = quant.quantize_int8(w)
            s = s.to(dtype)
            out = cpu_gemv.int8_gemv(x, q, s, bias)
            wd = q.double() * s.double()[:, None]
            act = _int16_activation_bound(x, wd, 64)
        else:
            q, s, z = quant.quantize_int4(w, group)
            s, z = s.to(dtype), z.to(dtype)
            out = cpu_gemv.int4_gemv(x, q, s, z, group, bias)
            wd = ref.int4_dequant_ref(q, s, z, group, K).double()
            sq = s.double().repeat_interleave(group, 1)[:, :K] * ref.int4_unpack_ref(q, K).double()  # s * code
            act = _int16_activation_bound(x, sq, group)
        hp = x.double() @ wd.t()
        lp = (x.float() @ wd.float().t()).to(dtype)  # the reference's product, rounded to x's dtype
        _check(out, hp + bias.double(), (lp.float() + bias.float()).to(dtype), dtype, f"int{bits}", act)
        out_nb = cpu_gemv.int8_gemv(x, q, s) if bits == 8 else cpu_gemv.int4_gemv(x, q, s, z, group)
        _check(out_nb, hp, lp, dtype, f"int{bits} no bias", act)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16], ids=["f16w", "bf16w"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_16bit_weight_gemv_equals_fp32_product_of_the_same_weights(M, N, K, wdtype):
    w = torch.randn(N, K).to(wdtype)
    x, bias = torch.randn(M, K), torch.randn(N)
    hp, lp = x.double() @ w.double().t() + bias.double(), x @ w.float().t() + bias
    _check(cpu_gemv.w16_gemv(x, w, bias), hp, lp, torch.float32, "w16")
    _check(cpu_gemv.w16_gemv(x[None], w, bias), hp[None], lp[None], torch.float32, "w16 (1, M, K)")


def test_int4_decode_never_dequantizes_the_whole_weight(monkeypatch):
    """The int4 cliff: K = 1376 with groups of 64 (the last group half full) decodes through the GEMV; the
    reference's whole-weight dequantization is not called for decode rows (it still serves prefill)."""
    lin = torch.nn.Linear(1376, 48)
    m = quant.QuantLinear.from_linear(lin, "int4", 64, "auto")
    x = torch.randn(1, 1376)
    w = m.weight.double()
    hp, lp = x.double() @ w.t() + m.bias.double(), x @ m.weight.t() + m.bias
    sq = m.scales.double().repeat_interleave(64, 1)[:, :1376] * ref.int4_unpack_ref(m.qweight, 1376).double()
    calls = []
    real = ref.int4_dequant_ref
    monkeypatch.setattr(ref, "int4_dequant_ref", lambda *a: calls.append(a) or real(*a))
    _check(m(x), hp, lp, torch.float32, "int4 K=1376 g64", _int16_activation_bound(x, sq, 64))
    assert calls == []
    m(torch.randn(ops.CPU_WOQ_MAX_M + 1, 1376))  # prefill rows: the reference, by design
    assert len(calls) == 1


def test_bad_inputs_are_one_clear_line():
    q, s = quant.quantize_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="64"):
        cpu_gemv.int8_gemv(torch.randn(1, 65), q, s)
    with pytest.raises(ValueError, match="at most"):
        cpu_gemv.int8_gemv(torch.randn(cpu_gemv.MAX_M + 1, 64), q, s)
    q4, s4, z4 = quant.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="group size"):
        cpu_gemv.int4_gemv(torch.randn(1, 64), q4, s4, z4, 48)
