"""Pruning (llm/prune/): structured slices equal the original with the pruned channels masked, the CLI's output is
an ordinary smaller checkpoint (loads, trains with --init-from and a --teacher), unstructured masks, and one-line
refusals (RELIABILITY 32)."""

import copy
import math

import pytest
import torch
from conftest import step_losses, train_argv, write_code_corpus

from llm import checkpoint as ck
from llm.config import ModelConfig
from llm.loading import load_model
from llm.model import Transformer
from llm.prune import calibrate, structured, unstructured
from llm.prune.__main__ import main as prune_main
from llm.train.cli import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**({"vocab_size": 97, "block_size": 16, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                          "intermediate_size": 48, "kernels": "torch"} | kw))
    return Transformer(cfg).eval()


def test_structured_slices_equal_the_masked_original():
    """Dropping blocks, MLP channels and whole GQA groups gives exactly the original model with those blocks
    skipped, those w2 columns and those heads' wo columns zeroed (fp32)."""
    model = _model()
    rows = torch.randint(0, 97, (6, 16))
    stats = calibrate.collect(model, rows)
    assert stats.tokens == 96 and len(stats.layer) == 3 and stats.heads[0].shape == (4,)
    shape = structured.Shape(layers=2, mlp_hidden=20, kv_heads=1, n_embd=32)
    small = structured.prune(model, stats, shape)
    assert (small.cfg.n_layer, small.cfg.intermediate_size, small.cfg.n_head, small.cfg.n_kv_head,
            small.cfg.head_dim) == (2, 20, 2, 1, 8)
    masked = copy.deepcopy(model)
    keep = structured._top(torch.tensor(stats.layer), 2).tolist()
    with torch.no_grad():
        for i in keep:
            b = masked.blocks[i]
            mlp = structured._top(stats.mlp[i], 20)
            drop = torch.ones(48, dtype=torch.bool)
            drop[mlp] = False
            b.mlp.w2.weight[:, drop] = 0
            group = structured._top(stats.heads[i].view(2, 2).sum(1), 1)
            for h in range(4):
                if h // 2 not in group.tolist():
                    b.attn.wo.weight[:, h * 8:(h + 1) * 8] = 0
    masked.blocks = torch.nn.ModuleList(masked.blocks[i] for i in keep)
    x = torch.randint(0, 97, (2, 16))
    assert torch.allclose(small(x)[0], masked(x)[0], atol=1e-5, rtol=1e-5)
    assert small.num_params() < model.num_params()


def test_width_pruning_keeps_the_highest_channels_and_the_most_influential_layer():
    model = _model()
    with torch.no_grad():  # block 1 made a near no-op: the least influential, the one to drop
        model.blocks[1].attn.wo.weight.mul_(1e-4)
        model.blocks[1].mlp.w2.weight.mul_(1e-4)
    stats = calibrate.collect(model, torch.randint(0, 97, (4, 16)))
    assert min(range(3), key=lambda i: stats.layer[i]) == 1
    small = structured.prune(model, stats, structured.Shape(layers=2, mlp_hidden=48, kv_heads=2, n_embd=24))
    kept = structured._top(stats.channel, 24)
    assert torch.equal(small.tok_emb.weight, model.tok_emb.weight[:, kept])
    assert torch.equal(small.blocks[1].mlp.w2.weight, model.blocks[2].mlp.w2.weight[kept])
    assert small(torch.randint(0, 97, (1, 16)))[0].shape == (1, 16, 128)


@pytest.mark.parametrize("method, pattern", [("magnitude", None), ("wanda", None), ("wanda", (2, 4))])
def test_unstructured_masks(method, pattern):
    model = _model(intermediate_size=50)  # w2 has 50 inputs: a 2:4 tail group of 2
    stats = calibrate.collect(model, torch.randint(0, 97, (4, 16)))
    before = {k: m.weight.detach().clone() for k, m in unstructured.block_linears(model).items()}
    share = unstructured.prune(model, stats, 0.5, method, pattern)
    assert math.isclose(share, 0.5, abs_tol=0.03)
    for name, m in unstructured.block_linears(model).items():
        w, w0 = m.weight, before[name]
        assert torch.equal(w[w != 0], w0[w != 0])  # kept weights unchanged
        if pattern:
            full = w.shape[1] // 4 * 4  # every whole group of 4 keeps at most 2 (a shorter tail keeps its 2 best)
            assert bool(((w[:, :full].view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
        elif method == "wanda":  # per output row, by |W| * ||X||
            assert bool(((w == 0).sum(1) == w.shape[1] // 2).all())
            score = w0.abs() * stats.in_norm[name][None]
            for r in range(w.shape[0]):
                assert score[r][w[r] == 0].max() <= score[r][w[r] != 0].min()
        else:
            assert w0.abs()[w == 0].max() <= w0.abs()[w != 0].min()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    write_code_corpus(tmp)
    assert train_main(train_argv(tmp, "base", n_layer=2, n_head=4, n_kv_head=2, max_steps=4)) == 0
    return tmp


def test_cli_prunes_to_a_target_and_the_result_trains_from_its_teacher(runs, capsys):
    """--target-params half: a smaller checkpoint with its own config, under the target, that loads and fine-tunes
    with --init-from PRUNED --teacher ORIGINAL (the recipe); calibration shorter than asked says so."""
    base, _, _ = load_model(runs / "base")
    target = base.num_params() // 2
    out = runs / "half"
    assert prune_main(["--checkpoint", str(runs / "base"), "--out", str(out), "--target-params", str(target),
                       "--calib-dataset", str(runs / "corpus.txt"), "--calib-tokens", "100000"]) == 0
    said = capsys.readouterr().out
    assert "the text has only" in said and "wrote" in said
    small, _, cfg = load_model(out)
    assert small.num_params() <= target and cfg["pruning"]["kind"] == "structured"
    assert small.cfg.n_embd < base.cfg.n_embd and small.cfg.intermediate_size < base.cfg.intermediate_size
    assert not list(runs.glob("*.tmp*")) and not list(runs.glob(".half*"))
    argv = [a for a in train_argv(runs, "recover", max_steps=3) if a not in ("--vocab-size", "300")]
    assert train_main(argv + ["--init-from", str(out), "--teacher", str(runs / "base")]) == 0
    assert len(step_losses(runs / "recover")) == 3
    assert load_model(runs / "recover")[0].cfg.n_embd == small.cfg.n_embd


@pytest.mark.parametrize("flags, msg", [
    (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
    (["--sparsity", "0"], "--sparsity must be in (0, 1)"),
    (["--heads", "3"], "breaks the GQA groups"),
    (["--target-params", "1e9"], "is not smaller than the model"),
    (["--layers", "5"], "--layers 5: the model has 2"),
    (["--pattern", "4:2"], "need 0 < N < M"),
    ([], "nothing to prune"),
    (["--sparsity", "0.5", "--layers", "1"], "not both"),
], ids=["sparsity-high", "sparsity-zero", "gqa", "target", "layers", "pattern", "nothing", "both"])
def test_bad_settings_are_one_line_and_write_nothing(runs, capsys, flags, msg):
    out = runs / "bad"
    assert prune_main(["--checkpoint", str(runs / "base"), "--out", str(out), "--calib-tokens", "64"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err, err
    assert not out.exists()


def test_existing_out_is_refused(runs, capsys):
    (runs / "taken").mkdir()
    assert prune_main(["--checkpoint", str(runs / "base"), "--out", str(runs / "taken"), "--layers", "1"]) == 2
    assert "exists" in capsys.readouterr().err
    assert ck.MODEL_FILE not in [p.name for p in (runs / "taken").iterdir()]
