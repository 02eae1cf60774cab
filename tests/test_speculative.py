"""Speculative decoding: greedy output identical to plain decoding (draft model, prompt lookup, batched,
stops inside an accepted run, the context end), the rejection rule preserves the target distribution,
and a draft with another tokenizer is refused in one line."""

import pytest
import torch

from llm.config import ModelConfig
from llm.generate import SamplingError, SamplingParams, Stats, complete, generate
from llm.generate.speculative import Speculation, accept_sampled, check_tokenizers, lookup_draft
from llm.model import Transformer
from llm.tokenizer import Tokenizer

TEXT = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
        "class Point:\n    x: int = 0\n    y: int = 0\n\nprint('héllo wörld', 42)\n") * 20
GREEDY = SamplingParams(0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 300)


def tiny(tok, seed: int, block: int = 96) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=block, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      kernels="torch")
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return tiny(tok, 0)


@pytest.fixture(scope="module")
def other(tok) -> Transformer:
    return tiny(tok, 1)


def ids_of(tok, texts):
    return [tok.encode(t) for t in texts]


def run(model, prompt: torch.Tensor, n: int, spec=None, **kw) -> torch.Tensor:
    return generate(model, prompt, n, temperature=0.0, speculative=spec, **kw)


# ----------------------------------------------------------------------------- greedy identity


def test_draft_equal_to_target_accepts_every_token_and_emits_k_plus_one_per_pass(model, tok):
    prompt = torch.tensor([tok.encode("def add(a, b):")])
    n, K = 33, 4
    stats = Stats()
    plain = run(model, prompt, n)
    spec = [c.tokens for c in complete(model, tok, "def add(a, b):", n, params=GREEDY, stats=stats,
                                       speculative=Speculation(K, draft=model))]
    assert spec[0] == plain[0, prompt.shape[1]:].tolist()[: len(spec[0])]
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    assert stats.target_passes == -(-(stats.new_tokens - 1) // (K + 1))  # ceil: K + 1 tokens per target pass
    assert "100.0%" in stats.spec_line()


def test_unrelated_draft_gives_the_same_greedy_output_and_accepts_almost_nothing(model, other, tok):
    prompt = torch.tensor([tok.encode("class Point:")])
    stats = Stats()
    comps = complete(model, tok, "class Point:", 40, params=GREEDY, stats=stats,
                     speculative=Speculation(4, draft=other))
    plain = complete(model, tok, "class Point:", 40, params=GREEDY)
    assert comps[0].tokens == plain[0].tokens and comps[0].text == plain[0].text
    assert torch.equal(run(model, prompt, 40, Speculation(4, draft=other)), run(model, prompt, 40))
    assert stats.acceptance < 0.25


@pytest.mark.parametrize("k", [1, 3, 7])
def test_prompt_lookup_greedy_equals_plain(model, tok, k):
    prompt = torch.tensor([tok.encode(TEXT[:120])[:50]])
    assert torch.equal(run(model, prompt, 40, Speculation(k, lookup=3)), run(model, prompt, 40))


def test_lookup_draft_takes_what_followed_the_latest_longest_match():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup_draft(seq, 3, 2) == [7, 8]  # tail [2, 3] (no earlier [5, 2, 3]); latest match at index 5
    assert lookup_draft(seq, 1, 4) == [7, 8, 5, 2]
    assert lookup_draft([4, 5, 6], 3, 4) == []
    assert lookup_draft([7, 7, 7], 2, 4) == [7]  # overlapping match: what followed it, up to the end


@pytest.mark.parametrize("which", ["draft", "lookup"])
def test_batched_rows_equal_their_unbatched_runs(model, other, tok, which):
    texts = ["def add(a, b):", TEXT[:110], "x", "class Point:\n    x: int"]
    prompts = ids_of(tok, texts)
    spec = Speculation(3, draft=other) if which == "draft" else Speculation(3, lookup=2)
    for params in (GREEDY, SamplingParams(0.9, top_k=20)):
        batch = complete(model, tok, texts, 24, params=params, seed=3, speculative=spec, stop=["\n\n"])
        for r, t in enumerate(texts):
            alone = complete(model, tok, t, 24, params=params, seed=3 + r, speculative=spec, stop=["\n\n"])[0]
            assert batch[r].tokens == alone.tokens and batch[r].finish_reason == alone.finish_reason, (params, r)
            if params.greedy:
                plain = complete(model, tok, t, 24, params=params, stop=["\n\n"])[0]
                assert batch[r].tokens == plain.tokens
    assert len({len(p) for p in prompts}) > 1


def test_stop_string_and_end_of_text_inside_an_accepted_run(model, tok):
    spec = Speculation(6, draft=model)  # every draft accepted: the stop falls inside a run of 7 tokens
    plain = complete(model, tok, "def", 40, params=GREEDY)[0]
    stop = tok.decode(plain.tokens[9:11])
    a = complete(model, tok, "def", 40, params=GREEDY, stop=[stop], speculative=spec)[0]
    b = complete(model, tok, "def", 40, params=GREEDY, stop=[stop])[0]
    assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason) and a.finish_reason == "stop"
    prompt = torch.tensor([tok.encode("def")])
    eos = plain.tokens[10]
    got = run(model, prompt, 40, spec, eos_id=eos)
    assert torch.equal(got, run(model, prompt, 40, eos_id=eos)) and got.shape[1] < prompt.shape[1] + 40


