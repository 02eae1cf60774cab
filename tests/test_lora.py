"""LoRA (llm/lora.py) and its adapter files (llm/interop/adapters.py): exact at step 0, merge == unmerged,
gradients on the adapters only, a clear error on the wrong base, and the PEFT round trip (promise 20)."""

import pytest
import torch
from conftest import tiny_model

from llm import checkpoint as ck
from llm import lora
from llm.config import ConfigError
from llm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def randomized(model, seed=1):
    """B != 0 so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_tensors(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("targets", [("q", "v"), ("k",), ALL], ids=["q,v", "k", "all"])
def test_step0_equals_base_and_merge_equals_unmerged(targets):
    x = torch.randint(0, 101, (2, 13))
    model = tiny_model().eval()
    base = model(x)[0]
    lora.apply_lora(model, lora.LoRAConfig(4, 8.0, 0.0, targets), new_rows=(99, 2))
    assert torch.equal(model(x)[0], base)  # B = 0 and the new rows start as they were
    randomized(model)
    unmerged = model(x)[0]
    assert not torch.allclose(unmerged, base)
    merged = lora.merge(model)(x)[0]
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_k_adapter_writes_only_the_k_rows():
    model = randomized(lora.apply_lora(tiny_model(), lora.LoRAConfig(4, 8.0, 0.0, ("k",))))
    c = model.cfg
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    d = model.blocks[0].attn.wqkv.delta()
    assert d[q: q + kv].abs().sum() > 0 and d[:q].abs().sum() == 0 and d[q + kv:].abs().sum() == 0


def test_gradients_only_on_adapters():
    model = lora.apply_lora(tiny_model(), lora.LoRAConfig(4, 8.0, 0.1, ALL), new_rows=(99, 2))
    x = torch.randint(0, 101, (2, 9))
    model(x, x)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all(".lora_" in n or n.endswith(".rows") for n in with_grad)
    assert len(with_grad) == 2 * len(ALL) * model.cfg.n_layer + 2


def test_bad_targets_and_ranks_are_refused():
    with pytest.raises(ConfigError, match="qq is not a LoRA target"):
        lora.LoRAConfig(4, 8.0, 0.0, ("q", "qq"))
    with pytest.raises(ConfigError, match="--lora-rank must be >= 1, got 0"):
        lora.LoRAConfig(0)


def save_adapter_dir(tmp_path, model, tok, base="base"):
    cfg = lora.LoRAConfig(4, 8.0, 0.0, ALL)
    lora.apply_lora(model, cfg)
    randomized(model)
    return ck.save(tmp_path / "lora", "ckpt-1", model, tok, None, None, None, lora.adapter_tensors(model),
                   weights_file=lora.ADAPTER_FILE,
                   json_files={lora.ADAPTER_CONFIG: lora.adapter_config(cfg, model, str(base), tok.n_vocab, [])})


def test_adapter_on_the_wrong_base_names_what_differs(tmp_path):
    tok = Tokenizer.train(["hello world " * 20], 300)
    adir = save_adapter_dir(tmp_path, tiny_model(vocab_size=tok.n_vocab), tok)
    msg = "trained on another base: head_dim 8 vs base 12, n_embd 32 vs base 48"
    with pytest.raises(ck.CheckpointError, match=msg):
        lora.load_adapter(tiny_model(vocab_size=tok.n_vocab, n_embd=48), adir)


def test_peft_round_trip(tmp_path):
    """Our adapter -> PEFT files next to an HF export of the base -> peft.PeftModel gives our logits; and back."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llm.interop import adapters
    from llm.loading import load_model

    tok = Tokenizer.train(["hello world, def f(x): return x " * 30], 300)
    base = tiny_model(vocab_size=tok.n_vocab, pad_vocab_multiple=1)
    ck.save(tmp_path / "base", "ckpt-1", base, tok)
    adir = save_adapter_dir(tmp_path, base, tok, base=tmp_path / "base")
    x = torch.randint(0, tok.n_vocab, (1, 11))
    ours = load_model(tmp_path / "base", lora=adir)[0](x)[0]
    peft_dir = adapters.export_peft(str(adir), str(tmp_path / "peft"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, peft_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=1e-4, rtol=1e-4)
    back = adapters.import_peft(str(peft_dir), str(tmp_path / "base"), str(tmp_path / "back"))
    torch.testing.assert_close(load_model(tmp_path / "base", lora=back)[0](x)[0], ours, atol=1e-6, rtol=1e-6)
    merged = adapters.merge_to(str(tmp_path / "base"), str(back), str(tmp_path / "merged"))
    torch.testing.assert_close(load_model(merged)[0](x)[0], ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_step0_equals_quantized_base_and_trains_only_adapters(mode):
    """LoRA on a weight-only quantized base: step 0 is the quantized model exactly, the codes stay frozen
    buffers, gradients reach every adapter (also through the quantized layers that carry none) and nothing else."""
    from llm.quant import QuantLinear, make_scheme, quantize_model

    x = torch.randint(0, 101, (2, 13))
    model = quantize_model(tiny_model(), make_scheme(mode, 32))
    base = model(x)[0]
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    lora.apply_lora(model, lora.LoRAConfig(4, 8.0, 0.0, ("q", "v")))  # wo and the MLP stay plain QuantLinears
    assert torch.equal(model(x)[0], base)
    assert isinstance(model.blocks[0].attn.wqkv, lora.QuantLoRALinear) and type(model.blocks[0].mlp.w2) is QuantLinear
    randomized(model)  # B != 0, so A's gradient is not 0 either
    model(x, x)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert len(with_grad) == 4 * model.cfg.n_layer  # A and B of q and v in each block; block 0's reach needs wo/MLP
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n in codes)
    with pytest.raises(ConfigError, match="sits on a quantized base"):
        lora.merge(model)


def test_frozen_quant_matmul_gradient_equals_dequantized_linear():
    from llm.quant import QuantLinear

    lin = torch.nn.Linear(24, 10)
    q = QuantLinear.from_linear(lin, "int8", None, "torch")
    x = torch.randn(3, 5, 24, requires_grad=True)
    dy = torch.randn(3, 5, 10)
    (q(x) * dy).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x2, q.weight, q.bias) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_of_an_adapter_that_added_chat_tokens(tmp_path, tie):
    """A chat fine-tune's adapter (ChatML tokens added, their rows trained) through `python -m llm.interop export`:
    --format peft gives OUT/base (vocab grown, chat tokenizer) + a PEFT LoRA with trainable tokens, and peft gives our
    logits on ids that use the new tokens; the default (hf) export merges it and transformers gives them too."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llm import chat
    from llm.interop.__main__ import main as interop
    from llm.loading import load_model

    tok = Tokenizer.train(["hello world, def f(x): return x " * 30], 300)
    ck.save(tmp_path / "base", "ckpt-1", tiny_model(vocab_size=tok.n_vocab, tie_embeddings=tie), tok)
    model = load_model(tmp_path / "base")[0]
    ctok, added = chat.chat_tokenizer(tok)
    cfg = lora.LoRAConfig(4, 8.0, 0.0, ALL)
    lora.grow_vocab(model, ctok.n_vocab)
    randomized(lora.apply_lora(model, cfg, new_rows=(tok.n_vocab, len(added))))
    ck.save(tmp_path / "lora", "ckpt-1", model, ctok, None, None, None, lora.adapter_tensors(model),
               weights_file=lora.ADAPTER_FILE, json_files={lora.ADAPTER_CONFIG: lora.adapter_config(
                   cfg, model, str(tmp_path / "base"), tok.n_vocab, added)})
    x = torch.tensor([chat.prompt_ids(ctok, [{"role": "user", "content": "hello"}])])
    assert x.max() >= tok.n_vocab  # the prompt uses the added tokens
    ours = load_model(tmp_path / "lora")[0](x)[0]
    assert interop(["export", str(tmp_path / "lora"), str(tmp_path / "peft"), "--format", "peft"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits[..., :ctok.n_vocab], ours[..., :ctok.n_vocab], atol=1e-4,
                                   rtol=1e-4)
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "peft" / "base")
    assert their_tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                         return_dict=False) == x[0].tolist()
    assert interop(["export", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0  # hf: merged
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits[..., :ctok.n_vocab], ours[..., :ctok.n_vocab], atol=1e-4,
                                   rtol=1e-4)
