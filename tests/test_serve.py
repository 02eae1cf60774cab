"""The OpenAI-compatible server (promises 23-26): real clients, continuous batching that keeps each
request's text, blocks freed on disconnect, 429 on a full queue, 4xx for bad input, 401 without the key.

A live server on 127.0.0.1 (a free port) in a background thread, over a tiny random-init model saved
as a checkpoint and loaded back the way `python -m llm.serve` loads it; one test runs the CLI itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llm.checkpoint import save  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.generate import SamplingParams, complete  # noqa: E402
from llm.loading import load_model  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build, free_port, model_id  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return save(tmp_path_factory.mktemp("serve"), "ckpt", Transformer(cfg), tok)


@pytest.fixture(scope="module")
def loaded(ckpt):
    model, tok, _ = load_model(ckpt, "cpu", torch.float32, kernels="torch")
    return model, tok


def serve(loaded, **kw) -> ThreadedServer:
    model, tok = loaded
    app, sched = build(model, tok, "tiny", **({"max_batch": 8, "block_size": 8, "max_step_tokens": 32} | kw))
    return ThreadedServer(app, sched, drain_timeout=2.0)


@pytest.fixture(scope="module")
def server(loaded):
    with serve(loaded) as srv:
        yield srv


def unbatched(loaded, prompt: str, n: int, params: SamplingParams, seed: int | None = None) -> str:
    """What sample.py prints for this prompt alone (complete() is its code path)."""
    model, tok = loaded
    return complete(model, tok, prompt, n, params=params, seed=seed)[0].text


def wait_idle(srv: ThreadedServer, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not (srv.sched.idle() and srv.sched.pool.used == 0):
        assert time.monotonic() - t0 < timeout, f"not idle after {timeout} s: {srv.sched.pool.used} blocks used"
        time.sleep(0.02)


def test_openai_client_completions_chat_streaming_and_metrics(server, loaded):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = unbatched(loaded, "def f(x):", 12, SamplingParams(0.0))
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens >= 1 and r.object == "text_completion"
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == want and len(pieces) > 1

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "日本語 😀"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text

    m = httpx.get(server.url + "/metrics").text
    for name in ("llm_queue_depth", "llm_running_requests", "llm_tokens_per_second",
                 'llm_time_to_first_token_seconds_quantile{quantile="0.99"}',
                 'llm_request_latency_seconds_quantile{quantile="0.5"}', "llm_kv_blocks_used 0.0"):
        assert name in m, name


def test_echo_and_logprobs_for_loglikelihood_clients(server, loaded):
    """lm-eval's local-completions: prompt ids, echo + logprobs, max_tokens 1 -> the prompt's token logprobs."""
    model, tok = loaded
    ids = tok.encode("def f(x):\n    return x")
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1,
                                                         "temperature": 0, "logprobs": 1, "echo": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    want = torch.log_softmax(logits[0, :-1, : tok.n_vocab], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, atol=1e-4, rtol=1e-4)
    assert r["choices"][0]["text"].startswith(tok.decode(ids))


def test_32_concurrent_streams_of_mixed_lengths_all_complete_and_keep_their_unbatched_text(server, loaded):
    prompts = ["def f(x):", "# 日本語", "class Point:\n" * 9, "x", "return x + 1 " * 6, "中文 😀 🎉"]
    jobs = []
    for i in range(32):
        p = prompts[i % len(prompts)]
        n = 4 + (i * 7) % 21
        if i % 2 == 0:
            jobs.append((p, n, dict(temperature=0), SamplingParams(0.0), None))
        else:  # sampled, seeded: the same text as sample.py with that seed, too
            extra = dict(top_k=40) if i % 3 else dict(repetition_penalty=1.3, min_p=0.01)
            jobs.append((p, n, dict(temperature=0.9, top_p=0.95, seed=100 + i, extra_body=extra),
                         SamplingParams(0.9, extra.get("top_k"), 0.95, extra.get("min_p"),
                                        extra.get("repetition_penalty", 1.0)), 100 + i))

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(p, n, kw):
            out = []
            async for c in await client.completions.create(model="tiny", prompt=p, max_tokens=n, stream=True, **kw):
                out.append(c.choices[0].text)
            return "".join(out)

        return await asyncio.wait_for(asyncio.gather(*(one(p, n, kw) for p, n, kw, _, _ in jobs)), 120)

    texts = asyncio.run(run_all())
    assert len(texts) == 32
    for (p, n, _, params, seed), got in zip(jobs, texts):
        assert got == unbatched(loaded, p, n, params, seed), (p, n, params, seed)
    wait_idle(server)


def test_client_killed_mid_stream_has_its_blocks_freed(server):
    """8 choices x 120 tokens: far longer than the disconnect takes to notice, so the job is cut off."""
    before = server.sched.metrics.requests.labels(outcome="cancelled")._value.get()
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions",
                      json={"model": "tiny", "prompt": "def", "max_tokens": 120, "n": 8, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.sched.pool.used > 0
        # leaving the block closes the connection mid-stream
    wait_idle(server)
    assert server.sched.metrics.requests.labels(outcome="cancelled")._value.get() == before + 1


def test_full_queue_answers_429_with_retry_after(loaded):
    """Batch 1, queue 1: of 6 requests sent at once, one runs, one waits, the rest get 429 (none is lost)."""
    with serve(loaded, max_batch=1, max_queue=1) as srv:
        body = {"model": "tiny", "prompt": "def", "max_tokens": 100}

        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json=body) for _ in range(6)))

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
        for r in rs:
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        wait_idle(srv)


BAD = [
    ("malformed-json", b'{"model": "tiny", "prompt": ', 400),
    ("wrong-type", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400),
    ("negative", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400),
    ("absurd-temperature", {"model": "tiny", "prompt": "x", "temperature": 1e9}, 400),
    ("absurd-n", {"model": "tiny", "prompt": "x", "n": 10000}, 400),
    ("too-many-rows", {"model": "tiny", "prompt": "x", "n": 9}, 400),
    ("bad-token-id", {"model": "tiny", "prompt": [1, 999999]}, 400),
    ("empty-prompt", {"model": "tiny", "prompt": []}, 400),
    ("over-context", {"model": "tiny", "prompt": "x " * 100, "max_tokens": 100}, 400),
    ("missing-prompt", {"model": "tiny"}, 400),
    ("unknown-model", {"model": "gpt-9", "prompt": "x"}, 404),
    ("file-as-model", {"model": "/etc/passwd", "prompt": "x"}, 404),
]


def rejected(url: str) -> dict[str, float]:
    """llm_rejected_requests_total by reason, from /metrics."""
    m = httpx.get(url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r'llm_rejected_requests_total\{reason="(\w+)"\} (\S+)', m)}


def test_bad_inputs_answer_4xx_errors_and_running_streams_continue(server, loaded):
    want = unbatched(loaded, "def f(x):", 60, SamplingParams(0.0))
    before = rejected(server.url)
    assert before.keys() >= {"invalid_request", "model_not_found", "queue_full", "shutting_down"}  # listed at 0
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json={"model": "tiny", "prompt": "def f(x):",
                                                                    "max_tokens": 60, "temperature": 0,
                                                                    "stream": True}) as running:
            lines = running.iter_lines()
            first = next(lines)
            for name, body, status in BAD:
                kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                    else {"json": body}
                r = c.post(server.url + "/v1/completions", **kw)
                assert r.status_code == status, (name, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], name
            chat = c.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
            assert chat.status_code == 400
            assert c.get(server.url + "/v1/nothing").status_code == 404
            rest = [first] + list(lines)
    after = rejected(server.url)
    assert after["model_not_found"] - before["model_not_found"] == 2
    assert after["context_length_exceeded"] - before["context_length_exceeded"] == 1
    assert sum(after.values()) - sum(before.values()) == len(BAD) + 2  # every refusal counted once
    chunks = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]" or [x for x in rest if x][-1] == "data: [DONE]"
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == want
    wait_idle(server)


def test_api_key_required_when_set(loaded):
    with serve(loaded, api_key="s3cret") as srv:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 401
        bad = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def test_cli_names_the_run_and_sigterm_drains_with_503_for_new_requests(ckpt):
    """`--checkpoint OUT/latest` serves the run's name (printed at start). After SIGTERM the socket stays open:
    new requests get 503 shutting_down (counted in llm_rejected_requests_total), /health says draining, and
    the running stream and the queued requests finish before the process exits 0."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llm.serve", "--checkpoint", str(ckpt.parent / "latest"),
                             "--port", str(port), "--max-batch", "4", "--threads", "1", "--drain-timeout", "30"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    url, name = f"http://127.0.0.1:{port}", ckpt.parent.name
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 60, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [name]
        queued = {"model": name, "prompt": "def", "max_tokens": 60, "n": 4, "temperature": 0}

        async def background():  # 3 jobs of 4 rows x 60 tokens behind the stream: the drain has work to do
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(url + "/v1/completions", json=queued) for _ in range(3)))

        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/completions", json={"model": name, "prompt": "def", "max_tokens": 100,
                                                                 "temperature": 0, "stream": True}) as r:
                lines = r.iter_lines()
                got = [next(lines)]
                pool = ThreadPoolExecutor(1)
                later = pool.submit(asyncio.run, background())
                deadline = time.monotonic() + 120
                while "llm_queue_depth 0.0" in httpx.get(url + "/metrics").text or \
                        "llm_queue_depth 1.0" in httpx.get(url + "/metrics").text:
                    # until the jobs wait in the queue (one 4-row job runs at a time at batch 4); a bound, so a
                    # machine too loaded to see them wait fails here instead of polling forever
                    if later.done() or time.monotonic() > deadline:
                        pytest.fail("the queued jobs were never seen waiting (/metrics llm_queue_depth < 2) before "
                                    f"they {'finished' if later.done() else 'timed out'}")
                    time.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                while httpx.get(url + "/health", timeout=5).status_code == 200:  # a refused connection fails here
                    time.sleep(0.01)
                late = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
                assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
                m = httpx.get(url + "/metrics").text
                assert 'llm_rejected_requests_total{reason="shutting_down"} 1.0' in m, m
                got += list(lines)
                done = later.result(timeout=60)
        assert [x for x in got if x][-1] == "data: [DONE]"
        finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in got if x.startswith("data: {")]
        assert finals[-1] in ("stop", "length")  # finished, not cut off
        assert [r.status_code for r in done] == [200] * 3
        assert all(ch["finish_reason"] in ("stop", "length") for r in done for ch in r.json()["choices"])
        assert proc.wait(timeout=30) == 0
        assert f"serving model id '{name}'" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_model_id_is_the_runs_name(tmp_path):
    run = tmp_path / "my-run"
    (run / "ckpt-0000200").mkdir(parents=True)
    (run / "latest").write_text("ckpt-0000200")
    (tmp_path / "Llama-3-8B").mkdir()
    assert model_id(run) == model_id(run / "latest") == model_id(run / "ckpt-0000200") == "my-run"
    assert model_id(tmp_path / "Llama-3-8B") == "Llama-3-8B"


