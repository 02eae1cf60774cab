"""lm-evaluation-harness backend: parity with lm-eval's `hf` backend on the same exported weights,
shared-context reuse equal to scoring each request alone, stop strings, clear errors. Offline: the
tasks are the YAML + jsonl files in tests/data/lm_eval, the model a small random one made here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llm import checkpoint  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.eval import harness  # noqa: E402
from llm.eval.__main__ import main as eval_main  # noqa: E402
from llm.eval.perplexity import EvalError  # noqa: E402
from llm.interop.hf_export import export  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"
MC, GEN = str(TASKS / "pystdlib_mc.yaml"), str(TASKS / "pystdlib_gen.yaml")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small model with sharp (random, scaled-up) weights, so its choices and continuations vary."""
    d = tmp_path_factory.mktemp("harness")
    texts = [p.read_text() for p in sorted(TASKS.glob("*.jsonl"))] + [Path(torch.__file__).read_text()]
    tok = Tokenizer.train(texts, 600)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                    n_embd=64, pad_vocab_multiple=1, kernels="torch")).eval()  # no padded ids
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return checkpoint.save(d / "run", "ckpt-1", model, tok)


@pytest.fixture(scope="module")
def lm(ckpt) -> harness.LLMEvalLM:
    return harness.LLMEvalLM(str(ckpt), device="cpu", dtype="float32", batch_size=8)


def test_parity_with_the_hf_backend_on_the_exported_weights(ckpt, lm, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import lm_eval

    hf_dir = export(ckpt, tmp_path / "hf")
    ours = harness.run_tasks(lm, [MC, GEN])
    names, manager, _ = harness.resolve_tasks([MC, GEN])
    here = Path.cwd()
    os.chdir(TASKS)
    try:
        theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                                         batch_size=8, tasks=names, task_manager=manager, log_samples=True)
    finally:
        os.chdir(here)
    a, b = ours["samples"]["pystdlib_mc"], theirs["samples"]["pystdlib_mc"]
    assert len(a) == len(b) == 16
    for x, y in zip(a, b):
        ra, rb = [r[0] for r in x["resps"]], [r[0] for r in y["resps"]]  # (loglikelihood, greedy) per choice
        assert len(ra) == len(rb) == 4
        for (ll1, g1), (ll2, g2) in zip(ra, rb):
            assert abs(ll1 - ll2) <= 1e-4 and g1 == g2
    assert ours["results"]["pystdlib_mc"]["acc,none"] == theirs["results"]["pystdlib_mc"]["acc,none"]
    gen_a = [s["resps"] for s in ours["samples"]["pystdlib_gen"]]
    gen_b = [s["resps"] for s in theirs["samples"]["pystdlib_gen"]]
    assert gen_a == gen_b and any(r[0][0] for r in gen_a)  # identical, and not all empty


def plain_loglikelihood(lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One forward over (ctx + cont)[:-1], no cache, no sharing: the definition."""
    inp = torch.tensor([(ctx + cont)[:-1]])
    logits, _ = lm.model(inp)
    logp = logits[0, -len(cont):].log_softmax(-1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_context_reuse_equals_scoring_each_request_alone(lm, batch_size):
    enc = lm.tok_encode
    contexts = ["Question: which module?\nAnswer:", "import os\nimport", "x"]
    conts = [" json", " pickle and more", " re", "\n", " a b c d e f"]
    reqs = [((c, x), enc(c), enc(x)) for c in contexts for x in conts]
    lm.batch_size = batch_size
    try:
        got = lm._loglikelihood_tokens(reqs)
    finally:
        lm.batch_size = 8
    for (_, ctx, cont), (ll, greedy) in zip(reqs, got):
        want_ll, want_greedy = plain_loglikelihood(lm, ctx, cont)
        assert abs(ll - want_ll) <= 1e-4 and greedy == want_greedy


def test_rolling_loglikelihood_sums_disjoint_windows_over_a_long_text(lm):
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance

    text = "def f(x):\n    return x + 1\n" * 20  # longer than the 64-token context: several windows
    ids = lm.tok_encode(text)
    assert len(ids) > 2 * lm.max_length
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    wins = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
        token_list=ids, prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1))
    want = sum(plain_loglikelihood(lm, ctx, pred)[0] for ctx, pred in wins)
    assert abs(total - want) <= 1e-3


def test_generate_until_stops_at_each_stop_string(lm):
    from lm_eval.api.instance import Instance

    free = lm.generate_until([Instance("generate_until", {}, ("import", {"max_gen_toks": 20, "until": ["\u00a7"]}), 0)])
    text = free[0]
    assert len(text) > 2
    for stop in {text[1:3], text[-2:]}:  # strings the free continuation contains
        req = Instance("generate_until", {}, ("import", {"max_gen_toks": 20, "until": [stop]}), 0)
        [cut] = lm.generate_until([req])
        assert cut == text[: text.index(stop)]


def test_unknown_task_and_missing_checkpoint_give_one_line(ckpt, capsys, tmp_path):
    assert eval_main(["--checkpoint", str(ckpt), "--tasks", "no_such_task_xyz", "--include-path", str(TASKS)]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown lm-eval task(s): no_such_task_xyz (give a name lm-eval "
                                               "knows, or the path of a task YAML)")
    assert eval_main(["--checkpoint", str(tmp_path / "none"), "--tasks", MC]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'none'}"
    with pytest.raises(EvalError, match="task file not found"):
        harness.resolve_tasks([str(tmp_path / "missing.yaml")])


def test_cli_prints_the_task_table(ckpt, capsys):
    assert eval_main(["--checkpoint", str(ckpt), "--tasks", MC, "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "pystdlib_mc" in out and "acc" in out


def test_eval_tasks_during_training_are_logged_and_leave_the_run_unchanged(corpus_tmp):
    from conftest import metrics_records, step_losses, train_argv

    from llm.train.cli import main as train_main

    kw = dict(max_steps=4, eval_interval=2, dropout=0.1)  # dropout: the RNG streams matter
    assert train_main(train_argv(corpus_tmp, "plain", **kw)) == 0
    assert train_main(train_argv(corpus_tmp, "tasks", eval_tasks=MC, eval_limit=4, **kw)) == 0
    scored = [r for r in metrics_records(corpus_tmp / "tasks") if "eval/pystdlib_mc/acc" in r]
    assert [r["step"] for r in scored] == [2, 4] and all(0 <= r["eval/pystdlib_mc/acc"] <= 1 for r in scored)
    assert step_losses(corpus_tmp / "tasks") == step_losses(corpus_tmp / "plain")


def test_eval_tasks_are_checked_before_training(corpus_tmp, capsys):
    from conftest import train_argv

    from llm.train.cli import main as train_main

    assert train_main(train_argv(corpus_tmp, "bad", eval_tasks="no_such_task_xyz,"+MC)) == 2
    err = capsys.readouterr().err
    assert "--eval-tasks: unknown lm-eval task(s): no_such_task_xyz" in err and "step" not in err
