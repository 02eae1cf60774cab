"""Serving a prefix-tuned checkpoint (`llm serve --checkpoint PREFIX_RUN`): the prefix's rows are blocks of the paged
pool every request's block table starts with (no prompt tokens spent), its tokens at positions P.., and every greedy
answer equals what `sample.py --checkpoint BASE --peft PREFIX_RUN` prints for it, with the prefix cache on, under
preemption, with a partial prefix block (P % block size != 0); the prefix's blocks are never freed."""

from __future__ import annotations

import asyncio

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llm import checkpoint as ck  # noqa: E402
from llm import peft, prefix  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.generate import SamplingParams, complete  # noqa: E402
from llm.loading import load_model  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build, main  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30
PROMPTS = ["def f(x):", "class Point:\n    x: int = 0\n" * 3, "# 日本語", "return x + 1 " * 4, "x"]

pytestmark = pytest.mark.usefixtures("one_thread")


def prefix_run(root, P: int):
    """A base checkpoint and a prefix-tuned run on it whose rows are moved off the base's (so the text changes)."""
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    base = ck.save(root / "base", "ckpt", Transformer(cfg), tok)
    model, _, _ = load_model(base, "cpu", torch.float32)
    pcfg = prefix.PrefixConfig(P, 0)
    peft.apply(model, pcfg, vocab=tok.n_vocab, seed=0)
    g = torch.Generator().manual_seed(P)
    with torch.no_grad():
        for t in (model.prefix.keys, model.prefix.values):
            t.mul_(1 + torch.randn(t.shape, generator=g))
    conf = peft.adapter_config(pcfg, model, str(base), tok.n_vocab, [])
    run = ck.save(root / "run", "ckpt-1", model, tok, None, None, None, peft.saved_tensors(model),
                  weights_file="adapter.safetensors", json_files={"adapter_config.json": conf})
    return base, run


@pytest.mark.parametrize("P, num_blocks, compile", [(11, None, False), (5, 13, False), (11, None, True)],
                         ids=["P11-shared-block-and-tail", "P5-preempted", "P11-compiled-decode-step"])
def test_prefix_served_from_shared_blocks_gives_sample_peft_text(tmp_path, P, num_blocks, compile):
    base_dir, run = prefix_run(tmp_path, P)
    model, tok, _ = load_model(run, "cpu", torch.float32, kernels="torch")  # how llm serve loads the run
    ref, _, _ = load_model(base_dir, "cpu", torch.float32, kernels="torch", lora=run)  # sample.py --peft RUN
    plain, _, _ = load_model(base_dir, "cpu", torch.float32, kernels="torch")
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + 3 * i) for i in range(10)]
    want = [complete(ref, tok, p, n, params=SamplingParams(0.0))[0].text for p, n in jobs]
    assert sum(w != complete(plain, tok, p, n, params=SamplingParams(0.0))[0].text
               for w, (p, n) in zip(want, jobs)) >= 5  # the prefix does change the text
    app, sched = build(model, tok, "run", max_batch=8, block_size=8, num_blocks=num_blocks, max_step_tokens=32,
                       compile=compile, compile_buckets=[8] if compile else None)  # one bucket: one compile
    eng, pool = sched.engine, sched.pool
    head = list(eng.head)
    assert len(head) == -(-P // 8) and len(eng.shared) == P // 8 and pool.used == len(head)
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        async def go(js):
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json={
                    "model": "run", "prompt": p, "max_tokens": n, "temperature": 0}) for p, n in js))

        got = [r.json()["choices"][0]["text"] for r in asyncio.run(go(jobs))]
        again = [r.json()["choices"][0]["text"] for r in asyncio.run(go(jobs[1:2]))]  # its blocks are cached now
        too_long = httpx.post(srv.url + "/v1/completions", json={"model": "run", "prompt": "x", "max_tokens": 96 - P})
    assert got == want and again == want[1:2]
    assert too_long.status_code == 400 and f"context length {96 - P}" in too_long.json()["error"]["message"]
    if num_blocks:  # a pool this small preempts (and evicts the cached blocks before the repeat comes)
        assert eng.preemptions > 0
    else:  # the repeated long prompt took cached blocks (named past the prefix)
        assert eng.prefix_hits >= len(tok.encode(PROMPTS[1])) - 8
    assert pool.used == len(head) and all(pool.ref[b] == 1 for b in head)  # held by the engine alone, not freed
    assert not compile or eng.captured.steps > 10  # decode steps ran compiled, their views starting at P
    k = pool.k[1].view(-1, *pool.k[1].shape[2:])[torch.tensor(head)[torch.arange(P) // 8] * 8 + torch.arange(P) % 8]
    torch.testing.assert_close(k, model.prefix.keys[1], atol=0, rtol=0)  # never overwritten


def test_prefix_with_lora_adapters_is_one_error_line(tmp_path, capsys):
    _, run = prefix_run(tmp_path, 4)
    assert main(["--checkpoint", str(run), "--lora", f"x={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "prefix-tuned" in err and len(err.strip().splitlines()) == 1
