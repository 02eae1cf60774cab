"""Model behaviour on the reference ops: causality, RoPE, GQA, overfitting, KV cache, GPT-2 variant."""

import pytest
import torch
from conftest import cached_and_uncached, tiny_config

from kernels import reference as ref
from llm.config import ModelConfig, preset
from llm.layers import rope_tables
from llm.model import Transformer

VARIANTS = {
    "llama-gqa": {},
    "mha": dict(n_kv_head=4),
    "mqa": dict(n_kv_head=1),
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, n_kv_head=4),
    "qwen-like": dict(qkv_bias=True, qk_norm=True, head_dim=16),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_causality_future_tokens_do_not_change_past_logits(variant):
    torch.manual_seed(0)
    model = Transformer(tiny_config(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 101, (2, 20))
    idx2 = idx.clone()
    idx2[:, 12:] = torch.randint(0, 101, (2, 8))
    a, _ = model(idx)
    b, _ = model(idx2)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4  # the future did change later logits


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    D = 16
    cos, sin = rope_tables(D, 128)
    q = torch.randn(1, 1, 1, D)
    k = torch.randn(1, 1, 1, D)

    def score(pq, pk):
        qr = ref.rope_ref(q, cos, sin, torch.tensor([pq]))
        kr = ref.rope_ref(k, cos, sin, torch.tensor([pk]))
        return (qr * kr).sum().item()

    assert score(10, 3) == pytest.approx(score(57, 50), abs=1e-5)
    assert score(0, 0) == pytest.approx(score(100, 100), abs=1e-5)
    assert abs(score(10, 3) - score(10, 4)) > 1e-4


def test_gqa_equals_mha_with_repeated_kv():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 9, 6, 2, 8
    q = torch.randn(B, T, H, D)
    k = torch.randn(B, T, Hkv, D)
    v = torch.randn(B, T, Hkv, D)
    out = ref.attention_ref(q, k, v)
    rep = H // Hkv
    mha = ref.attention_ref(q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2))
    torch.testing.assert_close(out, mha, atol=1e-6, rtol=1e-6)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    idx = torch.randint(0, 101, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.1, (first, loss.item())


def test_loss_equals_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    idx = torch.randint(0, 101, (2, 17))
    logits, _ = model(idx[:, :-1])
    _, loss = model(idx[:, :-1], idx[:, 1:])
    expect = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt2", "qwen-like"])
def test_cached_logits_equal_uncached_over_120_steps(variant):
    torch.manual_seed(0)
    model = Transformer(tiny_config(block_size=160, **VARIANTS[variant])).eval()
    prompt = torch.randint(0, 101, (2, 7))
    seq, cached, full = cached_and_uncached(model, prompt, 120)
    torch.testing.assert_close(cached[:, :-1], full[:, : seq.shape[1] - 1 + 1][:, :-1], atol=1e-5, rtol=1e-5)


def test_cache_refuses_to_write_past_its_end():
    model = Transformer(tiny_config()).eval()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long) + 3, cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow: 9 positions needed, the cache holds 8"):
            model(torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_sequence_longer_than_context_is_refused():
    model = Transformer(tiny_config(block_size=8))
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_param_count_and_flops_helpers():
    cfg = ModelConfig(**preset("small"), kernels="torch")
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_params()
    assert 100e6 < n < 180e6, n
    c = cfg
    assert model.flops_per_token() == 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


def test_tied_embeddings_share_storage():
    model = Transformer(tiny_config(tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_decode_layout_changes_strides_only(tied, tmp_path):
    """decode_layout stores each fp32 linear weight with N >= K K-major (wide-K ones, w2, stay N-major): same shape
    and values, same Parameter objects
    (a tied head moves the embedding table with it), the same logits up to summation order and the same
    greedy tokens; a no-op in training mode and the second time; a checkpoint saved after it loads back."""
    from llm import checkpoint as ck
    from llm.generate import stream_tokens
    from llm.generate.sampling import SamplingParams
    from llm.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=tied, vocab_size=301, n_embd=64))
    model.train().decode_layout()  # training mode: untouched
    assert model.lm_head.weight.is_contiguous()
    model.eval()
    idx = torch.randint(0, 301, (2, 9))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}
    logits0, _ = model(idx)
    ids0 = list(stream_tokens(model, [[3, 1, 4, 1, 5]], 20, SamplingParams(0.0)))  # stream_tokens applies it
    for n, p in model.named_parameters():  # the sampler runs in inference mode: the weights stay normal tensors
        assert p is params[n] and torch.equal(p, before[n]) and not p.is_inference()
        if p.dim() == 2 and n != "tok_emb.weight" or tied and n == "tok_emb.weight":  # K-major where N >= K
            assert p.stride() == ((1, p.shape[0]) if p.shape[0] >= p.shape[1] else (p.shape[1], 1)), n
    assert (model.lm_head.weight is model.tok_emb.weight) == tied
    torch.testing.assert_close(model(idx)[0], logits0, atol=1e-5, rtol=1e-5)
    assert list(stream_tokens(model, [[3, 1, 4, 1, 5]], 20, SamplingParams(0.0))) == ids0
    strides = {n: p.stride() for n, p in model.named_parameters()}
    model.decode_layout()
    assert {n: p.stride() for n, p in model.named_parameters()} == strides
    model.train()
    model(idx, targets=idx)[1].backward()  # still trainable after sampling
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    path = ck.save(tmp_path, "ckpt-1", model, Tokenizer.train(["decode layout " * 20], 260))
    back = ck.load_checkpoint(path)[0]
    for n, p in back.named_parameters():
        assert torch.equal(p, before[n])


def test_rotary_equals_rope_for_every_position_shape():
    """ops.Rotary (rows gathered once per forward) equals ops.rope with the tables, for (T,) and (B, T) positions."""
    from llm import ops

    cos, sin = rope_tables(16, 40)
    x = torch.randn(2, 5, 3, 16)
    for pos in (torch.arange(5), torch.tensor([[0, 1, 2, 3, 4], [30, 31, 32, 33, 34]])):
        assert torch.equal(ops.Rotary(cos, sin, pos, kernels="torch")(x), ops.rope(x, cos, sin, pos, kernels="torch"))
        assert torch.equal(ops.Rotary(cos, sin, pos, kernels="torch")(x.bfloat16()),
                           ops.rope(x.bfloat16(), cos, sin, pos, kernels="torch"))