def test_64_mixed_requests_with_preemption_and_random_cancels_lose_nothing_and_leak_no_block(loaded):
    """A pool of 20 blocks for 8 rows (a row can need 10): rows are preempted and recomputed. Every request that
    is not cancelled streams exactly its unbatched text (no token lost or repeated); the pool ends empty."""
    import random

    rng = random.Random(0)
    prompts = ["def f(x):", "# 日本語", "class Point:\n" * 4, "x", "return x + 1 " * 3, "中文 😀 🎉"]
    jobs = []
    for i in range(64):
        p, n = prompts[i % len(prompts)], rng.randint(4, 40)
        if rng.random() < 0.5:
            body, params, seed = {"temperature": 0}, SamplingParams(0.0), None
        else:
            body = {"temperature": 0.8, "top_k": 30, "seed": i, "repetition_penalty": 1.2 if i % 3 else 1.0}
            params, seed = SamplingParams(0.8, 30, None, None, body["repetition_penalty"]), i
        cancel = rng.randint(1, 3) if rng.random() < 0.25 else None
        jobs.append(({"model": "tiny", "prompt": p, "max_tokens": n, "stream": True,
                      "n": 2 if i % 7 == 0 else 1} | body, params, seed, cancel))

    async def one(c, url, body, cancel):
        texts, chunks = {}, 0
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
                    chunks += 1
                    if cancel is not None and chunks >= cancel:
                        return None  # leaving the stream closes the connection: the job is cancelled
        return [texts.get(k, "") for k in range(body["n"])]

    with serve(loaded, max_batch=8, num_blocks=20) as srv:
        async def run_all():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=80)) as c:
                return await asyncio.gather(*(one(c, srv.url, b, cancel) for b, _, _, cancel in jobs))

        got = asyncio.run(run_all())
        wait_idle(srv)
        assert srv.sched.engine.preemptions > 0  # the small pool did preempt
        assert srv.sched.pool.used == 0 and not srv.sched.running and not srv.sched.waiting
    done = 0
    for (body, params, seed, _), texts in zip(jobs, got):
        if texts is None:
            continue
        done += 1
        model, tok = loaded
        want = [c.text for c in complete(model, tok, body["prompt"], body["max_tokens"], params=params, seed=seed,
                                         num_samples=body["n"])]
        assert texts == want, (body, texts, want)
    assert done >= 40


