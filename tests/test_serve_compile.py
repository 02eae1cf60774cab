"""`llm serve --compile` (issue 30, item 5): decode-only steps through a torch.compile'd step per batch bucket.

The compiled server's greedy and seeded answers equal `sample.py`'s text (what the eager server gives) for
concurrent requests of different lengths, steps padded to the buckets; after the warm-up no request compiles
anything (dynamo's count of compiled graphs is unchanged: the check fails when a bucket is left out of the
warm-up); padding rows write only into the pool's
scratch block, and the pool returns to empty. Unsupported combinations are one `error:` line before loading.
"""

from __future__ import annotations

import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import post_all, serve_checkpoint  # noqa: E402

from kernels import reference as ref  # noqa: E402
from llm import ops  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.generate import SamplingParams, complete  # noqa: E402
from llm.loading import load_model  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.paged_cache import PagedKVCache  # noqa: E402
from llm.serve.captured import CapturedDecode, batch_buckets  # noqa: E402
from llm.serve.launch import ThreadedServer, build, main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = serve_checkpoint(tmp_path_factory.mktemp("compile"), 1, block_size=64, n_layer=1, n_head=4, n_kv_head=2,
                            n_embd=64)
    model, tok, _ = load_model(path, "cpu", torch.float32, kernels="torch")
    return model, tok


def test_batch_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(12) == [1, 2, 4, 8, 12]


@torch.inference_mode()
def test_static_view_padding_rows_write_only_the_scratch_block_and_logits_equal_the_ragged_step(loaded):
    """The view the compiled step runs (called eagerly here): one real row among three padding rows."""
    model, _ = loaded
    pool = model.new_pool(6, 8, scratch=True)
    table = pool.alloc(2)  # a sequence of 11 tokens whose 12th is fed now
    ids = torch.randint(0, 300, (12,))
    model(ids[None, :11], cache=PagedKVCache(pool, [table], [0]))
    before = [t.clone() for t in (*pool.k, *pool.v)]
    want = model(ids[11:].view(1, 1), cache=PagedKVCache.ragged(pool, [table], [11], [1]))[0][:, 0]
    for t, b in zip((*pool.k, *pool.v), before):  # the eager step wrote slot 11 of the sequence: undo it
        t.copy_(b)
    view = PagedKVCache.static_rows(pool, 4, pool.blocks_for(model.cfg.block_size))
    view.load([table], [11])
    got = model(torch.tensor([int(ids[11]), 5, 6, 7])[:, None], cache=view)[0][:, 0]
    torch.testing.assert_close(got[:1], want, rtol=1e-5, atol=1e-5)
    for t, b in zip((*pool.k, *pool.v), before):
        changed = (t != b).flatten(2).any(-1).nonzero().tolist()  # (block, slot) pairs written
        assert [table[1], 3] in changed and all(blk in (table[1], pool.scratch) for blk, _ in changed)
        assert {blk for blk, _ in changed} == {table[1], pool.scratch}
    assert pool.used == 2 and pool.free == 4  # the scratch block is nobody's


@pytest.mark.parametrize("window", [None, 5])
def test_attention_to_the_longest_row_equals_the_full_width_reference(window):
    g = torch.Generator().manual_seed(0)
    k_pool, v_pool = torch.randn(10, 4, 2, 8, generator=g), torch.randn(10, 4, 2, 8, generator=g)
    q = torch.randn(3, 1, 4, 8, generator=g)
    table = torch.tensor([[3, 1, 7, 9, 9, 9], [0, 2, 9, 9, 9, 9], [9, 9, 9, 9, 9, 9]], dtype=torch.int32)
    lengths = torch.tensor([11, 6, 1])
    want = ref.paged_decode_attention_ref(q, k_pool, v_pool, table, lengths, window=window)
    got = ops.paged_attention_to_length(q, k_pool, v_pool, table, lengths, window)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_server_equals_sample_py_without_recompiles_and_leaks_no_block(loaded, monkeypatch):
    from torch._dynamo.utils import counters

    model, tok = loaded
    # bucket 2 (2 rows x 64 keys x 2 KV heads x 16) attends inside the graph, bucket 4 through the opaque op
    monkeypatch.setattr(ops, "STATIC_INLINE_VALUES", 2 * 64 * 2 * 16)
    app, sched = build(model, tok, "tiny", max_batch=4, block_size=8, max_step_tokens=32, compile=True,
                       compile_buckets=[2, 4])
    cap = sched.engine.captured
    assert sorted(cap.warmup_s) == [2, 4] and "warm-up" in cap.describe()
    graphs = counters["stats"]["unique_graphs"]
    prompts = ["def f(x):", "# 日本語", "class Point:\n" * 3, "x", "return x + 1 " * 2]
    cases = [(p, 6 + 5 * i, 0.0 if i % 2 == 0 else 0.9, i) for i, p in enumerate(prompts)]

    bodies = [{"model": "tiny", "prompt": p, "max_tokens": n, "temperature": temp, "top_k": 20, "seed": seed}
              for p, n, temp, seed in cases]
    with ThreadedServer(app, sched, drain_timeout=2.0) as srv:
        got = [r["choices"][0]["text"] for r in post_all(srv.url, bodies)]
        for _ in range(200):
            if sched.idle() and sched.pool.used == 0:
                break
            time.sleep(0.02)
    want = [complete(model, tok, p, n, params=SamplingParams(temp, top_k=20), seed=seed)[0].text
            for p, n, temp, seed in cases]
    assert got == want
    assert cap.steps > 10  # the decode steps went through the compiled buckets (1 row padded to 2, 3 to 4)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up
    assert sched.pool.used == 0 and sched.idle()


@pytest.mark.parametrize("argv, message", [
    (["--compile-buckets", "2"], "--compile-buckets needs --compile"),
    (["--compile", "--max-batch", "4", "--compile-buckets", "8"], "give batch sizes from 1 to --max-batch (4)"),
])
def test_unsupported_combinations_are_one_error_line_before_loading(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["--checkpoint", str(tmp_path / "not-there"), *argv]) == 2  # no checkpoint: it never loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_mixture_of_experts_model_is_refused(loaded):
    cfg = ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2)
    model = Transformer(cfg).eval()
    with pytest.raises(ValueError, match="mixture-of-experts"):
        CapturedDecode(model, model.new_pool(4, 8, scratch=True), 2)
