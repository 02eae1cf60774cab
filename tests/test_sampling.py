"""Samplers (promise 15): greedy, temperature, top-k, top-p, min-p, repetition penalty, their order, seeds."""

import pytest
import torch

from llm.generate.sampling import SamplingError, SamplingParams, draw, penalize, row_uniforms, sample, seen_mask, warp


def logits_of(probs) -> torch.Tensor:
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def support(logits: torch.Tensor, p: SamplingParams, n: int = 400) -> set[int]:
    """Tokens drawn over n uniforms spread over [0, 1)."""
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return {int(t) for t in sample(logits.expand(n, -1), p, u)}


def test_temperature_zero_is_argmax_of_the_penalised_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, 37)
    assert torch.equal(sample(logits, SamplingParams(0.0)), logits.argmax(-1))
    seen = torch.zeros(5, 37, dtype=torch.bool)
    seen[torch.arange(5), logits.argmax(-1)] = True  # penalise every row's favourite
    pen = penalize(logits, seen, 50.0)
    assert torch.equal(sample(logits, SamplingParams(0.0, repetition_penalty=50.0), seen=seen), pen.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_one_is_greedy_at_any_temperature_and_uniform(temperature):
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    for u in (0.0, 0.37, 0.999999):
        got = sample(logits, SamplingParams(temperature, top_k=1), torch.full((6,), u))
        assert torch.equal(got, logits.argmax(-1))


def test_top_k_is_clamped_to_the_vocabulary():
    torch.manual_seed(2)
    logits = torch.randn(3, 11)
    u = torch.rand(3)
    assert torch.equal(sample(logits, SamplingParams(1.0, top_k=10_000), u), sample(logits, SamplingParams(1.0), u))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert support(logits, SamplingParams(1.0, top_p=0.75)) == {0, 1}
    assert support(logits, SamplingParams(1.0, top_p=0.8)) == {0, 1}  # mass before token 2 is 0.8 >= p
    assert support(logits, SamplingParams(1.0, top_p=0.81)) == {0, 1, 2}
    assert support(logits, SamplingParams(1.0, top_p=0.01)) == {0}
    assert support(logits, SamplingParams(1.0, top_p=1.0)) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert support(logits, SamplingParams(1.0, min_p=0.2)) == {0, 1, 2}  # threshold 0.1
    assert support(logits, SamplingParams(1.0, min_p=0.7)) == {0}


def test_order_is_penalty_temperature_top_k_top_p_min_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]])
    seen = torch.tensor([[True, False, False, False, True]])
    p = SamplingParams(2.0, top_k=3, top_p=0.6, min_p=0.5, repetition_penalty=4.0)
    x = torch.where(seen, torch.where(logits > 0, logits / 4.0, logits * 4.0), logits) / 2.0  # [.375, 1, .5, .25, -2]
    keep = x >= x.topk(3).values[:, -1:]  # tokens 0, 1, 2
    x = x.masked_fill(~keep, float("-inf"))
    probs, order = x.softmax(-1).sort(descending=True)  # token 1, 2, 0: ~0.45, 0.27, 0.28 -> keep 1, 2
    drop = (probs.cumsum(-1) - probs) >= 0.6
    x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    pr = x.softmax(-1)
    x = x.masked_fill(pr < 0.5 * pr.max(), float("-inf"))
    got = warp(penalize(logits, seen, 4.0), p)
    torch.testing.assert_close(got, x)
    assert torch.isfinite(got).sum() == 2  # the chain really cut something at each stage


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(penalize(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 2.0, -2.0]]))
    assert penalize(logits, seen, 1.0) is logits


def test_inverse_cdf_draw_follows_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    n = 20_000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    toks = draw(torch.log(probs).expand(n, -1), u)
    freq = torch.bincount(toks, minlength=6).float() / n
    torch.testing.assert_close(freq, probs, atol=1e-3, rtol=0)
    edge = draw(torch.log(probs)[None].expand(3, -1), torch.tensor([0.0, 1.0 - 2**-24, 1.0]))
    assert edge.tolist() == [1, 4, 4]  # u = 0 and u -> 1 land on the first / last token with mass


def test_row_uniforms_depend_on_the_row_seed_only():
    a = row_uniforms([5, 6, 7], 20)
    b = row_uniforms([6], 20)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert bool(((a >= 0) & (a < 1)).all())


def test_seen_mask_marks_prompt_tokens():
    m = seen_mask([[1, 3, 3], [0]], 5)
    assert m.tolist() == [[False, True, False, True, False], [True, False, False, False, False]]


@pytest.mark.parametrize("kw,msg", [
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_p=-0.1), "top_p must be in (0, 1], got -0.1"),
    (dict(temperature=-1), "temperature must be a finite number >= 0 (0 = greedy), got -1"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be >= 1, got 0"),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0 (1 = off), got 0.0"),
], ids=["p0", "p1.5", "p-neg", "temp", "temp-nan", "k0", "minp", "rep"])
def test_bad_sampling_parameters_give_one_clear_line(kw, msg):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kw)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)
