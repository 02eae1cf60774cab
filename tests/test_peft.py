"""Prefix tuning (llm/prefix.py) and bottleneck adapters (llm/bottleneck.py) through llm/peft.py: what each method
computes, the prefix's positions and KV-cache region, folding, adapter files, and the refusals (promise 20)."""

import pytest
import torch
from conftest import cached_and_uncached, tiny_model

from llm import bottleneck, peft, prefix
from llm import checkpoint as ck
from llm.config import ConfigError
from llm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(model, seed=1):
    """Nonzero up-projections / MLP outputs, so the method changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.trained_tensors(model).values():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("placement, n", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapters_start_at_the_base_and_train_only_themselves(placement, n):
    x = torch.randint(0, 101, (2, 13))
    model = tiny_model().eval()
    base = model(x)[0]
    peft.apply(model, bottleneck.AdapterConfig(8, placement), new_rows=(99, 2))
    assert torch.equal(model(x)[0], base)  # W_up = 0, b_up = 0
    randomized(model)
    assert not torch.allclose(model(x)[0], base)
    model(x, x)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(".adapter." in k for k in with_grad) == 4 * n * model.cfg.n_layer  # down/up weight + bias
    assert {k for k in with_grad if ".adapter." not in k} == {f"{m}.parametrizations.weight.0.rows"
                                                              for m in ("tok_emb", "lm_head")}  # the new tokens
    with pytest.raises(ConfigError, match="not mergeable"):
        peft.merge(model)


def test_a_prefix_of_real_tokens_equals_those_tokens_in_front():
    """Positions: a prefix holding the keys / values the base computes for tokens t_1..t_P makes the model on x equal
    the base on [t_1..t_P, x] at x's positions: the real tokens start at position P, uncached and cached alike."""
    model = tiny_model().eval()
    P, vocab, seed = 5, 101, 3
    ids = torch.randint(0, vocab, (1, P), generator=torch.Generator().manual_seed(seed))  # what base_rows draws
    x = torch.randint(0, vocab, (2, 9))
    with torch.no_grad():
        want = model(torch.cat([ids.expand(2, -1), x], 1))[0][:, P:]
        peft.apply(model, prefix.PrefixConfig(P, 0), vocab=vocab, seed=seed, train=False)
        torch.testing.assert_close(model(x)[0], want, atol=1e-5, rtol=1e-5)
        cache = model.new_cache(2, 9)
        assert cache.host_lengths == [0, 0] and cache.k[0].shape[1] == P + 9
        torch.testing.assert_close(model(x, cache=cache)[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)],
                         ids=["llama", "gpt2"])
def test_prefix_cached_decode_equals_uncached_forward(kw):
    model = tiny_model(**kw).eval()
    peft.apply(model, prefix.PrefixConfig(4, 0), vocab=101, seed=0, train=False)
    randomized(model)  # rows no longer any tokens' keys / values
    seq, cached, full = cached_and_uncached(model, torch.randint(0, 101, (2, 7)), 20)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_reparameterized_prefix_starts_at_init_and_folds_to_its_rows():
    x = torch.randint(0, 101, (2, 11))
    folded = peft.apply(tiny_model().eval(), prefix.PrefixConfig(4, 0), vocab=101, seed=7, train=False)
    model = peft.apply(tiny_model().eval(), prefix.PrefixConfig(4, 24), vocab=101, seed=7)
    torch.testing.assert_close(model(x)[0], folded(x)[0], atol=0, rtol=0)  # last MLP layer zero: rows = init
    randomized(model)
    model(x, x)[1].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"prefix.reparam.embedding", *(f"prefix.reparam.mlp.{i}.{w}" for i in (0, 2)
                                                     for w in ("weight", "bias"))}
    saved = peft.saved_tensors(model)
    assert {prefix.KEYS, prefix.VALUES, "prefix.reparam.init"} <= set(saved)
    peft.load_tensors(folded, saved, "test")  # the folded model reads only prefix.keys / values
    with torch.no_grad():
        torch.testing.assert_close(folded(x)[0], model(x)[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="a prefix is not a weight"):
        peft.merge(folded)


def test_prefix_context_is_block_size_less_P():
    model = peft.apply(tiny_model(block_size=32).eval(), prefix.PrefixConfig(8, 0), vocab=101, seed=0, train=False)
    model(torch.randint(0, 101, (1, 24)))
    with pytest.raises(ValueError, match="sequence length 25 \\+ the prefix's 8 rows exceed the context length 32"):
        model(torch.randint(0, 101, (1, 25)))
    with pytest.raises(ValueError, match="at most 24 tokens fit"):
        model.new_cache(1, 25)
    with pytest.raises(ConfigError, match="--prefix-tokens 32: the prefix takes"):
        peft.apply(tiny_model(block_size=32), prefix.PrefixConfig(32, 0), vocab=101)


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="--adapter-dim must be >= 1 .*got 0"):
        bottleneck.AdapterConfig(0)
    with pytest.raises(ConfigError, match="--prefix-tokens must be >= 1"):
        prefix.PrefixConfig(0)
    with pytest.raises(ConfigError, match="Mixture-of-Experts"):
        peft.apply(tiny_model(n_experts=4, top_k=2), bottleneck.AdapterConfig(4, "pfeiffer"))


