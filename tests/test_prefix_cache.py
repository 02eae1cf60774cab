"""Automatic prefix caching (promise 27): ref-counted, named blocks with LRU eviction in the block pool, and a
server whose greedy / seeded output is the same with the cache on and off (and equals sample.py's), while the
shared prefix's prefill is skipped (/metrics hits, usage.prompt_tokens_details.cached_tokens)."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from llm.config import ModelConfig
from llm.generate import SamplingParams, complete
from llm.model import Transformer
from llm.paged_cache import BlockPool, PoolExhausted, block_hash
from llm.tokenizer import Tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llm.serve.launch import ThreadedServer, build  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30
SYSTEM = "class Point:\n    x: int = 0\n" * 5  # 60 tokens: 7 full blocks of 8

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pool_refcounts_names_and_evicts_least_recently_released():
    pool = BlockPool(1, 4, 2, 1, 2, "cpu", torch.float32)
    a = pool.alloc(2)
    names = [block_hash(None, [1, 2]), block_hash(block_hash(None, [1, 2]), [3, 4])]
    assert names[0] != block_hash(None, [1, 3]) and names[1] != block_hash(None, [3, 4])  # the chain matters
    for n, b in zip(names, a):
        pool.register(n, b)
    assert pool.lookup(names[0]) == a[0] and pool.ref[a[0]] == 2  # shared: two holders
    pool.release(a)
    assert pool.used == 1 and pool.cached == 2 and pool.free == 3  # a[1] idle but still named
    pool.release([a[0]])
    assert pool.used == 0 and pool.free == 4 and pool.cached == 2
    assert pool.lookup(names[1]) == a[1]  # a hit takes an idle block back
    pool.release([a[1]])
    b = pool.alloc(3)  # 2 fresh blocks, then the least recently released named one (a[0]) is evicted
    assert a[0] in b and a[1] not in b and pool.lookup(names[0]) is None and pool.cached == 1
    with pytest.raises(PoolExhausted):
        pool.alloc(2)
    pool.release(b)
    assert pool.used == 0 and pool.free == 4


@pytest.fixture(scope="module")
def model_tok():
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return Transformer(cfg).eval(), tok


def metric(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1))


def run(url: str, jobs: list[dict]) -> list[dict]:
    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(url + "/v1/completions", json=j) for j in jobs))

    return [r.json() for r in asyncio.run(go())]


def test_greedy_and_seeded_output_equal_with_and_without_the_prefix_cache(model_tok):
    model, tok = model_tok
    tails = ["def f(x):", "class Point:", "# 日本語", "return x + 1", "x"]
    jobs = [{"model": "m", "prompt": SYSTEM + t, "max_tokens": 6 + 3 * i, "temperature": 0}
            for i, t in enumerate(tails)]
    jobs += [{"model": "m", "prompt": SYSTEM + t, "max_tokens": 8, "temperature": 0.9, "seed": 3 + i}
             for i, t in enumerate(tails)]
    want = [complete(model, tok, j["prompt"], j["max_tokens"], params=SamplingParams(j["temperature"]),
                     seed=j.get("seed"))[0].text for j in jobs]
    got = {}
    for cache in (True, False):
        # a pool of 2 rows at full context: the finished rows' named blocks must be evicted for new ones
        app, sched = build(model, tok, "m", max_batch=2, block_size=8, max_step_tokens=32, prefix_cache=cache)
        with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
            first = run(srv.url, jobs[:1])  # warms the cache with the shared prefix
            rest = run(srv.url, jobs[1:])  # concurrent: at most 2 run at once, the rest queue
            got[cache] = [r["choices"][0]["text"] for r in first + rest]
            hits, queried = metric(srv.url, "llm_prefix_cache_hits_total"), metric(srv.url,
                                                                                   "llm_prefix_cache_queries_total")
            cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rest]
            assert sched.pool.used == 0 and sched.pool.cached <= sched.pool.n_blocks
        if cache:
            n_sys = len(tok.encode(SYSTEM, bos=tok.add_bos))
            assert queried == sum(len(tok.encode(j["prompt"], bos=tok.add_bos)) for j in jobs)
            assert hits >= 8 * (n_sys // 8) * (len(jobs) - 2) and min(cached) >= 8 * ((n_sys - 8) // 8), (hits, cached)
        else:
            assert hits == 0 and cached == [0] * len(rest)
    assert got[True] == got[False] == want
