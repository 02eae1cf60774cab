"""KV cache (promise 17): cached == uncached logits for 200+ steps, chunked prefill == one prefill,
ragged rows, static (CUDA-graph) mode == dynamic mode, GQA-width storage, no write past the end."""

import pytest
import torch
from conftest import cached_and_uncached, tiny_model

from kernels.reference import decode_attention_ref, kv_attention_ref
from llm import ops
from llm.generate import prefill
from llm.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def build(**kw) -> Transformer:
    return tiny_model(**(dict(vocab_size=97, block_size=256) | kw)).eval()


VARIANTS = {"llama-gqa": {}, "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, n_kv_head=4),
            "qwen-like": dict(qkv_bias=True, qk_norm=True, n_kv_head=1), "window": dict(window=9)}


def test_cache_is_preallocated_at_the_gqa_width_and_sized_to_the_request():
    model = build()
    cache = model.new_cache(3, 40)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 40, 2, 8) and cache.v[1].shape == (3, 40, 2, 8)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 30)), cache=cache)
        model(torch.randint(0, 97, (3, 1)), cache=cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs  # written in place, never reallocated


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_cached_logits_equal_uncached_for_210_steps(variant):
    """Promise 17: fp32, atol = rtol = 1e-5, every step of a 210-token decode, two rows."""
    model = build(**VARIANTS[variant])
    prompt = torch.randint(0, 97, (2, 7))
    seq, cached, full = cached_and_uncached(model, prompt, 210)
    assert seq.shape[1] == 217
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 16, 33])
@pytest.mark.parametrize("variant", ["llama-gqa", "window"])
def test_chunked_prefill_equals_one_prefill(chunk, variant):
    """Promise 17, ragged rows included: last-token logits and every cached K/V entry agree."""
    model = build(**VARIANTS[variant])
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (33, 5, 20)]
    one, many = model.new_cache(3, 40), model.new_cache(3, 40)
    a = prefill(model, one, prompts, chunk=0)
    b = prefill(model, many, prompts, chunk=chunk)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert one.host_lengths == many.host_lengths == [33, 5, 20] and one.lengths.tolist() == [33, 5, 20]
    for r, n in enumerate([33, 5, 20]):
        for layer in range(2):
            torch.testing.assert_close(many.k[layer][r, :n], one.k[layer][r, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(many.v[layer][r, :n], one.v[layer][r, :n], atol=1e-5, rtol=1e-5)


def test_default_cpu_chunking_of_a_long_prompt_equals_one_pass():
    model = build(block_size=640)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (600, 530)]
    one, auto = model.new_cache(2, 620), model.new_cache(2, 620)
    torch.testing.assert_close(prefill(model, auto, prompts), prefill(model, one, prompts, chunk=0),
                               atol=1e-5, rtol=1e-5)
    for layer in range(2):
        torch.testing.assert_close(auto.k[layer][0, :600], one.k[layer][0, :600], atol=1e-5, rtol=1e-5)


def test_ragged_prefill_and_decode_equal_each_row_alone():
    model = build()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    cache = model.new_cache(3, 11 + 6)
    with torch.no_grad():
        last = [prefill(model, cache, prompts)]
        nxt = torch.randint(0, 97, (3, 6))
        for t in range(6):
            last.append(model(nxt[:, t:t + 1], cache=cache)[0][:, -1])
        for r, p in enumerate(prompts):
            full, _ = model(torch.tensor([p + nxt[r].tolist()]))
            alone = full[0, len(p) - 1:]  # logits after the prompt and after each fed token
            torch.testing.assert_close(torch.stack([x[r] for x in last]), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_static_masked_attention_equals_the_reference(window):
    """The CUDA-graph step attends over every slot with a device-side mask: same result."""
    torch.manual_seed(3)
    B, S, H, Hkv, D, Tq = 3, 24, 4, 2, 8, 2
    q = torch.randn(B, Tq, H, D)
    k, v = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    lengths = torch.tensor([5, 24, 13])
    got = kv_attention_ref(q, k, v, lengths, window)
    if window is None:
        torch.testing.assert_close(got, decode_attention_ref(q, k, v, lengths), atol=1e-6, rtol=1e-6)
    for b in range(B):  # each row against plain causal attention over its own prefix
        n = int(lengths[b])
        s = torch.einsum("thd,shd->hts", q[b], k[b, :n].repeat_interleave(H // Hkv, 1)) * D**-0.5
        pos = torch.arange(n - Tq, n)[:, None]
        keep = torch.arange(n)[None] <= pos
        if window is not None:
            keep &= pos - torch.arange(n)[None] < window
        o = torch.einsum("hts,shd->thd", s.masked_fill(~keep, float("-inf")).softmax(-1),
                         v[b, :n].repeat_interleave(H // Hkv, 1))
        torch.testing.assert_close(got[b], o, atol=1e-5, rtol=1e-5)


def test_static_mode_forward_equals_dynamic_mode():
    model = build()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (6, 2)]
    caches = [model.new_cache(2, 20), model.new_cache(2, 20)]
    toks = torch.randint(0, 97, (2, 8))
    outs = []
    with torch.no_grad():
        for static, cache in zip((False, True), caches):
            prefill(model, cache, prompts)
            cache.static = static
            steps = []
            for t in range(8):
                steps.append(model(toks[:, t:t + 1], cache=cache)[0][:, -1])
                if static:  # a static step leaves the host copy to its driver
                    assert cache.host_lengths == [6 + t, 2 + t]
                    cache.advance_host(1)
            outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert caches[1].lengths.tolist() == caches[1].host_lengths == caches[0].host_lengths == [14, 10]
    caches[1].check_room(6)  # skipped in static mode; the driver's host check still refuses
    with pytest.raises(ValueError, match="KV cache overflow: 21 positions needed, the cache holds 20"):
        caches[1].check_room(7, host=True)


def test_cache_refuses_to_write_past_its_end_before_compute():
    """Promise 13: never a write past the end of the KV cache."""
    model = build()
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        prefill(model, cache, [[1, 2, 3, 4, 5, 6], [1, 2]])
        before = [t.clone() for t in cache.k]
        with pytest.raises(ValueError, match="KV cache overflow: 9 positions needed, the cache holds 8"):
            model(torch.ones(2, 3, dtype=torch.long), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k)) and cache.host_lengths == [6, 2]


def test_reorder_moves_rows_with_their_lengths():
    model = build()
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        prefill(model, cache, [[1, 2, 3], [4]])
    k0 = cache.k[0].clone()
    cache.reorder(torch.tensor([1, 1, 0]))
    assert cache.batch == 3 and cache.host_lengths == [1, 1, 3] and cache.lengths.tolist() == [1, 1, 3]
    assert torch.equal(cache.k[0][2], k0[0]) and torch.equal(cache.k[0][0], k0[1])


ROUTES = [  # (host lengths incl. the new tokens, Tq, window, static step): one per route of ops.kv_attention
    pytest.param([9, 9, 9], 5, None, False, id="uniform-prefill"),
    pytest.param([17, 17, 17], 1, 4, False, id="uniform-windowed-step"),
    pytest.param([17, 17, 17], 1, None, False, id="uniform-step"),  # torch: mask-free SDPA over the prefix
    pytest.param([5, 24, 13], 1, None, False, id="ragged-step"),
    pytest.param([6, 20, 13], 3, None, False, id="ragged-chunk"),
    pytest.param([5, 24, 13], 2, 4, False, id="ragged-windowed"),
    pytest.param([5, 24, 13], 1, None, True, id="static-step"),
    pytest.param([5, 24, 13], 1, 4, True, id="static-windowed"),
]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("lens,Tq,window,static", ROUTES)
def test_every_route_of_kv_attention_equals_its_reference(lens, Tq, window, static, kernels):
    """ops.kv_attention picks attention / decode_attention / the masked reference from the lengths it is
    given; whichever it picks (Triton under the interpreter, or torch) equals kv_attention_ref."""
    B, S, H, Hkv, D = len(lens), 24, 4, 2, 16
    q = torch.randn(B, Tq, H, D)
    k, v = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    lengths = torch.tensor(lens)
    got = ops.kv_attention(q, k, v, lengths, None if static else list(lens), window=window, kernels=kernels)
    want = kv_attention_ref(q, k, v, lengths, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("S", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_query_attention_equals_unmasked_attention(heads, S, dtype):
    """The CPU decode route (one query per row, heads grouped by KV head, two matmuls) is attention_ref
    without a mask, in fp32 to rounding and in bf16 within one rounding of the result."""
    from kernels.reference import attention_ref, one_query_attention_ref

    H, Hkv = heads
    gen = torch.Generator().manual_seed(S + H + Hkv)
    q = torch.randn(3, 1, H, 16, generator=gen).to(dtype)
    k, v = (torch.randn(3, S, Hkv, 16, generator=gen).to(dtype) for _ in range(2))
    got, want = one_query_attention_ref(q, k, v), attention_ref(q, k, v, causal=False)
    assert got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
