"""Speculative decoding with a quantized draft (quantized self-speculation) and the fp32 few-row kernel its verify
pass runs on: f32_rows_gemm against an fp64 reference (both weight layouts, awkward shapes, 1 and 2 threads, the
scalar build),
Transformer.few_rows (the C kernel is called, the result equals the plain forward, the classes come back), greedy
ids with an int8 / int4 draft equal plain greedy ids, and `llm sample --draft-quant` (same text as plain decoding,
one-line refusals)."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels import cpu_gemv
from kernels import reference as ref
from llm import checkpoint as ck
from llm.config import ModelConfig
from llm.generate import SamplingParams, Stats, complete
from llm.generate.cli import main as sample_main
from llm.generate.speculative import Speculation, SpeculativeDecoder
from llm.layers import RowsLinear
from llm.model import Transformer
from llm.quant import make_scheme, quantize_model
from llm.tokenizer import Tokenizer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not cpu_gemv.available(), reason="the C kernels did not build (no C compiler)")]

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 30


def _kmajor(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


def _check_gemm(M: int, N: int, K: int, bias: bool) -> None:
    for w in (_kmajor(torch.randn(N, K)), torch.randn(N, K)):
        _check_one(torch.randn(M, K), w, torch.randn(N) if bias else None)


def _check_one(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    (M, K), N, bias = x.shape, w.shape[0], b is not None
    y = cpu_gemv.f32_rows_gemm(x, w, b)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    bound = 4 * K * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().t()) + 1e-6
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= bound).all(), (M, N, K, (y.double() - ref).abs().max().item())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", [1, 2, 5, 7, 8, 13, 16])
def test_f32_rows_gemm_equals_the_fp64_product_on_awkward_shapes(M, threads):
    torch.set_num_threads(threads)
    for N, K, bias in ((2, 1, False), (15, 9, True), (16, 8, False), (17, 33, True), (100, 130, False),
                       (700, 260, True), (1000, 64, False)):  # tiles of 16 columns, blocks of 8 rows, leftovers
        _check_gemm(M, N, K, bias)


def test_f32_rows_gemm_scalar_build_and_refusals(monkeypatch):
    with pytest.raises(ValueError, match="K-major"):
        cpu_gemv.f32_rows_gemm(torch.randn(2, 8), torch.randn(16, 16)[:, ::2])  # neither layout
    with pytest.raises(ValueError, match="at most"):
        cpu_gemv.f32_rows_gemm(torch.randn(cpu_gemv.MAX_M + 1, 8), _kmajor(torch.randn(16, 8)))
    scalar = cpu_gemv._build(False)
    if scalar is None:
        pytest.skip("the scalar build failed")
    monkeypatch.setattr(cpu_gemv, "_lib", lambda: scalar)
    for M, N, K in ((1, 5, 3), (5, 37, 70), (8, 33, 17)):
        _check_gemm(M, N, K, True)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 300)


def _model(tok, kernels: str = "auto") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      kernels=kernels)
    return Transformer(cfg).eval().decode_layout()


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return _model(tok)


def test_few_rows_runs_the_c_kernel_equals_the_plain_forward_and_restores_the_linears(model, tok, monkeypatch):
    reference_model = _model(tok, kernels="torch")
    with torch.inference_mode():
        _few_rows(model, reference_model, tok, monkeypatch)


def _few_rows(model, reference_model, tok, monkeypatch):
    calls, attn = [], []
    real_plan, real_attn = cpu_gemv.f32_rows_plan, ref.few_query_attention_ref

    def plan(w, b=None):
        run = real_plan(w, b)
        return lambda x: calls.append(x.shape) or run(x)

    monkeypatch.setattr(cpu_gemv, "f32_rows_plan", plan)
    monkeypatch.setattr(ref, "few_query_attention_ref", lambda *a: attn.append(a[0].shape) or real_attn(*a))
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b")[:9]])
    cache = model.new_cache(1, 32)
    model(ids[:, :3], cache=cache)  # 3 ids in the cache, then a pass of 6 continues it
    plain, _ = model(ids[:, 3:], cache=cache)
    assert not calls and not attn
    for plans in (None, model.rows_plans()):  # taken on entry, or once ahead by a caller with many passes
        cache.set_lengths([3])
        with model.few_rows(plans):
            assert all(type(m) is RowsLinear for m in (model.lm_head, model.blocks[0].attn.wqkv))
            fast, _ = model(ids[:, 3:], cache=cache)
        n_linears = sum(type(m) is torch.nn.Linear for m in model.modules())
        assert len(calls) == n_linears and all(s[-2] == 6 for s in calls)  # every linear, the 6 rows at once
        assert len(attn) == model.cfg.n_layer and all(s[1] == 6 for s in attn)  # few-query attention per layer
        assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-5)
        calls.clear()
        attn.clear()
    with pytest.raises(RuntimeError, match="boom"), model.few_rows():
        raise RuntimeError("boom")
    assert not any(type(m) is RowsLinear or "rows" in m.__dict__ for m in model.modules())  # taken back, also
    assert not any(b.attn.few_rows for b in model.blocks)  # after an exception
    cache.set_lengths([3])
    model(ids[:, 3:], cache=cache)  # outside: SDPA and F.linear again
    assert not calls and not attn
    with reference_model.few_rows() as m:  # kernels="torch": the reference everywhere
        m(ids)
    assert not calls


@pytest.mark.parametrize("B, T, S, H, Hkv", [(1, 2, 2, 4, 2), (1, 3, 131, 16, 8), (2, 5, 40, 6, 3), (3, 8, 9, 4, 4),
                                             (1, 7, 64, 8, 1)])
def test_few_query_attention_equals_the_causal_reference(B, T, S, H, Hkv):
    torch.manual_seed(T * S)
    q, k, v = torch.randn(B, T, H, 16), torch.randn(B, S, Hkv, 16), torch.randn(B, S, Hkv, 16)
    torch.testing.assert_close(ref.few_query_attention_ref(q, k, v), ref.attention_ref(q, k, v, causal=True),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.few_query_attention_ref(q[:, :1], k, v), ref.one_query_attention_ref(q[:, :1], k, v),
                               rtol=1e-6, atol=1e-6)


def test_f32_rows_plan_equals_f32_rows_gemm_and_checks_x():
    for w in (_kmajor(torch.randn(37, 20)), torch.randn(37, 20)):
        b = torch.randn(37)
        run = cpu_gemv.f32_rows_plan(w, b)
        for M in (1, 3, 8):
            x = torch.randn(1, M, 20)
            assert torch.equal(run(x), cpu_gemv.f32_rows_gemm(x, w, b))
        for bad in (torch.randn(3, 21), torch.randn(3, 20).double(), torch.randn(20, 3).t(),
                    torch.randn(cpu_gemv.MAX_M + 1, 20)):
            with pytest.raises(ValueError, match="f32_rows_plan"):
                run(bad)
    with pytest.raises(ValueError, match="K-major"):
        cpu_gemv.f32_rows_plan(torch.randn(16, 16)[:, ::2])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_with_a_quantized_draft_equals_plain_greedy(model, tok, mode):
    draft = quantize_model(copy.deepcopy(model), make_scheme(mode, 32))
    prompts = ["def add(a, b):", "class Point:\n    x"]
    plain = complete(model, tok, prompts, 24, params=SamplingParams(0.0))
    for k in (2, 5):
        stats = Stats()
        spec = complete(model, tok, prompts, 24, params=SamplingParams(0.0), stats=stats,
                        speculative=Speculation(k, draft=draft))
        assert [c.tokens for c in spec] == [c.tokens for c in plain]
        assert stats.target_passes < stats.new_tokens // 2 and stats.accepted > 0


def test_a_compiled_draft_step_keeps_plain_greedy_and_times_its_compile_apart(model, tok):
    """Speculation(compile_draft=True) (llm sample --draft-quant int8 --compile): the draft's one-token step runs
    compiled with its cache in static mode, rolled back between rounds like the eager one; ids equal plain."""
    draft = quantize_model(copy.deepcopy(model), make_scheme("int8", None))
    prompts = ["def add(a, b):", "class Point:\n    x"]
    plain = complete(model, tok, prompts, 24, params=SamplingParams(0.0))
    stats = Stats()
    spec = complete(model, tok, prompts, 24, params=SamplingParams(0.0), stats=stats,
                    speculative=Speculation(3, draft=draft, compile_draft=True))
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    assert stats.warmup > 0 and stats.warmup_tokens > 0 and stats.warmup_what == "compile"
    assert stats.target_passes < stats.new_tokens // 2


def test_a_compiled_draft_compiles_the_catch_up_pass_at_batch_1(model, tok, monkeypatch):
    """At batch 1 the round's first draft pass (the 1-2 ids the draft has not seen) runs compiled as well (a graph
    for T = 2 beside the one-id step), not as an eager few-row pass; ids equal plain greedy's."""
    draft = quantize_model(copy.deepcopy(model), make_scheme("int8", None))
    shapes, few = [], []
    run = SpeculativeDecoder._draft_pass

    def spy(self, ids):
        shapes.append(tuple(ids.shape))
        return run(self, ids)

    monkeypatch.setattr(SpeculativeDecoder, "_draft_pass", spy)
    monkeypatch.setattr(draft, "few_rows", lambda plans=None: few.append(1))  # an eager catch-up would call it
    plain = complete(model, tok, "def add(a, b):", 24, params=SamplingParams(0.0))
    stats = Stats()
    spec = complete(model, tok, "def add(a, b):", 24, params=SamplingParams(0.0), stats=stats,
                    speculative=Speculation(3, draft=draft, compile_draft=True))
    assert spec[0].tokens == plain[0].tokens
    assert not few and (1, 2) in shapes and (1, 1) in shapes and stats.accepted > 0
    assert stats.warmup > 0 and stats.warmup_what == "compile"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok, model):
    return ck.save(tmp_path_factory.mktemp("ckpt"), "ckpt-1", model, tok)