@pytest.mark.parametrize("cfg", [prefix.PrefixConfig(3, 16), bottleneck.AdapterConfig(4, "houlsby")],
                         ids=["prefix", "adapter"])
def test_adapter_dir_round_trip_and_refusals(tmp_path, cfg):
    """A saved adapter loads onto its base with the same logits; the wrong base and an unknown method are one line."""
    from llm.loading import load_model

    tok = Tokenizer.train(["hello world " * 20], 300)
    base = tiny_model(vocab_size=tok.n_vocab)
    ck.save(tmp_path / "base", "ckpt-1", base, tok)
    model = randomized(peft.apply(base, cfg, vocab=tok.n_vocab, seed=0))
    conf = peft.adapter_config(cfg, model, str(tmp_path / "base"), tok.n_vocab, [])
    adir = ck.save(tmp_path / "run", "ckpt-1", model, tok, None, None, None, peft.saved_tensors(model),
                   weights_file="adapter.safetensors", json_files={"adapter_config.json": conf})
    x = torch.randint(0, tok.n_vocab, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "run")[0](x)[0], model.eval()(x)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ck.CheckpointError, match="trained on another base: head_dim 8 vs base 12"):
        peft.load_adapter(tiny_model(vocab_size=tok.n_vocab, n_embd=48), adir)
    (adir / "adapter_config.json").write_text('{"format": "llm-peft", "method": "ia3"}')
    with pytest.raises(ck.CheckpointError, match="method 'ia3' is not one this version reads"):
        load_model(tmp_path / "run")


def test_prefix_peft_round_trip(tmp_path):
    """Our prefix -> PEFT PREFIX_TUNING files next to an HF export of the base -> peft.PeftModel gives our logits
    (the text at positions P.., the rows unrotated, GQA kv heads); and back."""
    peft_lib = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llm.interop import adapters
    from llm.loading import load_model

    tok = Tokenizer.train(["hello world, def f(x): return x " * 30], 300)
    base = tiny_model(vocab_size=tok.n_vocab, pad_vocab_multiple=1)
    ck.save(tmp_path / "base", "ckpt-1", base, tok)
    cfg = prefix.PrefixConfig(3, 0)
    model = randomized(peft.apply(base, cfg, vocab=tok.n_vocab, seed=0, train=False))
    conf = peft.adapter_config(cfg, model, str(tmp_path / "base"), tok.n_vocab, [])
    adir = ck.save(tmp_path / "run", "ckpt-1", model, tok, None, None, None, peft.saved_tensors(model),
                   weights_file="adapter.safetensors", json_files={"adapter_config.json": conf})
    x = torch.randint(0, tok.n_vocab, (2, 11))
    with torch.no_grad():
        ours = load_model(tmp_path / "base", lora=adir)[0](x)[0]
    peft_dir = adapters.export_peft(str(adir), str(tmp_path / "peft"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", torch_dtype=torch.float32)
    theirs = peft_lib.PeftModel.from_pretrained(hf, peft_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours, atol=1e-4, rtol=1e-4)
    back = adapters.import_peft(str(peft_dir), str(tmp_path / "base"), str(tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "base", lora=back)[0](x)[0], ours, atol=1e-6, rtol=1e-6)


def test_prefix_training_path_through_the_triton_kernels(monkeypatch):
    """A prefix makes the keys longer than the queries (S = P + T, query i at position P + i): the Triton attention
    forward and backward (TRITON_INTERPRET=1 on CPU, fp32) give the reference's loss and every prefix gradient."""
    import kernels.attention as ka

    shapes, real = [], ka.attention
    monkeypatch.setattr(ka, "attention", lambda q, k, *a: shapes.append((q.shape[1], k.shape[1])) or real(q, k, *a))
    x, y = torch.randint(0, 70, (2, 9)), torch.randint(0, 70, (2, 9))
    out = {}
    for kernels in ("torch", "triton"):
        model = tiny_model(vocab_size=70, block_size=24, kernels=kernels)
        randomized(peft.apply(model, prefix.PrefixConfig(5, 8), vocab=70, seed=0))
        shapes.clear()  # the prefill that computed the prefix's starting rows
        _, loss = model(x, y)
        loss.backward()
        out[kernels] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert shapes == [(9, 14)] * 2  # both layers through the kernel with S = P + T
    (l_ref, g_ref), (l_tri, g_tri) = out["torch"], out["triton"]
    torch.testing.assert_close(l_tri, l_ref, atol=1e-5, rtol=1e-5)
    assert g_ref.keys() == g_tri.keys() and len(g_ref) == 5
    for n in g_ref:
        torch.testing.assert_close(g_tri[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