def test_prompt_plus_new_tokens_plus_k_at_the_context_end_never_writes_past_the_cache(tok, model, other):
    long = tok.encode(TEXT)[:80]
    prompts = [long, long[:70]]  # 80 + 16 = the context length 96 exactly; K = 8 drafts would pass it
    for spec in (Speculation(8, draft=other), Speculation(8, draft=model), Speculation(8, lookup=3)):
        for p in prompts:
            t = torch.tensor([p])
            assert torch.equal(run(model, t, 16, spec), run(model, t, 16))
        got = complete(model, tok, [tok.decode(p) for p in prompts], 16, params=GREEDY, speculative=spec)
        assert all(len(c.tokens) <= 16 for c in got)
    with pytest.raises(SamplingError, match=r"prompt \(81 tokens\) \+ max_new_tokens \(16\) = 97 exceeds"):
        run(model, torch.tensor([tok.encode(TEXT)[:81]]), 16, Speculation(8, lookup=3))


# ----------------------------------------------------------------------------- sampling: the rejection rule

CHI2_999 = {4: 18.47, 5: 20.52}  # chi-square quantile 0.999 by degrees of freedom


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts.double()[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-model", "one-hot-lookup"])
def test_rejection_rule_keeps_the_target_distribution(deterministic):
    """Per position the emitted token is distributed as the target's p, whatever the draft's q is."""
    g = torch.Generator().manual_seed(0)
    N, K, V = 40000, 2, 6
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.10, 0.00],
                      [0.05, 0.05, 0.30, 0.30, 0.10, 0.20],
                      [0.20, 0.20, 0.20, 0.20, 0.10, 0.10]])
    q = torch.tensor([[0.10, 0.50, 0.10, 0.10, 0.10, 0.10],  # q puts mass where p has none (token 5)
                      [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
    if deterministic:  # a lookup proposes fixed tokens: q one-hot at them
        drafts = torch.tensor([1, 3]).expand(N, K)
    else:
        drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(K)], 1)
    P, Q = p.expand(N, K + 1, V), None if deterministic else q.expand(N, K, V)
    u, u_next = torch.rand(N, K, generator=g), torch.rand(N, generator=g)
    a, nxt = accept_sampled(P, Q, drafts, torch.full((N,), K), u, u_next)
    first = torch.where(a >= 1, drafts[:, 0], nxt)  # the first token of the round
    stat = chi2(torch.bincount(first, minlength=V), p[0])
    assert stat < CHI2_999[4], stat  # token 5 has probability 0: 6 - 1 - 1 degrees of freedom
    ok = a >= 1  # given d_1 accepted, the second token is distributed as p_1
    second = torch.where(a[ok] >= 2, drafts[ok, 1], nxt[ok])
    assert chi2(torch.bincount(second, minlength=V), p[1]) < CHI2_999[5]
    third = nxt[a == 2]  # the bonus token after every draft was accepted: from p_2
    assert chi2(torch.bincount(third, minlength=V), p[2]) < CHI2_999[5]


def test_rejection_rule_with_q_equal_p_accepts_everything():
    p = torch.tensor([[[0.5, 0.5, 0.0]] * 3])
    a, _ = accept_sampled(p, p[:, :2], torch.tensor([[0, 1]]), torch.tensor([2]), torch.tensor([[0.999, 0.999]]),
                          torch.tensor([0.3]))
    assert a.item() == 2


# ----------------------------------------------------------------------------- clear errors


def test_draft_with_another_tokenizer_is_refused_in_one_line(tok):
    other_tok = Tokenizer.train(["completely different text, other merges " * 50], 300)
    with pytest.raises(SamplingError) as e:
        check_tokenizers(tok, other_tok)
    assert "\n" not in str(e.value) and "tokenizer" in str(e.value)
    check_tokenizers(tok, Tokenizer.train([TEXT], 300))  # the same training gives the same tokenizer: accepted
    big = tiny(Tokenizer.train([TEXT], 400), 0)
    with pytest.raises(SamplingError, match="draft model's vocabulary"):
        run(tiny(tok, 0), torch.tensor([[1, 2]]), 4, Speculation(2, draft=big))


@pytest.mark.parametrize("kw, msg", [
    (dict(k=0, lookup=2), "speculate k must be >= 1"),
    (dict(k=2), "exactly one proposer"),
    (dict(k=2, lookup=0), "n-gram size must be >= 1"),
])
def test_bad_speculation_settings_give_one_clear_line(kw, msg):
    with pytest.raises(SamplingError, match=msg):
        Speculation(**kw)


def test_repetition_penalty_and_beams_are_refused_with_speculation(model, tok):
    with pytest.raises(SamplingError, match="repetition penalty"):
        complete(model, tok, "def", 4, params=SamplingParams(0.0, repetition_penalty=1.2),
                 speculative=Speculation(2, lookup=2))
    with pytest.raises(SamplingError, match="beam search"):
        complete(model, tok, "def", 4, num_beams=2, speculative=Speculation(2, lookup=2))
