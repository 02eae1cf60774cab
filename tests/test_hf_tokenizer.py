"""Tokenizers from Hugging Face model directories give transformers' ids on mixed text.

Every tokenizer is built here: a small BPE trained with the `tokenizers` library in the
style of GPT-2 (vocab.json + merges.txt or tokenizer.json), Llama 3 and Qwen2 (split regex +
byte-level BPE in tokenizer.json, run by tiktoken), and a SentencePiece-style tokenizer.json
(run by the `tokenizers` library). No downloads.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest

transformers = pytest.importorskip("transformers")

from conftest import streamed_text  # noqa: E402
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers.implementations import SentencePieceBPETokenizer  # noqa: E402

from llm.tokenizer import Tokenizer  # noqa: E402

MIXED = [
    "Hello world! It's a test: don't panic, we'll see 12345 and 3.14159 tomorrow.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != None:\n        print(f'{x!r}')\r\n",
    "日本語のテキストと中文字符，한국어도 있어요。",
    "Emoji: 🤖🎉👍🏽 and 👨\u200d👩\u200d👧 family…   spaced   out  \n\n",
    "Caf\u0065\u0301 (decomposed) vs Café, ÅNGSTRÖM 1234567 'LL 'S",
]
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus() -> list[str]:
    return [inspect.getsource(textwrap), inspect.getsource(json.decoder)] + MIXED * 3


def byte_level(pattern: str | None, specials: list[str], normalize: bool = False, vocab: int = 700) -> HFTokenizer:
    """A byte-level BPE: GPT-2's ByteLevel regex (pattern None) or Split(pattern) + ByteLevel."""
    hf = HFTokenizer(models.BPE(ignore_merges=pattern is not None))
    if normalize:
        hf.normalizer = normalizers.NFC()
    if pattern is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    hf.train_from_iterator(corpus(), trainer)
    hf.add_special_tokens(specials)
    return hf


def check_same_ids(ours: Tokenizer, ref) -> None:
    for text in MIXED + ["".join(MIXED)]:
        want = ref(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == want, text
        assert ours.decode(want) == ref.decode(want)
        assert streamed_text(ours, want) == ref.decode(want)
        assert ours.encode(text, bos=ours.add_bos) == ref(text).input_ids


def test_gpt2_tokenizer_json_and_vocab_merges_give_transformers_ids(tmp_path):
    hf = byte_level(None, ["<|endoftext|>"])
    ref = transformers.GPT2TokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    ref.save_pretrained(tmp_path / "json")
    ours = Tokenizer.from_hf(tmp_path / "json")
    assert ours.info["kind"] == "bpe"  # tiktoken runs it
    assert ours.eot_id == hf.token_to_id("<|endoftext|>") and not ours.add_bos
    check_same_ids(ours, transformers.AutoTokenizer.from_pretrained(tmp_path / "json"))
    # the classic pair of files, without tokenizer.json
    (tmp_path / "files").mkdir()
    vocab = hf.get_vocab()
    (tmp_path / "files" / "vocab.json").write_text(json.dumps(vocab))
    merges = json.loads(hf.to_str())["model"]["merges"]
    (tmp_path / "files" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ours2 = Tokenizer.from_hf(tmp_path / "files")
    assert ours2.eot_id == ours.eot_id
    check_same_ids(ours2, ref)


def test_llama3_style_tokenizer_json_gives_transformers_ids_with_bos(tmp_path):
    hf = byte_level(LLAMA3_PAT, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    hf.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", hf.token_to_id("<|begin_of_text|>"))])
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|begin_of_text|>",
                                               eos_token="<|end_of_text|>")
    ref.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf(tmp_path)
    assert ours.info["kind"] == "bpe"
    assert ours.add_bos and ours.bos_id == hf.token_to_id("<|begin_of_text|>")
    assert ours.eot_id == hf.token_to_id("<|end_of_text|>")
    check_same_ids(ours, ref)
    # special-token strings: plain text unless asked (then as transformers splits them)
    text = "a<|eot_id|>b"
    assert hf.token_to_id("<|eot_id|>") not in ours.encode(text)
    assert ours.encode(text, allow_special=True) == ref(text, add_special_tokens=False).input_ids


def test_qwen2_style_nfc_and_added_tokens_give_transformers_ids(tmp_path):
    hf = byte_level(QWEN2_PAT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalize=True)
    hf.add_tokens(["<think>"])  # a non-special added token: matched in any text, as transformers does
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>")
    ref.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf(tmp_path)
    assert ours.info["kind"] == "bpe" and ours.info["normalize"] == "NFC"
    check_same_ids(ours, ref)
    text = "<think>Caf\u0065\u0301</think>"
    assert ours.encode(text) == ref(text).input_ids
    assert hf.token_to_id("<think>") in ours.encode(text)


def test_sentencepiece_style_tokenizer_runs_through_tokenizers_library(tmp_path):
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus(), vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>", bos_token="<s>",
                                               eos_token="</s>")
    ref.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf(tmp_path)
    assert ours.info["kind"] == "hf" and ours.eot_id == sp.token_to_id("</s>")
    for text in MIXED:
        want = ref(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == want
        assert ours.decode(want) == ref.decode(want)
    # our checkpoints keep it: save writes tokenizer.json, load reads it back
    (tmp_path / "ckpt").mkdir()
    info = ours.save(tmp_path / "ckpt")
    again = Tokenizer.load(tmp_path / "ckpt", info)
    assert again.encode(MIXED[0]) == ours.encode(MIXED[0]) and again.eot_id == ours.eot_id


def test_imported_byte_level_tokenizer_survives_our_checkpoint_format(tmp_path):
    hf = byte_level(QWEN2_PAT, ["<|endoftext|>", "<|im_end|>"], normalize=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>").save_pretrained(tmp_path)
    ours = Tokenizer.from_hf(tmp_path)
    (tmp_path / "ckpt").mkdir()
    again = Tokenizer.load(tmp_path / "ckpt", json.loads(json.dumps(ours.save(tmp_path / "ckpt"))))
    assert again.eot_id == ours.eot_id == hf.token_to_id("<|im_end|>")
    for text in MIXED:
        assert again.encode(text) == ours.encode(text)


def test_directory_without_tokenizer_gives_one_line(tmp_path):
    from llm.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"^no tokenizer in .*tokenizer.json, or vocab.json \+ merges.txt\)$"):
        Tokenizer.from_hf(tmp_path)
