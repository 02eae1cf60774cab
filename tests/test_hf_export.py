"""Export round trip: our checkpoint -> `python -m llm.interop export` -> transformers gives our logits and ids.

Models are tiny and random; the tokenizer is our own byte-level BPE trained here. No downloads.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_tokenizer import MIXED, corpus  # noqa: E402

from llm import checkpoint  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.generate.cli import main as sample_main  # noqa: E402
from llm.interop.__main__ import main as hf_main  # noqa: E402
from llm.loading import load_model  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

BASE = dict(block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, kernels="torch")
VARIANTS = {
    "llama": dict(rope_theta=500000.0, tie_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "llama-bias": dict(bias=True, n_kv_head=4),
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, n_kv_head=4),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=32),
    "mistral": dict(window=16),
    "mixtral": dict(n_experts=4, top_k=2, intermediate_size=96),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), 1000)


def save_ours(tmp_path, tok: Tokenizer, **kw) -> tuple[Transformer, object]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.n_vocab, **(BASE | kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model, checkpoint.save(tmp_path / "run", "ckpt-1", model, tok)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_round_trip_transformers_gives_our_logits(variant, tmp_path, tok):
    model, ckpt = save_ours(tmp_path, tok, **VARIANTS[variant])
    assert model.cfg.padded_vocab_size > tok.n_vocab  # padded embedding rows travel too
    assert hf_main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.model_type == variant.split("-")[0]
    idx = torch.randint(0, tok.n_vocab, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = model(idx)
        got = ref(idx).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{variant}: max |logit difference| {err:.3g}"
    # and back: the exported directory imports to the same logits
    again, tok2, _ = load_model(tmp_path / "hf", kernels="torch")
    with torch.no_grad():
        assert (again(idx)[0] - want).abs().max().item() <= 1e-5
    assert tok2.encode(MIXED[0]) == tok.encode(MIXED[0])


def test_exported_tokenizer_gives_our_ids_in_transformers(tmp_path, tok):
    _, ckpt = save_ours(tmp_path, tok)
    assert hf_main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tok.encode("".join(MIXED))) < 0.6 * len("".join(MIXED).encode())  # merges in use
    for text in MIXED + ["".join(MIXED)]:
        ids = tok.encode(text)
        assert ref(text, add_special_tokens=False).input_ids == ids, text
        assert ref.decode(ids) == tok.decode(ids)
    assert ref.eos_token_id == tok.eot_id


def test_sample_cli_runs_on_a_transformers_saved_directory(tmp_path, tok, capsys):
    _, ckpt = save_ours(tmp_path, tok)
    hf_main(["export", str(ckpt), str(tmp_path / "hf")])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "saved", max_shard_size="100KB")  # sharded, with an index
    transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "saved")
    capsys.readouterr()
    rc = sample_main(["--checkpoint", str(tmp_path / "saved"), "--prompt", "def f(x):", "--max-new-tokens", "12",
                      "--temperature", "0", "--device", "cpu", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    ids = torch.tensor([tok.encode("def f(x):")])
    want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = want[0, ids.shape[1]:].tolist()
    if tok.eot_id in new:
        new = new[: new.index(tok.eot_id)]
    assert out.out == tok.decode(new) + "\n"


def test_export_of_a_model_no_family_computes_is_one_line(tmp_path, tok, capsys):
    _, ckpt = save_ours(tmp_path, tok, mlp="gelu")  # GELU MLP with RoPE + RMSNorm: no transformers family
    assert hf_main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no transformers family computes this model (mlp=gelu") and "\n" not in err


def test_exported_config_is_plain_json_transformers_reads(tmp_path, tok):
    _, ckpt = save_ours(tmp_path, tok, **VARIANTS["llama"])
    hf_main(["export", str(ckpt), str(tmp_path / "hf")])
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["tie_word_embeddings"] is True
    assert conf["rope_scaling"]["rope_type"] == "llama3"
