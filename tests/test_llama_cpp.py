"""llama.cpp parity through llama-cpp-python (the `llamacpp` extra; `make test` installs it, building llama.cpp from
source the first time, ~5.5 min on 2 cores): llama.cpp loads every GGUF type we export, tokenizes a corpus to our
ids, and at f32 its greedy tokens equal ours. A bare `pytest` without the extra skips them; under CI (CI set) a
missing llama_cpp is an error, so CI cannot pass without running them."""

from __future__ import annotations

import os

import pytest
from conftest import GGUF_CORPUS

from llm.generate.api import complete
from llm.generate.sampling import SamplingParams
from llm.interop.gguf import TYPES, export_gguf

if os.environ.get("CI"):
    import llama_cpp  # CI installs it (make test): never a silent skip there
else:
    llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("qtype", TYPES)
def test_llama_cpp_loads_every_type_tokenizes_as_we_do_and_f32_greedy_equals_ours(gguf_model_and_tok, tmp_path, qtype):
    model, tok = gguf_model_and_tok
    path = export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    text = "".join(GGUF_CORPUS) + " unseen wörds 8675309 🙂🙂"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    theirs = _greedy(llm, tok.encode("def f(x):\n"), 12)
    assert all(0 <= t < tok.n_vocab for t in theirs)
    if qtype == "f32":
        ours = complete(model, tok, "def f(x):\n", 12, params=SamplingParams(0.0))[0].tokens
        assert theirs == list(ours)
    llm.close()
