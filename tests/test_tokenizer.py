"""Tokenizer: trained byte-level BPE in tiktoken format; round trips; special tokens as plain text."""

import pytest
from conftest import streamed_text

from llm.tokenizer import EOT, Tokenizer, TokenizerError

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 20,
          "for i in range(10):\n    print(i)\n" * 5, "class Foo:\n    pass\n"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS * 3, vocab_size=300)


@pytest.mark.parametrize("text", ["", "hello world", "日本語のテキスト", "emoji 😀🎉 mixed ünïcödé", "a\n\n\tb  c",
                                  "\u0000\uffff", "x" * 500], ids=["empty", "ascii", "cjk", "emoji", "space",
                                                                  "control", "long"])
def test_round_trips_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_and_eot(tok):
    assert tok.n_vocab == 300 and tok.eot_id == 299


def test_merges_learned_from_corpus(tok):
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox") / 2


def test_special_token_string_is_plain_text_unless_asked(tok):
    ids = tok.encode(f"a{EOT}b")
    assert tok.eot_id not in ids and tok.decode(ids) == f"a{EOT}b"
    assert tok.eot_id in tok.encode(f"a{EOT}b", allow_special=True)


def test_invalid_utf8_is_replaced_not_raised(tok):
    ids = tok.encode("é")  # two bytes; decoding only the first byte token is invalid UTF-8
    first_byte = [i for i in range(256) if tok.decode_bytes([i]) == "é".encode()[:1]]
    assert tok.decode(first_byte) == "\ufffd"
    assert tok.decode(ids) == "é"


def test_streaming_holds_back_partial_utf8(tok):
    ids = tok.encode("ab😀c")
    assert streamed_text(tok, ids) == "ab😀c"


def test_save_load_round_trip(tok, tmp_path):
    info = tok.save(tmp_path)
    again = Tokenizer.load(tmp_path, info)
    s = "def add(a, b): return 日本 😀"
    assert again.encode(s) == tok.encode(s) and again.n_vocab == tok.n_vocab


def test_named_encoding_errors_are_clear():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'nope'"):
        Tokenizer.named("nope")


def test_too_small_vocab():
    with pytest.raises(TokenizerError, match="vocab_size must be >= 257"):
        Tokenizer.train(CORPUS, 100)
