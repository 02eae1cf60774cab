"""16-bit weights with fp32 compute (llm/weights16.py, `--weights f16|bf16`): the rounding bound per layer, the
model against fp32, greedy tokens, the C GEMV under torch.compile, and the one-line refusals.

Why the tolerances: fp16 keeps 11 significant bits, so rounding a weight moves it by at most 2^-11 |w| (normal
range) or 2^-25 (subnormal spacing 2^-24, halved); the layer then computes exactly those rounded weights times x
in fp32, whose sums of K terms are off by at most K 2^-24 sum |w x| (the classic bound, loose in practice). A
model whose fp32 weights are first rounded to fp16 is therefore the same function as the 16-bit model up to fp32
summation order, which is what test_model_is_the_fp16_rounded_fp32_model checks tightly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from kernels import cpu_gemv
from llm import ops
from llm.generate import stream_tokens
from llm.generate.sampling import SamplingParams
from llm.weights16 import FORMATS, W16Linear, WeightsError, check_weights, to_w16

GEMV = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build kernels/cpu_gemv.c")
UNIT = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8}  # relative rounding bound of a normal value
TINIEST = {"f16": 2.0 ** -25, "bf16": 0.0}  # half the subnormal spacing (bf16 has fp32's exponent range)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("M,N,K", [(1, 75, 201), (3, 48, 1376), (4, 7, 5), (9, 33, 96)])
def test_layer_within_the_rounding_bound(fmt, M, N, K):
    """Decode rows (the C GEMV, M <= W16_MAX_M) and longer inputs (widen + GEMM) are within the bound of the weight
    rounding (its actual size, and the 2^-11 / 2^-8 relative bound it must meet) plus fp32 summation."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    m = W16Linear.from_linear(lin, fmt)
    x = torch.randn(M, K)
    out = m(x)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    w, w16 = lin.weight.detach().double(), m.weight16.double()
    moved = (w - w16).abs()
    assert (moved <= UNIT[fmt] * w.abs() + TINIEST[fmt]).all(), "a weight moved more than its format's rounding"
    exact = x.double() @ w.T + lin.bias.detach().double()
    summation = K * 2.0 ** -24 * (x.double().abs() @ w16.abs().T + lin.bias.detach().double().abs())
    bound = x.double().abs() @ moved.T + summation
    assert ((out.double() - exact).abs() <= bound).all()


