"""llama.cpp parity through llama-cpp-python (the opt-in `llamacpp` extra: it builds llama.cpp from source, ~14 CPU
minutes, so CI's dev install leaves it out and these tests skip without it): llama.cpp loads every GGUF type we
export, tokenizes a corpus to our ids, and at f32 its greedy tokens equal ours."""

from __future__ import annotations

import pytest
import torch

from llm.config import ModelConfig
from llm.generate.api import complete
from llm.generate.sampling import SamplingParams
from llm.interop.gguf import TYPES, export_gguf
from llm.model import Transformer
from llm.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["def f(x):\n    return x + 1\n" * 20, "héllo wörld, 123 4567 日本語 🙂\n\n\n  tabs\tand 'quotes' it's\r\n"]


@pytest.fixture(scope="module")
def model_and_tok():
    tok = Tokenizer.train(CORPUS, 320)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, tie_embeddings=False)
    return Transformer(cfg).eval(), tok


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("qtype", TYPES)
def test_llama_cpp_loads_every_type_tokenizes_as_we_do_and_f32_greedy_equals_ours(model_and_tok, tmp_path, qtype):
    model, tok = model_and_tok
    path = export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    text = "".join(CORPUS) + " unseen wörds 8675309 🙂🙂"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    theirs = _greedy(llm, tok.encode("def f(x):\n"), 12)
    assert all(0 <= t < tok.n_vocab for t in theirs)
    if qtype == "f32":
        ours = complete(model, tok, "def f(x):\n", 12, params=SamplingParams(0.0))[0].tokens
        assert theirs == list(ours)
    llm.close()
