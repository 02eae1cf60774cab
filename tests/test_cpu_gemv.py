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
    integer kernels, the bound of their integer activations (act_bound, per output)."""
    assert out.dtype == dtype and out.shape == hp.shape
    if act_bound is None:
        assert_fa_rule(out, lp, hp, name=name)
        return
    err = (out.double() - hp).abs()
    bound = 2 * (lp.double() - hp).abs().max() + FA_FLOOR[dtype] + act_bound
    assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


def _activation_bound(x: torch.Tensor, w: torch.Tensor, block: int, levels: int) -> torch.Tensor:
    """(M, N) bound on |sum_k w_nk (x_mk - xq_mk xs)|: x is rounded to integers per block of `block` values with
    xs = max|x| / levels (int16: 32767 per block of 64 or the int4 group; int8: 127 per 32 or the int4 group),
    so each value moves by at most xs / 2 (kernels/cpu_gemv.c)."""
    M, K = x.shape
    nb = -(-K // block)
    xa = torch.nn.functional.pad(x.double().abs(), (0, nb * block - K)).view(M, nb, block)
    half_step = xa.amax(dim=2) / levels / 2  # (M, nb)
    wa = torch.nn.functional.pad(w.double().abs(), (0, nb * block - K)).view(w.shape[0], nb, block).sum(2)
    return half_step @ wa.t()


def _bound(x: torch.Tensor, w: torch.Tensor, act_bits: int, group: int) -> torch.Tensor:
    """The activation-rounding bound of the int8 (group 0) or int4 kernel at act_bits; w is q * s (int8) or
    s * code (int4: the offsets multiply the exact sum of x)."""
    if act_bits == 8:  # int8: per 32 values (q8_0's blocks); int4: per weight group
        return _activation_bound(x, w, group or 32, 127)
    return _activation_bound(x, w, group or 64, 32767)


@pytest.mark.parametrize("act_bits", [8, 16], ids=["a8", "a16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)],
                         ids=["int8", "int4g32", "int4g64", "int4g128"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_quantized_gemv_equals_reference(M, N, K, bits, group, dtype, threads, act_bits):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1)  # rows not centred on 0
        x = torch.randn(M, K).to(dtype)
        bias = (torch.randn(N) * 0.1).to(dtype)
        if bits == 8:
            q, s = quant.quantize_int8(w)
            s = s.to(dtype)
            out = cpu_gemv.int8_gemv(x, q, s, bias, act_bits=act_bits)
            wd = q.double() * s.double()[:, None]
            act = _bound(x, wd, act_bits, 0)
        else:
            q, s, z = quant.quantize_int4(w, group)
            s, z = s.to(dtype), z.to(dtype)
            out = cpu_gemv.int4_gemv(x, q, s, z, group, bias, act_bits=act_bits)
            wd = ref.int4_dequant_ref(q, s, z, group, K).double()
            sq = s.double().repeat_interleave(group, 1)[:, :K] * ref.int4_unpack_ref(q, K).double()  # s * code
            act = _bound(x, sq, act_bits, group)
        hp = x.double() @ wd.t()
        lp = (x.float() @ wd.float().t()).to(dtype)  # the reference's product, rounded to x's dtype
        _check(out, hp + bias.double(), (lp.float() + bias.float()).to(dtype), dtype, f"int{bits}", act)
        out_nb = (cpu_gemv.int8_gemv(x, q, s, act_bits=act_bits) if bits == 8
                  else cpu_gemv.int4_gemv(x, q, s, z, group, act_bits=act_bits))
        _check(out_nb, hp, lp, dtype, f"int{bits} no bias", act)
    finally:
        torch.set_num_threads(before)


def _x8(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the 8-bit-activation kernels see it: per block of `block` values xs = max|x| / 127 and
    xq = round(x * (1 / xs)) in fp32 (kernels/cpu_gemv.c quant_x8 / int4_prep8), returned as xq * xs in fp64."""
    M, K = x.shape
    nb = -(-K // block)
    xb = torch.nn.functional.pad(x.float(), (0, nb * block - K)).view(M, nb, block)
    amax = xb.abs().amax(dim=2, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.round(xb * (1 / s))
    return (xq.double() * s.double()).view(M, nb * block)[:, :K]


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)],
                         ids=["int8", "int4g32", "int4g64", "int4g128"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_8bit_activations_equal_their_emulation(M, N, K, bits, group):
    """The 8-bit-activation kernels compute exactly sum w (xq xs), up to fp32 summation: the activation bound
    above is a worst case (every rounding aligned), so this pins the rounding itself. int8: the last partial
    block of 32 keeps x exact; int4: the offsets multiply the exact sum of x per group."""
    w = torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1)
    x = torch.randn(M, K)
    if bits == 8:
        q, s = quant.quantize_int8(w)
        out = cpu_gemv.int8_gemv(x, q, s, act_bits=8)
        full = K // 32 * 32
        xe = torch.cat([_x8(x[:, :full], 32), x[:, full:].double()], 1) if full else x.double()
        want = xe @ (q.double() * s.double()[:, None]).t()
        mag = x.double().abs() @ (q.double() * s.double()[:, None]).abs().t()
    else:
        q, s, z = quant.quantize_int4(w, group)
        out = cpu_gemv.int4_gemv(x, q, s, z, group, act_bits=8)
        sq = s.double().repeat_interleave(group, 1)[:, :K] * ref.int4_unpack_ref(q, K).double()
        off = (z.double() - 8 * s.double()).repeat_interleave(group, 1)[:, :K]
        want = _x8(x, group) @ sq.t() + x.double() @ off.t()
        mag = x.double().abs() @ (sq.abs() + off.abs()).t()
    err = (out.double() - want).abs()
    assert (err <= 1e-6 * mag + 1e-6).all(), f"max err {err.max().item():.3g} vs sum |w x| {mag.max().item():.3g}"


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
    reference's whole-weight dequantization is called neither for decode rows nor for prefill rows (those
    dequantize a block of rows per GEMM: kernels/cpu_prefill.py, tests/test_cpu_prefill.py)."""
    lin = torch.nn.Linear(1376, 48)
    m = quant.QuantLinear.from_linear(lin, "int4", 64, "auto")
    x = torch.randn(1, 1376)
    w = m.weight.double()
    hp, lp = x.double() @ w.t() + m.bias.double(), x @ m.weight.t() + m.bias
    sq = m.scales.double().repeat_interleave(64, 1)[:, :1376] * ref.int4_unpack_ref(m.qweight, 1376).double()
    calls = []
    real = ref.int4_dequant_ref
    monkeypatch.setattr(ref, "int4_dequant_ref", lambda *a: calls.append(a) or real(*a))
    _check(m(x), hp, lp, torch.float32, "int4 K=1376 g64", _bound(x, sq, cpu_gemv.INT4_ACT_BITS, 64))
    assert calls == []
    m(torch.randn(ops.CPU_WOQ_MAX_M + 1, 1376))  # prefill rows
    assert calls == []


@pytest.mark.parametrize("act_bits", [8, 16], ids=["a8", "a16"])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 64)], ids=["int8", "int4g64"])
def test_scalar_build_equals_the_reference(bits, group, act_bits, monkeypatch):
    """The loops a CPU without AVX2 runs (the library built without -mavx2) meet the same bound as the SIMD
    build, on a shape with partial blocks and groups (K = 1393)."""
    scalar = cpu_gemv._build(False)
    if scalar is None:
        pytest.skip("the scalar build failed")
    monkeypatch.setattr(cpu_gemv, "_lib", lambda: scalar)
    M, N, K = 3, 37, 1376 + 17
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1)
    if bits == 8:
        q, s = quant.quantize_int8(w)
        out = cpu_gemv.int8_gemv(x, q, s, act_bits=act_bits)
        wd = q.double() * s.double()[:, None]
        act = _bound(x, wd, act_bits, 0)
    else:
        q, s, z = quant.quantize_int4(w, group)
        out = cpu_gemv.int4_gemv(x, q, s, z, group, act_bits=act_bits)
        wd = ref.int4_dequant_ref(q, s, z, group, K).double()
        act = _bound(x, s.double().repeat_interleave(group, 1)[:, :K] * ref.int4_unpack_ref(q, K).double(),
                     act_bits, group)
    hp = x.double() @ wd.t()
    _check(out, hp, (x @ wd.float().t()), torch.float32, f"scalar int{bits} a{act_bits}", act)


def test_bad_inputs_are_one_clear_line():
    q, s = quant.quantize_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="64"):
        cpu_gemv.int8_gemv(torch.randn(1, 65), q, s)
    with pytest.raises(ValueError, match="at most"):
        cpu_gemv.int8_gemv(torch.randn(cpu_gemv.MAX_M + 1, 64), q, s)
    q4, s4, z4 = quant.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="group size"):
        cpu_gemv.int4_gemv(torch.randn(1, 64), q4, s4, z4, 48)
    with pytest.raises(ValueError, match="act_bits"):
        cpu_gemv.int8_gemv(torch.randn(1, 64), q, s, act_bits=4)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 64)], ids=["int8", "int4g64"])
def test_compiled_decode_row_keeps_the_gemv(mode, group, monkeypatch):
    """Under torch.compile (fullgraph: a graph break fails) a quantized linear's decode row still runs the C GEMV,
    as the custom op llm::cpu_int8_gemv / cpu_int4_gemv, and gives the eager result bit for bit."""
    lin = torch.nn.Linear(200, 48)
    m = quant.QuantLinear.from_linear(lin, mode, group, "auto")
    x = torch.randn(1, 1, 200)
    eager = m(x)
    name = f"{mode}_gemv"
    real, calls = getattr(cpu_gemv, name), []
    monkeypatch.setattr(cpu_gemv, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    torch._dynamo.reset()
    out = torch.compile(lambda t: m(t) * 2.0, fullgraph=True, dynamic=False)(x)
    assert calls, "the compiled step did not call the C GEMV"
    assert torch.equal(out, eager * 2.0)