@GEMV
def test_decode_rows_take_the_gemv_and_prefill_the_gemm(monkeypatch):
    """Up to W16_MAX_M CPU rows call the C GEMV; more rows (prefill) and kernels="torch" take the reference."""
    m = W16Linear.from_linear(torch.nn.Linear(64, 32), "f16")
    calls = []
    real = cpu_gemv.w16_gemv
    monkeypatch.setattr(cpu_gemv, "w16_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    m(torch.randn(1, ops.W16_MAX_M, 64))
    m(torch.randn(1, ops.W16_MAX_M + 1, 64))
    m.kernels = "torch"
    m(torch.randn(1, 1, 64))
    assert calls == [(1, ops.W16_MAX_M, 64)]


def _fp16_rounded(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """The fp32 model with every block Linear and the head rounded to `fmt` and widened back (untied head)."""
    import copy

    r = copy.deepcopy(model)
    r.lm_head.weight = torch.nn.Parameter(r.lm_head.weight.detach().clone())
    for mod in [*r.blocks.modules(), r.lm_head]:
        if type(mod) is torch.nn.Linear:
            mod.weight.data = mod.weight.data.to(FORMATS[fmt]).float()
    return r


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_model_is_the_fp16_rounded_fp32_model(fmt):
    """Logits of the 16-bit model equal the fp32 model with its weights rounded the same way, up to fp32
    summation order (1e-5 of the logits' scale); against the unrounded fp32 model they differ by the rounding:
    9 rounded linears on the path (2 layers x wqkv, wo, w1/w3, w2, and the head), each <= 2^-11 (f16) / 2^-8
    (bf16) relative, so first order <= 9 u of the logits' scale; checked at 2x that."""
    model = tiny_model(kernels="auto").eval()
    idx = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    rounded_model = _fp16_rounded(model, fmt)
    with torch.no_grad():
        full = model(idx)[0]
        rounded = rounded_model(idx)[0]
        short = rounded_model(idx[:, :2])[0]  # 4 rows: the decode GEMV's route
        to_w16(model, fmt)
        w16, w16_short = model(idx)[0], model(idx[:, :2])[0]
    scale = full.abs().max().item()
    assert (w16 - rounded).abs().max().item() <= 1e-5 * scale
    assert (w16_short - short).abs().max().item() <= 1e-5 * scale
    assert (w16 - full).abs().max().item() <= 2 * 9 * UNIT[fmt] * scale
    assert not model.cfg.tie_embeddings and isinstance(model.lm_head, W16Linear)


def _greedy(model, prompt, n, mode="eager"):
    return list(stream_tokens(model, prompt, n, SamplingParams(0.0), mode=mode))


@GEMV
def test_greedy_tokens_equal_fp32_and_compiled_equals_eager():
    """Greedy decoding on a tiny model: f16 weights give fp32's tokens; the compiled decode step (the GEMV a
    custom op inside the graph) gives the eager f16 tokens."""
    model = tiny_model(kernels="auto", n_layer=1).eval()
    prompt = [[5, 17, 3, 99, 42, 8]]
    want = _greedy(model, prompt, 10)
    to_w16(model, "f16")
    eager = _greedy(model, prompt, 10)
    assert eager == want
    torch._dynamo.reset()
    assert _greedy(model, prompt, 10, mode="compile") == eager


@GEMV
def test_compiled_layer_keeps_the_gemv(monkeypatch):
    """Under torch.compile (fullgraph: a graph break fails) a decode row runs the C GEMV as llm::cpu_w16_gemv and
    equals eager bit for bit."""
    m = W16Linear.from_linear(torch.nn.Linear(200, 48), "f16")
    x = torch.randn(1, 1, 200)
    eager = m(x)
    real, calls = cpu_gemv.w16_gemv, []
    monkeypatch.setattr(cpu_gemv, "w16_gemv", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    out = torch.compile(lambda t: m(t) * 2.0, fullgraph=True, dynamic=False)(x)
    assert calls, "the compiled step did not call the C GEMV"
    assert torch.equal(out, eager * 2.0)


def test_model_to_dtype_keeps_the_16_bit_weights():
    """The bits are an int16 buffer: model.to(float32) / .double() leave them (and the format) alone."""
    m = W16Linear.from_linear(torch.nn.Linear(8, 4), "bf16")
    before = m.bits.clone()
    m.to(torch.float64)
    assert m.bits.dtype == torch.int16 and torch.equal(m.bits, before) and m.weight.dtype == torch.float32


@pytest.mark.parametrize("kw,msg", [
    (dict(device=torch.device("cuda")), "CPU decode format"),
    (dict(dtype=torch.bfloat16), "computes in fp32"),
    (dict(quantize="int8"), "two weight formats"),
    (dict(lora="adapter"), "--peft/--lora"),
])
def test_refusals_are_one_line(kw, msg):
    args = dict(fmt="f16", device=torch.device("cpu"), dtype=torch.float32) | kw
    with pytest.raises(WeightsError, match=msg) as e:
        check_weights(**args)
    assert "\n" not in str(e.value)


def test_quantized_model_refused():
    from llm.quant import make_scheme, quantize_model

    model = quantize_model(tiny_model().eval(), make_scheme("int8"))
    with pytest.raises(WeightsError, match="quantized already"):
        to_w16(model)


def test_cli_refuses_before_loading(tmp_path, capsys):
    """`llm sample --weights f16 --quantize int4` answers one error line without reading the checkpoint."""
    from llm.generate.cli import main

    assert main(["--checkpoint", str(tmp_path / "missing"), "--weights", "f16", "--quantize", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --weights f16 and --quantize are two weight formats: give one"
