"""Tool calling: tools rendered through the chat template, a required / named tool_choice constrained to a valid
call (parsed into tool_calls, streamed as OpenAI streams them, read back by the openai client), calls parsed
from a free reply in auto mode, and the refusals (unknown tool name, a template that never reads tools)."""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from llm.chat import chat_tokenizer  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build  # noqa: E402
from llm.serve.templates import ChatFormat  # noqa: E402
from llm.serve.tools import parse_calls  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30
# A Hermes-style template: tools in the system turn, calls as <tool_call>{...}</tool_call>, tool results as turns.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "weather in Paris?"}]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server():
    tok, _ = chat_tokenizer(Tokenizer.train([TEXT], 300))
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    app, sched = build(Transformer(cfg).eval(), tok, "m", max_batch=8, block_size=16, max_step_tokens=256,
                       chat=ChatFormat(tok, TEMPLATE, "test"))
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        yield srv


def test_named_and_required_tool_choice_give_valid_calls(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="m", messages=MSGS, tools=[WEATHER, TIME], max_tokens=80,
                                       temperature=1.0, seed=3, n=4,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    r = client.chat.completions.create(model="m", messages=MSGS, tools=[WEATHER, TIME], max_tokens=80,
                                       temperature=1.0, seed=4, n=8, tool_choice="required")
    for ch in r.choices:
        (call,) = ch.message.tool_calls
        spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    # a conversation that goes on after a call: the assistant's call and the tool's answer render as turns
    follow = MSGS + [{"role": "assistant", "content": None, "tool_calls": [r.choices[0].message.tool_calls[0]
                                                                           .model_dump()]},
                     {"role": "tool", "tool_call_id": r.choices[0].message.tool_calls[0].id, "content": "sunny"}]
    r = client.chat.completions.create(model="m", messages=follow, tools=[WEATHER], max_tokens=5, temperature=0,
                                       tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


def test_a_forced_call_streams_as_openai_streams_calls(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="m", messages=MSGS, tools=[WEATHER], max_tokens=80, stream=True,
                                            temperature=1.0, seed=9, tool_choice="required")
    name, args, finish, content = "", "", None, ""
    for chunk in stream:
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls" and content == ""
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_auto_mode_parses_calls_from_a_free_reply():
    calls = parse_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>')
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}
    llama = parse_calls('{"name": "get_time", "parameters": {"zone": "UTC"}}')  # Llama 3.1's layout
    assert llama[0]["function"]["name"] == "get_time" and json.loads(llama[0]["function"]["arguments"]) == {
        "zone": "UTC"}
    assert parse_calls("The weather is fine.") is None and parse_calls('{"city": "x"}') is None


def test_auto_mode_on_the_server_answers_content_or_calls(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": MSGS, "tools": [WEATHER], "max_tokens": 12, "temperature": 0}).json()
    msg = r["choices"][0]["message"]
    assert (msg["content"] is not None) != bool(msg.get("tool_calls"))


@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
], ids=["unknown-name", "choice-without-tools", "with-response-format"])
def test_tool_requests_that_cannot_be_served_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": MSGS} | body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tools_on_a_template_that_never_reads_them_are_400():
    tok = Tokenizer.train([TEXT], 260)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    app, sched = build(Transformer(cfg).eval(), tok, "plain", max_batch=2, block_size=8, max_step_tokens=16)
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "plain", "messages": MSGS,
                                                               "tools": [WEATHER]}, timeout=30)
        ok = httpx.post(srv.url + "/v1/chat/completions", json={"model": "plain", "messages": MSGS, "max_tokens": 2,
                                                                "tools": [WEATHER], "tool_choice": "none"}, timeout=30)
    assert r.status_code == 400 and "does not show tools" in r.json()["error"]["message"]
    assert ok.status_code == 200
