"""Imported Hugging Face models give transformers' logits and greedy continuations (RELIABILITY 18).

Each family is a tiny randomly initialised transformers model with the family's non-default
features (GQA, biases, q/k norm, llama3 RoPE scaling, sliding window, tied/untied heads),
saved with save_pretrained into a temp dir and imported with llm.interop.hf. No downloads.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm.checkpoint import CheckpointError  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.interop.hf import load_hf  # noqa: E402
from llm.loading import load_model  # noqa: E402

V, CTX = 101, 128
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=CTX, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # 64: all three frequency bands at head_dim 16

FAMILIES = {
    # classic GPT-2, tied head
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=48, n_layer=2, n_head=4,
                                            bos_token_id=None, eos_token_id=None),
    # GPT-2 with its own LM head
    "gpt2-untied": lambda: transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=48, n_layer=2, n_head=4,
                                                   tie_word_embeddings=False, bos_token_id=None,
                                                   eos_token_id=None),
    # Llama 2: MHA, theta 1e4, untied
    "llama2": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=4, rms_norm_eps=1e-5),
    # Llama 3.1: GQA, theta 5e5, llama3 RoPE scaling, untied
    "llama3.1": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500000.0,
                                                 rope_scaling=LLAMA3, rms_norm_eps=1e-5),
    # Llama 3.2: as 3.1 with a tied head and MQA
    "llama3.2": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=1, rope_theta=500000.0,
                                                 rope_scaling=LLAMA3, tie_word_embeddings=True),
    # Mistral: GQA, a sliding window shorter than the 72-token generation, head_dim != hidden / heads
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, head_dim=24, sliding_window=16,
                                                  rope_theta=1e6),
    # Qwen2.5: q/k/v biases, GQA, tied
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2, rope_theta=1e6,
                                              tie_word_embeddings=True),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 (H * D = 128 != hidden 64), untied
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32, rope_theta=1e6),
    # Mixtral: 4 experts, top-2, GQA
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2, rope_theta=1e6),
}


def make_hf(family: str, path, seed: int = 0, **save_kw):
    """A tiny transformers model with weights large enough that its logits have clear argmaxes."""
    torch.manual_seed(seed)
    cfg = FAMILIES[family]()
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name or "ln" in name else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path, **save_kw)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_hf_model_matches_transformers_logits_and_greedy(family, tmp_path):
    ref = make_hf(family, tmp_path)
    model, tok, cfg = load_hf(tmp_path, tokenizer=False, kernels="torch")
    assert tok is None and cfg["model_type"] == ref.config.model_type
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, 40), generator=g)
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = model(idx)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{family}: max |logit difference| {err:.3g}"

    prompt = torch.randint(0, V, (1, 8), generator=g)
    want_ids = ref.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64, pad_token_id=0)
    got_ids = generate(model, prompt, 64, temperature=0.0)
    assert got_ids.shape == (1, 72)
    assert got_ids.tolist() == want_ids.tolist()


def test_sharded_checkpoint_with_index_loads(tmp_path):
    ref = make_hf("llama3.1", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _, _ = load_hf(tmp_path, tokenizer=False)
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert (model(idx)[0] - ref(idx).logits).abs().max().item() <= 1e-4


def test_load_into_target_dtype(tmp_path):
    make_hf("qwen2", tmp_path)
    model, _, _ = load_hf(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32  # RoPE tables stay fp32
    assert model.lm_head.weight is model.tok_emb.weight  # tied stays tied


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_truncated_shard_gives_one_clear_line(tmp_path):
    make_hf("llama2", tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path, tokenizer=False)
    msg = _one_line_error(e)
    assert shard.name in msg and "not a readable safetensors file" in msg


def test_missing_index_entry_gives_one_clear_line(tmp_path):
    make_hf("llama2", tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    j = json.loads(index.read_text())
    del j["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    index.write_text(json.dumps(j))
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path, tokenizer=False)
    msg = _one_line_error(e)
    assert "missing: model.layers.1.self_attn.k_proj.weight" in msg and index.name in msg


def test_index_naming_a_missing_shard_gives_one_clear_line(tmp_path):
    make_hf("llama2", tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path, tokenizer=False)
    assert shard.name in _one_line_error(e)


@pytest.mark.parametrize("edit,needle", [
    ({"model_type": "bert"}, "unsupported Hugging Face architecture 'bert'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn'"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
])
def test_unsupported_config_values_are_named_in_one_line(tmp_path, edit, needle):
    make_hf("llama2", tmp_path)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | edit))
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path, tokenizer=False)
    assert needle in _one_line_error(e)


def test_pickle_only_directory_is_refused(tmp_path):
    make_hf("llama2", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert "pytorch_model.bin is pickle-based" in _one_line_error(e)


def test_config_lacking_a_key_is_one_line(tmp_path):
    make_hf("llama2", tmp_path)
    p = tmp_path / "config.json"
    j = json.loads(p.read_text())
    del j["hidden_size"]
    p.write_text(json.dumps(j))
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path, tokenizer=False)
    assert "lacks the key 'hidden_size'" in _one_line_error(e)


def test_sample_cli_names_an_unsupported_architecture(tmp_path, capsys):
    from llm.generate.cli import main as sample_main

    make_hf("llama2", tmp_path)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | {"model_type": "falcon"}))
    capsys.readouterr()  # drop transformers' save progress bar
    assert sample_main(["--checkpoint", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unsupported Hugging Face architecture 'falcon'" in err and "\n" not in err
