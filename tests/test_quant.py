"""Weight-only quantization: error bounds, QuantLinear vs the reference, quantized checkpoints (bit-exact round
trip, sample.py / llm.eval / load_model on ours and on a Hugging Face directory), one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import reference as ref
from llm import checkpoint as ck
from llm import ops, quant
from llm.config import ModelConfig
from llm.eval.__main__ import main as eval_main
from llm.generate.cli import main as sample_main
from llm.loading import load_model
from llm.model import Transformer
from llm.quantize.__main__ import main as quantize_main
from llm.tokenizer import Tokenizer
from llm.train.cli import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A small checkpoint of ours: widths that are multiples of 16 (torch's CPU int4 kernel) and 96 % 64 != 0."""
    d = tmp_path_factory.mktemp("ours")
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 40], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=2, n_kv_head=1,
                                    n_embd=96, intermediate_size=160)).eval()
    return ck.save(d, "ckpt-1", model, tok)


@pytest.mark.parametrize("K", [96, 100, 257])
def test_quantize_dequantize_error_is_within_the_schemes_bound(K):
    w = torch.randn(48, K) * 0.05 + 0.02
    q, s = quant.quantize_int8(w)
    err = (w - q.float() * s.float()[:, None]).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6) + 1e-9).all()
    for g in quant.GROUP_SIZES:
        q4, s4, z4 = quant.quantize_int4(w, g)
        deq = ref.int4_dequant_ref(q4, s4, z4, g, K)
        sg = s4.float().repeat_interleave(g, 1)[:, :K]
        zg = z4.float().repeat_interleave(g, 1)[:, :K]
        bound = sg / 2 + 2**-10 * (zg.abs() + 8 * sg)  # s/2, plus the fp16 rounding of the stored offset
        assert ((w - deq).abs() <= bound).all(), g
        assert int(ref.int4_unpack_ref(q4, K).max()) <= 15


@pytest.mark.parametrize("mode,g", [("int8", None), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_quant_linear_equals_reference_dequant_and_matmul(mode, g, M):
    lin = torch.nn.Linear(96, 48, bias=True)
    m = quant.QuantLinear.from_linear(lin, mode, g, "auto")
    x = torch.randn(M, 96)
    w = m.weight.float()
    want = x @ w.t() + m.bias
    torch_ = quant.QuantLinear.from_linear(lin, mode, g, "torch")
    torch.testing.assert_close(torch_(x), want, atol=1e-5, rtol=1e-5)  # the reference route
    # auto: a few rows take the C GEMV (int16 activations; its exact bound is checked in tests/test_cpu_gemv.py)
    # or, without a C compiler, torch's CPU kernels (bf16 activations); more rows take the reference (fp32)
    tol = dict(atol=1e-5, rtol=1e-5) if M > ops.CPU_WOQ_MAX_M else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(m(x), want, **tol)


def test_quantized_checkpoint_round_trips_bit_exactly(ours, tmp_path):
    for mode, extra in [("int8", []), ("int4", ["--group-size", "64", "--embeddings"])]:
        out = tmp_path / mode
        assert quantize_main(["--checkpoint", str(ours), "--mode", mode, "--out", str(out), *extra]) == 0
        stored, _ = ck.read_tensors(out / ck.MODEL_FILE)
        model, _, cfg = load_model(out)
        assert cfg["quantization"]["mode"] == mode
        again = ck.model_tensors(model, quant.storage_state(model))
        assert stored.keys() == again.keys()
        for k, t in stored.items():
            assert t.dtype == again[k].dtype and torch.equal(t.view(torch.uint8), again[k].view(torch.uint8)), k
        assert {stored[k].dtype for k in stored if k.endswith("qweight")} == {
            torch.int8 if mode == "int8" else torch.uint8} | ({torch.int8} if extra else set())


def test_sample_and_eval_run_on_quantized_checkpoints(ours, tmp_path, capsys):
    q4 = tmp_path / "q4"
    assert quantize_main(["--checkpoint", str(ours), "--mode", "int4", "--group-size", "32", "--out", str(q4)]) == 0
    for args in (["--checkpoint", str(q4)], ["--checkpoint", str(ours), "--quantize", "int8"]):
        assert sample_main([*args, "--prompt", "def f", "--max-new-tokens", "5", "--temperature", "0", "--quiet"]) == 0
        assert eval_main([*args, "--dataset", __file__, "--max-tokens", "200", "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["perplexity"] > 1


def test_hf_directory_quantizes_samples_and_evaluates(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    hf = tmp_path / "hf"
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train_from_iterator(["def f(x): return x + 1\n" * 20], tokenizers.trainers.BpeTrainer(
        vocab_size=272, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>"]))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    tk.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    q8 = tmp_path / "q8"
    assert quantize_main(["--checkpoint", str(hf), "--mode", "int8", "--out", str(q8)]) == 0
    for args in (["--checkpoint", str(q8)], ["--checkpoint", str(hf), "--quantize", "int4", "--group-size", "32"]):
        assert sample_main([*args, "--prompt", "def f", "--max-new-tokens", "4", "--temperature", "0", "--quiet"]) == 0
        assert eval_main([*args, "--dataset", __file__, "--max-tokens", "100", "--json"]) == 0
    capsys.readouterr()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_requests_get_one_clear_line(ours, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert quantize_main(["--checkpoint", str(ours), "--mode", "int3", "--out", out]) == 2
    assert "unknown quantization mode 'int3'" in _one_line(capsys)
    assert quantize_main(["--checkpoint", str(ours), "--mode", "int4", "--group-size", "48", "--out", out]) == 2
    assert "group size must be one of 32, 64, 128" in _one_line(capsys)
    assert quantize_main(["--checkpoint", str(ours), "--mode", "int8", "--out", out]) == 0
    capsys.readouterr()
    again = str(tmp_path / "q2")
    assert quantize_main(["--checkpoint", out, "--mode", "int4", "--out", again]) == 2
    assert "already quantized (int8)" in _one_line(capsys)
    assert sample_main(["--checkpoint", out, "--quantize", "int4", "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "already quantized (int8)" in _one_line(capsys)
    assert sample_main(["--checkpoint", out, "--quantize", "int8", "--prompt", "x", "--max-new-tokens", "2",
                        "--quiet"]) == 0  # the same scheme: nothing to do
    capsys.readouterr()


def test_unknown_scheme_in_a_checkpoint_is_one_line(ours, tmp_path):
    out = tmp_path / "q"
    assert quantize_main(["--checkpoint", str(ours), "--mode", "int8", "--out", str(out)]) == 0
    cfg = json.loads((out / ck.CONFIG_FILE).read_text())
    cfg["quantization"]["mode"] = "nf4"
    (out / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(quant.QuantError, match="unknown quantization mode 'nf4'"):
        load_model(out)


def test_training_from_a_quantized_checkpoint_is_refused(ours, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize_main(["--checkpoint", str(ours), "--mode", "int8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train_main(["--init-from", str(out), "--out-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "--init-from: the checkpoint is quantized (int8)" in _one_line(capsys)
    assert train_main(["--resume", str(out), "--out-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "--resume: the checkpoint is quantized (int8)" in _one_line(capsys)
