"""Multi-LoRA serving (`llm serve --lora NAME=DIR`): adapters over one base whose weights they share; a request's
`model` picks the base or an adapter, rows of different adapters run in the same steps (one forward each), and
every greedy / seeded answer equals what `sample.py --lora DIR` (or the plain base) gives for it."""

from __future__ import annotations

import asyncio

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llm import checkpoint as ck  # noqa: E402
from llm import lora  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.generate import SamplingParams, complete  # noqa: E402
from llm.loading import adapter_on_shared_base, load_model  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.serve.launch import ThreadedServer, build, main  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A base checkpoint and two adapters trained on it (random B, so each changes the output)."""
    root = tmp_path_factory.mktemp("lora")
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(6)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    base = ck.save(root / "base", "ckpt", Transformer(cfg), tok)
    adapters = {}
    for k, (name, targets) in enumerate((("math", ("q", "v")), ("code", ("q", "k", "v", "o", "gate", "up", "down")))):
        model, _, _ = load_model(base, "cpu", torch.float32)
        lcfg = lora.LoRAConfig(4, 8.0, 0.0, targets)
        lora.apply_lora(model, lcfg)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in lora.adapter_tensors(model).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        adapters[name] = ck.save(root / name, "ckpt-1", model, tok, None, None, None, lora.adapter_tensors(model),
                                 weights_file=lora.ADAPTER_FILE, json_files={
                                     lora.ADAPTER_CONFIG: lora.adapter_config(lcfg, model, str(base), tok.n_vocab, [])})
    return base, adapters


def test_adapters_share_the_base_and_each_request_gets_its_own_models_text(dirs):
    base_dir, adirs = dirs
    base, tok, _ = load_model(base_dir, "cpu", torch.float32, kernels="torch")
    adapters = {n: adapter_on_shared_base(base, d) for n, d in adirs.items()}
    assert adapters["math"].blocks[0].attn.wqkv.weight is base.blocks[0].attn.wqkv.weight  # shared, not copied
    assert adapters["code"].lm_head.weight is base.lm_head.weight
    assert not any(isinstance(m, lora.LoRALinear) for m in base.modules())  # the base stays plain
    jobs = []
    for i in range(12):
        model = ["base", "math", "code"][i % 3]
        greedy = i % 2 == 0
        long = "class Point:\n    x: int = 0\n" * 3  # full KV blocks every model has: each must use its own
        jobs.append({"model": model, "prompt": ["def f(x):", "class Point:", "# 日本語"][i % 3] if greedy else long,
                     "max_tokens": 6 + i, "temperature": 0 if greedy else 0.9, "seed": None if greedy else i})
    want = []
    for j in jobs:
        ref, _, _ = load_model(base_dir, "cpu", torch.float32, kernels="torch",
                               lora=None if j["model"] == "base" else adirs[j["model"]])
        want.append(complete(ref, tok, j["prompt"], j["max_tokens"], params=SamplingParams(j["temperature"]),
                             seed=j["seed"])[0].text)
    app, sched = build(base, tok, "base", max_batch=8, block_size=8, max_step_tokens=32, adapters=adapters)
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["base", "math", "code"]

        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json=j) for j in jobs))

        got = [r.json()["choices"][0]["text"] for r in asyncio.run(go())]
        assert httpx.post(srv.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert got == want
    assert len(set(want[0::3])) + len(set(want[1::3])) > 2  # the adapters do change the text


def test_bad_lora_flags_are_one_error_line(dirs, capsys, tmp_path):
    base_dir, adirs = dirs
    for flag, says in (("math", "give NAME=DIR"), (f"x={tmp_path / 'missing'}", "no such directory")):
        assert main(["--checkpoint", str(base_dir), "--lora", flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --lora") and says in err and len(err.strip().splitlines()) == 1