def test_tokenize_and_detokenize(server, loaded):
    _, tok = loaded
    text = "def f(x):\n    return 日本語 😀"
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert r["tokens"] == tok.encode(text, bos=tok.add_bos) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128
    back = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": tok.encode(text)}).json()
    assert back["prompt"] == text
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert tok.decode(chat["tokens"]) == "User: hi\nAssistant:"  # what /v1/chat/completions feeds this model
    for path, body in (("/tokenize", {"prompt": "x", "messages": msgs}), ("/detokenize", {"tokens": [10 ** 6]}),
                       ("/tokenize", {"model": "gpt-9", "prompt": "x"}), ("/detokenize", {"tokens": "x"})):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["message"], (path, body)


def test_the_context_length_error_names_what_a_client_can_change(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 20, "max_tokens": 127})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert err["message"].endswith("shorten the prompt or lower max_tokens") and "--" not in err["message"]


def test_a_steps_events_reach_the_event_loop_in_one_hand_over(loaded):
    """The engine thread hands each step's events over once (one callback on the event loop per step, carrying
    every row's token), not once per token; the streams are still complete, in order, and equal sample.py."""
    with serve(loaded) as srv:
        sched, calls = srv.sched, []
        deliver = sched._deliver

        def counting(items):
            calls.append(len(items))
            deliver(items)

        sched._deliver = counting
        steps0 = sched.engine.steps
        body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "stream": True}
        prompts = ["def", "class", "x = 1", "# a"]

        async def run_all():
            async with httpx.AsyncClient(timeout=60) as c:
                async def one(p):
                    text = ""
                    async with c.stream("POST", srv.url + "/v1/completions", json=body | {"prompt": p}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                text += json.loads(line[6:])["choices"][0]["text"]
                    return text
                return await asyncio.gather(*(one(p) for p in prompts))

        texts = asyncio.run(run_all())
        wait_idle(srv)
        steps = sched.engine.steps - steps0
    for p, t in zip(prompts, texts):
        assert t == unbatched(loaded, p, 12, SamplingParams(0.0))
    assert sum(calls) >= len(prompts) * 2  # every row's events went through the hand-over
    assert len(calls) <= steps, (len(calls), steps)  # at most one hand-over per step (per-token would be ~4x)
    assert max(calls) >= 2  # a step's hand-over carried several rows' events
