"""Generation (promises 13-16): context limits, prompts, seeds, ragged batches with per-row stops,
beam search, streaming text, the decode step that CUDA graphs capture."""

import pytest
import torch
from conftest import tiny_model

from llm.config import ModelConfig
from llm.generate import (
    Decoder,
    SamplingError,
    SamplingParams,
    Stats,
    TextStream,
    complete,
    fit_prompts,
    generate,
    prefill,
    stream_text,
    stream_tokens,
)
from llm.generate.sampling import row_uniforms, seen_mask
from llm.model import Transformer
from llm.tokenizer import EOT, Tokenizer

TEXT = ("def add(a, b):\n    return a + b\n\n# 日本語のコメント 😀 emoji 🎉 中文 字符\n"
        "class Point:\n    x: int = 0\n\nprint('héllo wörld', 42)\n") * 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 300)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return tiny_model(vocab_size=tok.n_vocab, block_size=96).eval()


def greedy_by_hand(model, ids: list[int], n: int, vocab: int) -> list[int]:
    """Uncached greedy decoding: the full sequence through the model every step."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1, :vocab].argmax()))
    return seq[len(ids):]


# ----------------------------------------------------------------------------- promise 15


def test_temperature_zero_and_top_k_one_are_greedy(model):
    prompt = torch.randint(0, 300, (2, 5))
    greedy = generate(model, prompt, 20, temperature=0, vocab_limit=300)
    topk1 = generate(model, prompt, 20, temperature=1.3, top_k=1, seed=3, vocab_limit=300)
    assert torch.equal(greedy, topk1)
    for r in range(2):
        assert greedy[r, 5:].tolist() == greedy_by_hand(model, prompt[r].tolist(), 20, 300)


def test_same_seed_same_text(model, tok):
    p = SamplingParams(1.0, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    a = complete(model, tok, "def", 30, params=p, seed=7)[0]
    b = complete(model, tok, "def", 30, params=p, seed=7)[0]
    c = complete(model, tok, "def", 30, params=p, seed=8)[0]
    assert a.tokens == b.tokens and a.text == b.text and a.tokens != c.tokens


@pytest.mark.parametrize("kw,msg", [
    (dict(top_p=1.01), "top_p must be in (0, 1], got 1.01"),
    (dict(min_p=-1.0), "min_p must be in [0, 1], got -1.0"),
    (dict(prefill_chunk=-1), "prefill chunk must be >= 0 (0 = one pass), got -1"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(num_beams=2, num_return=3), "beam search returns 1 to num_beams (2) sequences per prompt, asked for 3"),
], ids=["top-p", "min-p", "chunk", "max-new", "beams"])
def test_bad_parameters_give_one_clear_line(model, kw, msg):
    from llm.generate.beam import beam_search

    kw = dict(max_new_tokens=5) | kw
    with pytest.raises(SamplingError) as e:
        if "num_return" in kw:
            beam_search(model, [[1, 2]], kw["max_new_tokens"], kw["num_beams"], num_return=kw["num_return"])
        else:
            generate(model, torch.zeros(1, 3, dtype=torch.long), **kw)
    assert str(e.value) == msg


# ----------------------------------------------------------------------------- promise 13


def test_prompt_plus_new_tokens_beyond_context_is_refused_before_compute(model, monkeypatch):
    called = []
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: called.append(1))
    with pytest.raises(SamplingError, match=r"^prompt \(90 tokens\) \+ max_new_tokens \(10\) = 100 exceeds the context "
                                            r"length 96"):
        generate(model, torch.zeros(1, 90, dtype=torch.long), 10)
    with pytest.raises(SamplingError, match=r"max_new_tokens \(96\) leaves no room for a prompt in the context "
                                            r"length 96"):
        fit_prompts([[1]], 96, 96, truncate=True)
    assert not called


def test_truncate_prompt_keeps_the_last_tokens_that_fit(model, tok):
    long_text = TEXT[:2000]
    ids = tok.encode(long_text)
    assert len(ids) > 96
    c = complete(model, tok, long_text, 16, params=SamplingParams(0.0), truncate_prompt=True)[0]
    assert c.prompt == ids[-80:] and len(c.tokens) <= 16


# ----------------------------------------------------------------------------- promise 14


def test_empty_prompt_starts_from_the_end_of_text_token(model, tok):
    c = complete(model, tok, "", 8, params=SamplingParams(0.0))[0]
    assert c.prompt == [tok.eot_id]
    expect = greedy_by_hand(model, [tok.eot_id], 8, tok.n_vocab)
    assert c.tokens == expect[: len(c.tokens)] and (len(c.tokens) == 8 or c.finish_reason == "eos")


def test_prompt_with_a_special_token_string_is_plain_text(model, tok):
    text = f"x = 1{EOT}y"
    c = complete(model, tok, text, 4, params=SamplingParams(0.0))[0]
    assert tok.eot_id not in c.prompt and tok.decode(c.prompt) == text and len(c.prompt) > 3


@pytest.mark.parametrize("prompt", ["日本語のコメント", "😀 emoji 🎉", "中文 字符 héllo"],
                         ids=["cjk", "emoji", "mixed"])
def test_cjk_and_emoji_prompts_stream_and_round_trip(model, tok, prompt):
    assert tok.decode(tok.encode(prompt)) == prompt
    comps: list = []
    pieces = list(stream_text(model, tok, prompt, 40, params=SamplingParams(1.0), seed=1, completions=comps))
    c = comps[0]
    assert "".join(p for _, p in pieces) == c.text == tok.decode(c.tokens)
    assert all(r == 0 and p for r, p in pieces)


def test_text_stream_never_splits_a_character_and_replaces_invalid_bytes():
    s = TextStream()
    data = "a日😀".encode()  # 1 + 3 + 4 bytes, fed one byte at a time
    out = [s.push(data[i:i + 1]) for i in range(len(data))]
    assert out == ["a", "", "", "日", "", "", "", "😀"]
    s2 = TextStream()
    assert s2.push(b"\xe6\x97") == "" and s2.push(b"x") == "\ufffdx" and s2.push(b"\xff") == "\ufffd"
    s3 = TextStream()
    assert s3.push(b"\xf0\x9f") == "" and s3.close() == "\ufffd"


def test_text_stream_cuts_at_the_first_stop_string_and_holds_back_prefixes():
    s = TextStream(["END", "\n\n"])
    assert s.push(b"ab") == "ab" and s.push(b"cE") == "c" and s.push(b"N") == ""
    assert s.push(b"Dtail") == "" and s.stopped and s.close() == ""
    s = TextStream(["END"])
    assert s.push(b"xEN") == "x" and s.push(b"q") == "ENq" and s.close() == ""
    s = TextStream(["\n\n", "a\n"])
    assert s.push("é\n".encode()) == "é" and s.push(b"\n") == "" and s.stopped


# ----------------------------------------------------------------------------- promise 16


def test_batched_rows_equal_unbatched_with_different_lengths_and_per_row_stops(model, tok):
    """Every row of a ragged batch equals its run alone (fp32), greedy and sampled; each stops on its own."""
    prompts = ["def add(a, b):", "x", "class Point:\n    x: int"]
    for params in (SamplingParams(0.0), SamplingParams(0.9, top_k=40, repetition_penalty=1.1)):
        free = complete(model, tok, prompts, 24, params=params, seed=11)
        stop = [clean_slice(free[0].text, 3), clean_slice(free[2].text, 6)]  # rows 0 and 2 stop early
        batch = complete(model, tok, prompts, 24, params=params, seed=11, stop=stop)
        for r, p in enumerate(prompts):
            alone = complete(model, tok, p, 24, params=params, seed=11 + r, stop=stop)[0]
            assert (batch[r].tokens, batch[r].text, batch[r].finish_reason) == \
                   (alone.tokens, alone.text, alone.finish_reason), r
        assert batch[0].finish_reason == "stop" and batch[0].text == free[0].text[:free[0].text.find(stop[0])]
        assert batch[2].finish_reason == "stop" and len(batch[2].tokens) < len(free[2].tokens)


def clean_slice(text: str, start: int) -> str:
    """Two characters of text from `start` on that are not U+FFFD (a random model emits invalid UTF-8)."""
    i = next(i for i in range(start, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    return text[i:i + 2]


def test_rows_stop_at_their_own_eos(model):
    prompt = torch.randint(0, 300, (3, 4))
    free = generate(model, prompt, 15, temperature=0)
    eos = int(free[0, 6])  # row 0 emits this token at its 3rd step
    out = generate(model, prompt, 15, temperature=0, eos_id=eos)
    steps = list(stream_tokens(model, prompt.tolist(), 15, SamplingParams(0.0), eos_ids=[eos]))
    assert bool((out[0, 6:] == eos).all()) and steps[2][0] == eos and all(s[0] is None for s in steps[3:])
    for r in (1, 2):
        n = next((t for t in range(4, out.shape[1]) if int(free[r, t]) == eos), out.shape[1])
        assert torch.equal(out[r, :n], free[r, :n])


# ----------------------------------------------------------------------------- beams


def test_one_beam_is_greedy(model, tok):
    prompt = torch.randint(0, 300, (2, 6))
    from llm.generate.beam import beam_search

    for ids in (prompt[0].tolist(), [3]):
        h = beam_search(model, [ids], 25, 1, vocab_limit=300)[0][0]
        assert h.tokens == greedy_by_hand(model, ids, 25, 300) and h.finish_reason == "length"
    for stop in (["a"], [tok.decode(greedy_by_hand(model, tok.encode("def"), 4, 300)[2:4])]):
        g = complete(model, tok, "def", 20, params=SamplingParams(0.0), stop=stop)[0]
        h = beam_search(model, [tok.encode("def")], 20, 1, eos_ids=[tok.eot_id], vocab_limit=tok.n_vocab,
                        stop=[s.encode() for s in stop], token_bytes=lambda i: tok.decode_bytes([i]))[0][0]
        assert (h.tokens, h.finish_reason) == (g.tokens, g.finish_reason)
    assert g.finish_reason == "stop"


def test_beam_search_finds_the_best_sequence_when_the_beam_is_wide():
    """With K >= V^(n-1) beams nothing is pruned: the result is the exhaustive argmax of log p(seq)."""
    torch.manual_seed(5)
    m = Transformer(ModelConfig(vocab_size=5, pad_vocab_multiple=1, block_size=16, n_layer=1, n_head=2,
                                n_embd=16, kernels="torch")).eval()
    from llm.generate.beam import beam_search

    prompt, n = [1, 2], 3
    best, best_lp = None, -float("inf")
    with torch.no_grad():
        for s in range(5**n):
            seq = [s // 25 % 5, s // 5 % 5, s % 5]
            lp = m(torch.tensor([prompt + seq]))[0][0].log_softmax(-1)
            total = sum(float(lp[len(prompt) - 1 + t, seq[t]]) for t in range(n))
            if total > best_lp:
                best, best_lp = seq, total
    h = beam_search(m, [prompt], n, 25, length_penalty=0.0)[0][0]
    assert h.tokens == best and h.score == pytest.approx(best_lp, abs=1e-4)


# ----------------------------------------------------------------------------- decode step


def test_static_decode_step_equals_eager(model):
    """What a CUDA graph captures (static cache, in-step sampling, on-device uniform index) is the eager math."""
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    params = SamplingParams(0.8, top_p=0.95, repetition_penalty=1.3)
    runs = []
    for mode in ("eager", "static"):
        cache = model.new_cache(2, 5 + 30)
        u = row_uniforms([4, 5], 30)
        dec = Decoder(model, cache, params, u, seen_mask(prompts, 300), 300, mode)
        tok = dec.first(prefill(model, cache, prompts))
        toks = [tok]
        for _ in range(29):
            tok = dec.step(tok)
            toks.append(tok)
        runs.append(torch.stack(toks, 1))
        assert cache.static == (mode == "static") and cache.host_lengths == [34, 31]
    assert torch.equal(runs[0], runs[1])
    got = [s for s in stream_tokens(model, prompts, 30, params, seed=4, vocab_limit=300, mode="static")]
    assert [s[0] for s in got] == runs[0][0].tolist()


def test_graph_mode_needs_cuda(model):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SamplingError, match="CUDA-graph decoding needs the model on a CUDA device"):
        list(stream_tokens(model, [[1, 2]], 3, SamplingParams(0.0), mode="graph"))


def test_stats_count_tokens_and_time(model, tok):
    stats = Stats()
    comps = complete(model, tok, ["a", "bc"], 12, params=SamplingParams(0.0), stats=stats)
    assert stats.rows == 2 and stats.new_tokens == sum(len(c.tokens) + (c.finish_reason == "eos") for c in comps)
    assert 0 < stats.ttft <= stats.total and "TTFT" in stats.line() and "tok/s" in stats.line()


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(model):
    """torch.compile of the static step (seconds to compile): same ids as eager, ragged rows, every sampler stage."""
    prompts = [[5, 6, 7, 8, 9], [1], [4, 4, 4]]
    p = SamplingParams(0.9, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.3)
    eager = list(stream_tokens(model, prompts, 12, p, seed=3, eos_ids=[7], vocab_limit=300))
    stats = Stats()
    got = list(stream_tokens(model, prompts, 12, p, seed=3, eos_ids=[7], vocab_limit=300, mode="compile", stats=stats))
    assert got == eager
    # the compiling first step is timed apart and kept out of the rate: its tokens are the rows still running then
    assert stats.warmup_what == "compile" and 0 < stats.warmup < stats.total - stats.ttft
    assert stats.warmup_tokens == sum(t is not None for t in got[1])
    assert "compile" in stats.line() and stats.decode_tok_s is not None
