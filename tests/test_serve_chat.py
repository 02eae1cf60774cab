"""Chat on the server: the model's own template (the one fine-tuning and `sample.py --chat` use), its end of turn,
--chat-template FILE, chat logprobs, n > 1, stream_options.include_usage.

A chat checkpoint of ours (ChatML tokens added as fine-tuning adds them) with random weights; the served
text must equal what `sample.py --chat` prints for the same conversation (greedy).
"""

from __future__ import annotations

import json

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llm.chat import IM_END, chat_tokenizer, render, special_tokens_map  # noqa: E402
from llm.checkpoint import save  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.generate import SamplingParams, complete  # noqa: E402
from llm.generate.cli import chat_prompt as sample_chat_prompt  # noqa: E402
from llm.loading import load_model  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build, main  # noqa: E402
from llm.serve.templates import ChatFormat  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is f(1)? 😀"}]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    tok, added = chat_tokenizer(Tokenizer.train([TEXT], 300))
    assert added == ["<|im_start|>", "<|im_end|>"]
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return save(tmp_path_factory.mktemp("chat"), "ckpt", Transformer(cfg), tok)


@pytest.fixture(scope="module")
def loaded(chat_ckpt):
    model, tok, _ = load_model(chat_ckpt, "cpu", torch.float32, kernels="torch")
    return model, tok


def serve(model, tok, **kw) -> ThreadedServer:
    app, sched = build(model, tok, "chat", **({"max_batch": 8, "block_size": 8, "max_step_tokens": 32} | kw))
    return ThreadedServer(app, sched, drain_timeout=2.0)


@pytest.fixture(scope="module")
def server(loaded):
    with serve(*loaded) as srv:
        yield srv


GREEDY = SamplingParams(0.0)


def sample_chat(model, tok, msgs, n: int, params=GREEDY, seed=None, prompt_ids=None):
    """What `sample.py --chat --system ... --prompt ...` prints (its chat_prompt, then complete())."""
    ids = prompt_ids or sample_chat_prompt(tok, msgs[-1]["content"], msgs[0]["content"])
    return complete(model, tok, [ids], n, params=params, seed=seed)[0]


def test_chat_uses_the_checkpoints_template_and_gives_sample_py_chat_text(server, loaded):
    model, tok = loaded
    assert "chat template" in ChatFormat(tok).describe()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = sample_chat(model, tok, MSGS, 20)
    r = client.chat.completions.create(model="chat", messages=MSGS, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.tokens)
    assert r.usage.prompt_tokens == len(want.prompt)  # the ChatML prompt, special tokens as single ids
    stream = client.chat.completions.create(model="chat", messages=MSGS, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    seeded = SamplingParams(0.9, None, 0.95)
    want = sample_chat(model, tok, MSGS, 16, seeded, seed=7)
    r = client.chat.completions.create(model="chat", messages=MSGS, max_tokens=16, temperature=0.9, top_p=0.95,
                                       seed=7)
    assert r.choices[0].message.content == want.text


def test_the_turn_ends_at_im_end(loaded):
    """A model whose head puts <|im_end|> first: the reply is empty, finish_reason stop, nothing of it shown."""
    model, tok = loaded
    model = Transformer(model.cfg)
    model.load_state_dict(loaded[0].state_dict())
    model.eval()
    first = sample_chat(model, tok, MSGS, 1).tokens[0]
    end = tok.special_tokens()[IM_END]
    with torch.no_grad():
        model.lm_head.weight[end] = 10 * model.lm_head.weight[first]
    assert sample_chat(model, tok, MSGS, 5).finish_reason == "eos"
    with serve(model, tok) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "chat", "messages": MSGS, "max_tokens": 5,
                                                               "temperature": 0}, timeout=30).json()
    assert r["choices"][0]["message"]["content"] == "" and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 0


def test_chat_template_file_overrides_and_a_bad_one_is_refused_before_loading(loaded, tmp_path, capsys):
    model, tok = loaded
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    chat = ChatFormat(tok, template, "test")
    ids = tok.encode(render(template, MSGS, add_generation_prompt=True, **special_tokens_map(tok)),
                     allow_special=True)
    want = sample_chat(model, tok, MSGS, 12, prompt_ids=ids)
    with serve(model, tok, chat=chat) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "chat", "messages": MSGS, "max_tokens": 12,
                                                               "temperature": 0}, timeout=30).json()
    assert r["choices"][0]["message"]["content"] == want.text and r["usage"]["prompt_tokens"] == len(ids)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for path, says in ((bad, "not valid jinja2"), (tmp_path / "missing.jinja", "no such file")):
        assert main(["--checkpoint", str(tmp_path / "nowhere"), "--chat-template", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --chat-template") and says in err and len(err.strip().splitlines()) == 1


def test_plain_template_for_a_model_without_one():
    tok = Tokenizer.train([TEXT], 260)
    chat = ChatFormat(tok)
    assert chat.plain and "no chat template" in chat.describe() and chat.stop_strings == ["\nUser:"]
    assert tok.decode(chat.prompt(MSGS)) == "System: be brief\nUser: what is f(1)? 😀\nAssistant:"


def test_chat_logprobs_n_and_include_usage(server, loaded):
    model, tok = loaded
    body = {"model": "chat", "messages": MSGS, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] >= 1
    ids = sample_chat(model, tok, MSGS, 8).prompt
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    lp = torch.log_softmax(logits[0, -1, : tok.n_vocab], -1)
    first = content[0]
    assert len(first["top_logprobs"]) == 3 and first["top_logprobs"][0]["token"] == first["token"]
    assert abs(first["logprob"] - float(lp.max())) < 1e-4  # greedy: the chosen token is the most likely one
    assert bytes(first["bytes"]) == tok.decode_bytes([int(lp.argmax())])
    assert "".join(c["token"] for c in content).startswith(r["choices"][0]["message"]["content"][:1])

    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {
            "stream": True, "n": 3, "temperature": 1.0, "seed": 5, "stream_options": {"include_usage": True}},
            timeout=30) as s:
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(ids)
    per = {i: [c for ch in chunks[:-1] for c in ch["choices"] if c["index"] == i] for i in range(3)}
    toks = [sum(len((c["logprobs"] or {"content": []})["content"]) for c in per[i]) for i in range(3)]
    assert usage["usage"]["completion_tokens"] == sum(toks) and all(t >= 1 for t in toks)
    assert all(per[i][-1]["finish_reason"] in ("stop", "length") for i in range(3))
    bad = httpx.post(server.url + "/v1/chat/completions", json=body | {"logprobs": False}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"
