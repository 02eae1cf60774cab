"""GGUF out and in (llm/interop/gguf.py): ours -> GGUF -> ours gives equal logits at f32 and equal token ids;
q8_0 / q4_0 weights come back within their scheme's error; sample.py and llm.eval take a .gguf checkpoint; an
architecture, tensor type or model we do not handle is one clear line."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import GGUF_CORPUS

from llm import checkpoint as ck
from llm.checkpoint import CheckpointError
from llm.config import ModelConfig
from llm.eval.__main__ import main as eval_main
from llm.generate.cli import main as sample_main
from llm.interop.export_gguf import main as export_main
from llm.interop.gguf import _to_pairs, export_gguf, load_gguf
from llm.loading import load_model
from llm.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def test_f32_round_trip_gives_equal_logits_and_token_ids(gguf_model_and_tok, tmp_path):
    model, tok = gguf_model_and_tok
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back, tok2, cfg = load_gguf(path)
    idx = torch.randint(0, tok.n_vocab, (2, 17))
    assert torch.equal(_logits(model, idx), _logits(back, idx))
    assert cfg["format"] == "gguf" and back.cfg.n_kv_head == 2 and not back.cfg.tie_embeddings
    text = "".join(GGUF_CORPUS) + "unseen wörds 8675309 <|endoftext|> 🙂🙂"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert (tok2.eot_id, tok2.bos_id, tok2.n_vocab) == (tok.eot_id, tok.bos_id, tok.n_vocab)
    assert tok2.decode(tok.encode(text)) == text


def test_q_and_k_rows_are_in_llama_cpp_pair_order(gguf_model_and_tok, tmp_path):
    """The exported attn_q rows are ours permuted per head to adjacent-pair RoPE order (row 2j = ours j, row
    2j+1 = ours j + D/2), which is what llama.cpp's llama rotates."""
    model, tok = gguf_model_and_tok
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    t = {x.name: x for x in gguf.GGUFReader(str(path)).tensors}
    q = torch.from_numpy(np.array(t["blk.0.attn_q.weight"].data))
    ours = model.blocks[0].attn.wqkv.weight[: 4 * 16].detach()
    assert torch.equal(q[0], ours[0]) and torch.equal(q[1], ours[8]) and torch.equal(q[2], ours[1])
    assert torch.equal(q, _to_pairs(ours, 4))


@pytest.mark.parametrize("qtype,levels,steps", [("q8_0", 127, 0.5), ("q4_0", 8, 1.0)])
def test_q8_0_and_q4_0_weights_come_back_within_the_schemes_error(gguf_model_and_tok, tmp_path, qtype, levels, steps):
    """Blocks of 32 along the input, d = max|w| / levels (fp16): q8_0 moves each weight by at most d / 2; q4_0
    (codes -8..7, d set by the block's largest |w| at -8) by d / 2, or up to d for weights of the other sign
    near +max that clip at code 7; plus the fp16 rounding of d times the largest code."""
    model, tok = gguf_model_and_tok
    back, _, _ = load_gguf(export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype))
    sd, sd2 = model.state_dict(), back.state_dict()
    for name in ("blocks.0.attn.wqkv.weight", "blocks.1.mlp.w2.weight", "lm_head.weight", "tok_emb.weight"):
        w, w2 = sd[name].double(), sd2[name].double()
        blocks = w.reshape(w.shape[0], -1, 32)
        d = blocks.abs().amax(dim=2, keepdim=True) / levels
        bound = (d * steps + d * levels * 2**-10).expand_as(blocks).reshape(w.shape)
        assert ((w - w2).abs() <= bound + 1e-12).all(), name
        assert (w - w2).abs().max() > 0  # really quantized
    for name in ("norm_f.weight", "blocks.0.norm1.weight"):  # 1-D tensors stay f32
        assert torch.equal(sd[name], sd2[name])


def test_sample_and_eval_take_a_gguf_checkpoint(gguf_model_and_tok, tmp_path, capsys):
    model, tok = gguf_model_and_tok
    path = export_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    m2, tok2, cfg = load_model(path, quantize={"format": "llm-weight-only", "version": 1, "mode": "int8",
                                               "group_size": None, "embeddings": False})
    assert cfg["quantization"]["mode"] == "int8"
    assert sample_main(["--checkpoint", str(path), "--prompt", "def f", "--max-new-tokens", "4",
                        "--temperature", "0", "--quiet"]) == 0
    assert eval_main(["--checkpoint", str(path), "--dataset", __file__, "--max-tokens", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1


def test_what_we_do_not_read_or_write_is_one_clear_line(gguf_model_and_tok, tmp_path):
    model, tok = gguf_model_and_tok
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not read"):
        load_gguf(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "q41.gguf"), "llama")
    data = gguf.quants.quantize(np.random.randn(4, 32).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("token_embd.weight", data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="Q4_1 are not read"):
        load_gguf(tmp_path / "q41.gguf")
    with pytest.raises(CheckpointError, match="type must be one of"):
        export_gguf(model, tok, tmp_path / "x.gguf", "q5_k")
    gelu = Transformer(ModelConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                   mlp="gelu", norm="layernorm", pos_emb="learned", bias=True))
    with pytest.raises(CheckpointError, match="not a plain Llama"):
        export_gguf(gelu, tok, tmp_path / "g.gguf", "f32")


def test_export_from_a_saved_checkpoint_round_trips(gguf_model_and_tok, tmp_path):
    model, tok = gguf_model_and_tok
    d = ck.save(tmp_path, "ckpt-1", model, tok)
    m, t, _ = load_model(d)
    back, _, _ = load_gguf(export_gguf(m, t, tmp_path / "c.gguf", "f16"))
    idx = torch.randint(0, tok.n_vocab, (1, 9))
    torch.testing.assert_close(_logits(back, idx), _logits(model, idx), atol=2e-2, rtol=0)


def test_export_cli_writes_a_file_and_refuses_in_one_line(gguf_model_and_tok, tmp_path, capsys):
    model, tok = gguf_model_and_tok
    d = ck.save(tmp_path, "ckpt-1", model, tok)
    assert export_main([str(d), str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    assert "q4_0" in capsys.readouterr().out and (tmp_path / "m.gguf").stat().st_size > 0
    assert export_main([str(tmp_path / "nope"), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
