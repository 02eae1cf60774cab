"""Multi-LoRA serving (`llm serve --lora NAME=DIR`): adapters over one base whose weights they share; a request's
`model` picks the base or an adapter, rows of the base and of different adapters run in the same forward (each row
with its own adapter: `llm.multi_lora`), eagerly and through the compiled decode step, and every greedy / seeded
answer equals what `sample.py --lora DIR` (or the plain base) gives for it."""

from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import post_all, serve_checkpoint  # noqa: E402

from llm import checkpoint as ck  # noqa: E402
from llm import lora  # noqa: E402
from llm.generate import SamplingParams, complete  # noqa: E402
from llm.loading import adapter_on_shared_base, load_model  # noqa: E402
from llm.multi_lora import MultiLoRALinear, stack_adapters  # noqa: E402
from llm.serve.launch import ThreadedServer, build, main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, rank, targets): different ranks and different projections, so the stacked factors are padded and some
# projections carry one adapter only
ADAPTERS = (("math", 4, ("q", "v")), ("code", 8, ("q", "k", "v", "o", "gate", "up", "down")))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A base checkpoint and two adapters trained on it (random B, so each changes the output)."""
    root = tmp_path_factory.mktemp("lora")
    base = serve_checkpoint(root / "base", 6, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    adapters = {}
    for k, (name, rank, targets) in enumerate(ADAPTERS):
        model, tok, _ = load_model(base, "cpu", torch.float32)
        lcfg = lora.LoRAConfig(rank, 2.0 * rank, 0.0, targets)
        lora.apply_lora(model, lcfg)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in lora.adapter_tensors(model).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        adapters[name] = ck.save(root / name, "ckpt-1", model, tok, None, None, None, lora.adapter_tensors(model),
                                 weights_file=lora.ADAPTER_FILE, json_files={
                                     lora.ADAPTER_CONFIG: lora.adapter_config(lcfg, model, str(base), tok.n_vocab, [])})
    return base, adapters


@pytest.fixture(scope="module")
def served(dirs):
    """The base (plain) and its adapters over its own weights."""
    base_dir, adirs = dirs
    base, tok, _ = load_model(base_dir, "cpu", torch.float32, kernels="torch")
    return base, tok, {n: adapter_on_shared_base(base, d) for n, d in adirs.items()}


def jobs_and_references(dirs, tok, n: int) -> tuple[list[dict], list[str]]:
    """n requests cycling base / math / code, greedy and seeded, and the text sample.py --lora gives each."""
    base_dir, adirs = dirs
    jobs = []
    for i in range(n):
        greedy = i % 2 == 0
        long = "class Point:\n    x: int = 0\n" * 3  # full KV blocks every model has: each must use its own
        jobs.append({"model": ["base", "math", "code"][i % 3],
                     "prompt": ["def f(x):", "class Point:", "# 日本語"][i % 3] if greedy else long,
                     "max_tokens": 6 + i, "temperature": 0 if greedy else 0.9, "seed": None if greedy else i})
    refs = {m: load_model(base_dir, "cpu", torch.float32, kernels="torch", lora=adirs.get(m))[0]
            for m in ("base", "math", "code")}
    want = [complete(refs[j["model"]], tok, j["prompt"], j["max_tokens"], params=SamplingParams(j["temperature"]),
                     seed=j["seed"])[0].text for j in jobs]
    return jobs, want


@torch.inference_mode()
def test_a_mixed_batch_gives_each_row_its_own_adapters_output(served):
    """The stacked layers against each adapter's own model, row by row: rows of the base, math and code in one
    forward (no cache) give what each model gives for its row alone."""
    base, _, adapters = served
    model, rows = stack_adapters(base, adapters)
    assert model.blocks[0].attn.wqkv.base is base.blocks[0].attn.wqkv  # the base's own module, not a copy
    assert isinstance(model.blocks[1].mlp.w2, MultiLoRALinear) and model.blocks[1].mlp.w2.r == 8
    assert model.blocks[0].attn.wqkv.r == 3 * 8  # code's q, k, v (rank 8 each); math's 2 x 4 padded to it
    x = torch.randint(0, 300, (5, 7))
    which = [0, 1, 2, 1, 0]  # base, math, code, math, base
    refs = [base, adapters["math"], adapters["code"]]
    with rows.use(torch.tensor(which)):
        got = model(x)[0]
    for i, k in enumerate(which):
        torch.testing.assert_close(got[i], refs[k](x[i:i + 1])[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=0)  # no indices: the base alone
    assert not any(isinstance(m, (lora.LoRALinear, MultiLoRALinear)) for m in base.modules())  # base stays plain


def test_adapters_share_the_base_and_each_request_gets_its_own_models_text(dirs, served):
    base, tok, adapters = served
    assert adapters["math"].blocks[0].attn.wqkv.weight is base.blocks[0].attn.wqkv.weight  # shared, not copied
    jobs, want = jobs_and_references(dirs, tok, 12)
    app, sched = build(base, tok, "base", max_batch=8, block_size=8, max_step_tokens=32, adapters=adapters)
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["base", "math", "code"]
        answers = post_all(srv.url, jobs)
        got = [r["choices"][0]["text"] for r in answers]
        assert [r["model"] for r in answers] == [j["model"] for j in jobs]  # each answer names its adapter
        assert httpx.post(srv.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert got == want
    assert len(set(want[0::3])) + len(set(want[1::3])) > 2  # the adapters do change the text
    engine = sched.engine
    # rows of different adapters shared forwards (0 when they are scheduled apart), one forward per step
    assert engine.mixed_forwards > 10 and engine.forwards == engine.steps


def test_compiled_decode_step_with_adapters_equals_sample_py_without_recompiles(dirs, served):
    from torch._dynamo.utils import counters

    base, tok, adapters = served
    jobs, want = jobs_and_references(dirs, tok, 6)
    app, sched = build(base, tok, "base", max_batch=4, block_size=8, max_step_tokens=32, adapters=adapters,
                       compile=True, compile_buckets=[2, 4])
    cap, graphs = sched.engine.captured, counters["stats"]["unique_graphs"]
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        got = [r["choices"][0]["text"] for r in post_all(srv.url, jobs)]
    assert got == want
    assert cap.steps > 10  # decode steps of mixed adapters through the compiled buckets
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up
    assert sched.engine.mixed_forwards > 5


def test_bad_lora_flags_are_one_error_line(dirs, capsys, tmp_path):
    base_dir, adirs = dirs
    for flag, says in (("math", "give NAME=DIR"), (f"x={tmp_path / 'missing'}", "no such directory")):
        assert main(["--checkpoint", str(base_dir), "--lora", flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --lora") and says in err and len(err.strip().splitlines()) == 1
