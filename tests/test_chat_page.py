"""The chat page at GET / in a real browser (promise 28): Playwright drives Debian's chromium (installed with
apt-get by the session fixture when missing, as root). A message streams an answer in; the stop button
cancels the request on the server; markup and script in model text are shown as text, never run; the page
makes no request outside the server. Each test takes a screenshot (tmp_path/*.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from llm.config import ModelConfig  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30
EVIL = ("Here is **bold** and `code` <img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>\n\n"
        "```python\nprint('<b>not bold</b>')\n```\n\n# A heading")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (idempotent; needs root, as in CI's container)."""
    path = shutil.which("chromium")
    if path is None:
        if os.geteuid() != 0:
            pytest.skip("chromium is missing and apt-get needs root: apt-get install -y chromium")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
        path = shutil.which("chromium")
    assert path, "apt-get install chromium left no chromium on PATH"
    return path


@pytest.fixture(scope="module")
def server():
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    app, sched = build(Transformer(cfg).eval(), tok, "page-model", max_batch=4, block_size=16, max_step_tokens=64)
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1100, "height": 700})
    outside = []
    pg.on("request", lambda r: None if r.url.startswith(server.url) else outside.append(r.url))
    pg.goto(server.url + "/")
    expect(pg.locator("#model")).to_have_text("model: page-model")  # (no wait_for_function: the CSP forbids eval)
    yield pg
    pg.close()
    assert not outside, f"the page requested outside the server: {outside}"


def ask(page, text: str, max_tokens: int, temperature: str = "0") -> None:
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#system", "be brief")
    page.fill("#input", text)
    page.click("#send")


def test_a_message_streams_an_answer_with_tokens_per_second(page, server, tmp_path):
    ask(page, "hello 😀", 200)
    body = page.locator(".msg.assistant .body").last
    seen = set()
    deadline = time.monotonic() + 60
    while "done" not in page.inner_text("#status"):
        seen.add(body.inner_text())
        assert time.monotonic() < deadline, page.inner_text("#status")
        time.sleep(0.01)
    seen.discard("")
    assert len(seen) >= 2, seen  # the text grew while the stream was running (streamed, not at the end)
    status = page.inner_text("#status")
    assert "tokens/s" in status and " 0 tokens" not in status, status
    want = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "page-model", "max_tokens": 200, "temperature": 0, "top_p": 0.95,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello 😀"}]}).json()
    n = want["usage"]["completion_tokens"]
    assert f" {n} tokens" in status, (status, n)  # the page's count is the server's (greedy: the same answer)
    page.screenshot(path=str(tmp_path / "chat.png"))


def test_stop_button_cancels_the_request_on_the_server(page, server, tmp_path):
    cancelled = server.sched.metrics.requests.labels(outcome="cancelled")._value.get()
    ask(page, "tell me everything", 400)  # greedy: the same long answer every run (sampled ones may end early)
    expect(page.locator("#status")).to_have_text(re.compile(r"generating… [1-9]"), timeout=30_000)  # tokens arrive
    page.click("#stop")
    expect(page.locator("#status")).to_have_text(re.compile("^stopped after"))
    deadline = time.monotonic() + 20
    while server.sched.metrics.requests.labels(outcome="cancelled")._value.get() < cancelled + 1:
        assert time.monotonic() < deadline, "the server did not cancel the request"
        time.sleep(0.05)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.screenshot(path=str(tmp_path / "stopped.png"))


def test_markup_and_script_in_model_text_are_shown_as_text(page, tmp_path):
    """The answer (served by a stub route) holds an <img onerror> and a <script>: neither becomes an element,
    both show as text; markdown still renders (bold, inline code, a code block, a heading)."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": EVIL[i:i + 7]}, "finish_reason": None}]}
              for i in range(0, len(EVIL), 7)]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"completion_tokens": len(chunks)}}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=sse,
                                                                      headers={"content-type": "text/event-stream"}))
    ask(page, "show me some html", 64)
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    msg = page.locator(".msg.assistant .body").last
    assert page.evaluate("window.__pwned") is None
    assert msg.locator("img, script, b").count() == 0
    assert msg.locator("strong").inner_text() == "bold" and msg.locator("pre code").inner_text().startswith("print(")
    assert "<img src=x onerror=" in msg.inner_text() and "<script>" in msg.inner_text()
    assert msg.locator("h3").inner_text() == "A heading"
    page.screenshot(path=str(tmp_path / "escaped.png"))
    if os.environ.get("LLM_DOCS_SCREENSHOT"):  # docs/images/chat-page.png is taken this way
        page.screenshot(path=os.environ["LLM_DOCS_SCREENSHOT"])
