"""Structured output (promise 27): response_format json_schema / json_object / regex / grammar through llguidance
masks. Every sampled answer (temperature 1, a random model that would write anything) parses and validates;
an unusable schema is a 400 with the compiler's reason, before compute."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from llm.config import ModelConfig  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server():
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    app, sched = build(Transformer(cfg).eval(), tok, "m", max_batch=32, block_size=16, max_step_tokens=64)
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        yield srv


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "m"} | body, timeout=120)


def test_200_sampled_json_schema_answers_all_parse_and_validate(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    body = {"prompt": "def f(x):", "max_tokens": 160, "temperature": 1.0, "n": 16, "response_format": fmt}

    async def go():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*(c.post(server.url + "/v1/completions", json={"model": "m", "seed": 100 * i}
                                                 | body) for i in range(13)))

    answers = [ch for r in asyncio.run(go()) for ch in r.json()["choices"]]
    assert len(answers) == 208
    for a in answers:
        assert a["finish_reason"] == "stop", a
        jsonschema.validate(json.loads(a["text"]), SCHEMA)
    assert len({a["text"] for a in answers}) > 100  # sampled, not one forced answer
    assert server.sched.pool.used == 0 or server.sched.idle()


def test_json_object_on_chat_streamed_and_regex_and_grammar_extensions(server):
    msgs = [{"role": "user", "content": "an object please"}]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": msgs, "max_tokens": 200, "temperature": 0.7, "seed": 1, "stream": True,
            "response_format": {"type": "json_object"}}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    if chunks[-1]["choices"][0]["finish_reason"] == "stop":  # an object may outgrow max_tokens; if done, it parses
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    r = post(server.url, "/v1/completions", {"prompt": "x", "max_tokens": 30, "temperature": 1.0, "n": 8, "seed": 2,
                                             "response_format": {"type": "regex", "regex": r"[0-9]{3}-[a-z]{2,4}"}})
    for ch in r.json()["choices"]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", ch["text"]) and ch["finish_reason"] == "stop", ch
    r = post(server.url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 10, "temperature": 1.0, "n": 8,
                                                  "response_format": {"type": "grammar",
                                                                      "grammar": 'root ::= "yes" | "no"'}})
    assert {ch["message"]["content"] for ch in r.json()["choices"]} <= {"yes", "no"}


@pytest.mark.parametrize("fmt,says", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "frobnicate"),
    ({"type": "regex", "regex": "([a-z"}, "regex"),
    ({"type": "grammar", "grammar": "root ::= missing_rule"}, "grammar"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "yaml"}, "type"),
], ids=["bad-schema", "bad-regex", "bad-grammar", "missing-schema", "unknown-type"])
def test_an_unusable_format_is_a_400_with_the_reason(server, fmt, says):
    r = post(server.url, "/v1/completions", {"prompt": "x", "max_tokens": 4, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["param"] in ("response_format", "response_format.type"), err