def test_sample_draft_quant_prints_the_plain_greedy_text(ckpt, capsys):
    args = ["--checkpoint", str(ckpt), "--prompt", "def add(a, b):", "--max-new-tokens", "24", "--temperature", "0"]
    assert sample_main([*args, "--quiet"]) == 0
    plain = capsys.readouterr().out
    assert sample_main([*args, "--draft-quant", "int8", "--speculate", "3", "--compare-plain"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith(plain) and "drafted tokens accepted" in out.err and "plain decoding" in out.err
    assert sample_main([*args, "--quiet", "--draft-quant", "int4", "--group-size", "32"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("extra, msg", [
    (["--draft-quant", "int8", "--prompt-lookup", "3"], "--draft-quant (a draft model) and --prompt-lookup"),
    (["--draft-quant", "int8", "--num-beams", "2"], "does not combine with --num-beams"),
    (["--prompt-lookup", "3", "--compile"], "prompt lookup drafts without a model"),
    (["--speculate", "3"], "--draft-quant int8|int4"),
])
def test_sample_draft_quant_bad_combinations_get_one_line(ckpt, capsys, extra, msg):
    assert sample_main(["--checkpoint", str(ckpt), "--prompt", "x", "--max-new-tokens", "4", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and msg in err, err
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(ckpt), "--draft-quant", "int3"])
