"""The pretrainer in-process: configuration, planner, stability (RELIABILITY.md promises 8-11), telemetry."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import metrics_records, train_argv

from llm import checkpoint as ck
from llm.config import ModelConfig, preset
from llm.model import Transformer
from llm.train import distributed as dd
from llm.train import trainer
from llm.train.cli import main, resolve_configs
from llm.train.metrics import peak_flops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tmp(corpus_tmp):
    return corpus_tmp


records = metrics_records


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


# ----------------------------------------------------------------------------- configuration


def test_toml_config_with_cli_override_and_the_resolved_config_is_printed_and_saved(tmp, capsys):
    cfg = tmp / "run.toml"
    cfg.write_text('preset = "tiny"\n[model]\nn_layer = 2\n[train]\nmax_steps = 50\nlr = 1e-3\n'
                   'wandb = "off"\n[data]\nval_fraction = 0.1\n')
    m, d, t, args = resolve_configs(["--config", str(cfg), "--max-steps", "3", "--n-embd", "64"])
    assert (m.n_layer, m.n_embd, m.block_size, t.max_steps, t.lr, d.val_fraction) == (2, 64, 128, 3, 1e-3, 0.1)
    assert {"n_layer", "max_steps", "lr", "n_embd"} <= args.explicit
    args = train_argv(tmp, "toml", max_steps=2)
    assert main(["--config", str(cfg)] + args) == 0
    out = capsys.readouterr().out
    line = re.search(r"^config: .*$", out, re.M).group(0)  # one short line; every setting in config.toml
    assert "n_layer=1" in line and "n_embd=32" in line and line.endswith(str(tmp / "toml" / "config.toml"))
    assert re.search(r"^max_steps = 2$", (tmp / "toml" / "config.toml").read_text(), re.M)
    saved = json.loads((tmp / "toml" / "ckpt-0000002" / ck.CONFIG_FILE).read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["lr"] == 1e-3 and saved["data"]["val_fraction"] == 0.1
    # the written config.toml reproduces the run's settings
    m2, d2, t2, _ = resolve_configs(["--config", str(tmp / "toml" / "config.toml")])
    m1, d1, t1, _ = resolve_configs(["--config", str(cfg)] + args)
    assert (d2, t2) == (d1, t1) and {**m2.__dict__, "vocab_size": 0} == {**m1.__dict__, "vocab_size": 0}


@pytest.mark.parametrize("argv,msg", [
    (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    (["--lr", "fast"], "error: argument --lr: invalid float value: 'fast'"),
    (["--n-embd", "100", "--n-head", "3"], "error: n_embd (100) must be divisible by n_head (3)"),
    (["--n-head", "6", "--n-kv-head", "4", "--n-embd", "96"], "error: n_head (6) must be divisible by n_kv_head (4)"),
    (["--n-experts", "4", "--moe-top-k", "5"], "error: top_k (5) must be between 1 and n_experts (4)"),
    (["--preset", "huge"], "error: unknown preset 'huge'"),
    (["--max-steps", "0"], "error: max_steps must be >= 1"),
    (["--config", "/nonexistent.toml"], "error: config file not found: /nonexistent.toml"),
    (["TOML", 'n_layer = "four"'], "error: {toml}: n_layer must be int, got 'four'"),
    (["TOML", "bogus_key = 1"], "error: unknown keys in {toml}: bogus_key"),
    (["TOML", "n_layer = ["], "error: config file {toml} is not valid TOML"),
    (["--resume", "--out-dir", "{tmp}/empty"], "error: --resume: no checkpoint in {tmp}/empty"),
], ids=["flag", "type", "heads", "kv-heads", "top-k", "preset", "steps", "no-file", "toml-type", "toml-key",
        "toml-syntax", "resume-nothing"])
def test_config_errors_give_one_clear_line_before_any_work(tmp, capsys, argv, msg):
    """Promise 11: one `error: ...` line, exit 2, and nothing written."""
    toml = tmp / "bad.toml"
    if argv[0] == "TOML":
        toml.write_text(argv[1] + "\n")
        argv = ["--config", str(toml)]
    argv = [a.format(tmp=tmp) for a in argv]
    with pytest.raises(SystemExit) if argv[0] in ("--no-such-flag", "--lr") else _no_raise() as e:
        rc = main(argv + ["--out-dir", str(tmp / "never")] if "--out-dir" not in argv else argv)
    rc = e.value.code if isinstance(e, pytest.ExceptionInfo) else rc
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(msg.format(toml=toml, tmp=tmp)) and "\n" not in err, err
    assert not (tmp / "never").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_dataset_too_small_for_one_window_is_a_clear_error_with_the_numbers(tmp, capsys):
    """Promise 12 through the trainer."""
    assert main(train_argv(tmp, "small", block_size=4096)) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: the \w+ split of \S+ has \d+ tokens, fewer than one window of block_size \+ 1 = "
                        r"4097; use a smaller --block-size or more data", err), err


# ----------------------------------------------------------------------------- planner


def test_planner_picks_the_micro_batch_and_accumulation_for_a_global_batch():
    cfg, n_params, gib = ModelConfig(**preset("small")), 124_000_000, 2**30  # the planner only needs the count
    est = dict(amp=True, flash=True, fused_ce=True, act_ckpt=False, fsdp=False)
    p = dd.plan_batch(cfg, n_params, 16, 1, 1, 524288, False, 70 * gib, **est)
    assert p.tokens == 524288 and p.batch_size * p.grad_accum == 512 and p.total_bytes <= 70 * gib
    assert dd.plan_batch(cfg, n_params, 16, 1, 1, 524288, False, 2 * p.total_bytes, **est).batch_size > p.batch_size
    ac = dd.plan_batch(cfg, n_params, 16, 1, 1, 524288, False, 70 * gib, **{**est, "act_ckpt": True})
    assert ac.batch_size > p.batch_size and ac.act_bytes / ac.batch_size < p.act_bytes / p.batch_size
    ref = dd.plan_batch(cfg, n_params, 16, 1, 1, 524288, False, 70 * gib, **{**est, "flash": False, "fused_ce": False})
    assert ref.batch_size < p.batch_size  # unfused attention and LM head hold more per sequence
    eight = dd.plan_batch(cfg, n_params, 4, 1, 8, 524288, True, 70 * gib, **est)
    assert (eight.batch_size, eight.grad_accum, eight.tokens) == (4, 16, 524288)
    with pytest.raises(dd.ConfigError, match=r"must be a multiple of block_size x world size = 1024 x 8 = 8,192"):
        dd.plan_batch(cfg, n_params, 16, 1, 8, 500000, False, None, **est)
    with pytest.raises(dd.ConfigError, match="--batch-size 5 does not divide the 64 sequences per rank"):
        dd.plan_batch(cfg, n_params, 5, 1, 8, 524288, True, None, **est)
    # fixed: 16 bytes per parameter (fp32 weights, grads, AdamW moments) + 2 for bf16 copies; FSDP divides the 16
    assert p.fixed_bytes == n_params * 18
    assert dd.memory_estimate(cfg, n_params, 1, world=8, **{**est, "fsdp": True})[0] == n_params * (2 + 2)
    assert "global batch 524,288 tokens = 8 rank(s) x 16 accumulation x 4 seqs x 1024 tokens" in eight.describe()


def test_planner_runs_in_the_trainer_and_prints_its_plan(tmp, capsys):
    assert main(train_argv(tmp, "plan", max_steps=1, global_batch_tokens=384, batch_size=4)) == 0
    assert "plan: global batch 384 tokens = 1 rank(s) x 3 accumulation x 4 seqs x 32 tokens" in capsys.readouterr().out


def test_peak_flops_table_and_unknown_devices(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121),
                         ("NVIDIA Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        got = peak_flops(cuda)
        assert (got / 1e12 if got else None) == tflops, name
    assert peak_flops(cuda, torch.float32) is None and peak_flops(torch.device("cpu")) is None


# ----------------------------------------------------------------------------- stability


def _patch_forward(monkeypatch, bad: set[int], snapshots: dict | None = None):
    """Training forwards number n in `bad` return a NaN loss; snapshots[n] = the weights at forward n."""
    real, calls = Transformer.forward, {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if snapshots is not None:
                snapshots[calls["n"]] = {k: v.clone() for k, v in self.state_dict().items()}
            if calls["n"] in bad:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", forward)


def test_nan_loss_skips_the_step_and_leaves_the_optimizer_untouched(tmp, monkeypatch, capsys):
    """Promise 8: a NaN step is skipped (weights and AdamW state unchanged), logged and counted."""
    snaps, after = {}, []
    _patch_forward(monkeypatch, {3}, snaps)
    monkeypatch.setattr(Transformer, "after_step", lambda self: after.append(1))
    monkeypatch.setattr(Transformer, "moe_stats", lambda self: {"moe/0/max_load": 1.25})
    assert main(train_argv(tmp, "nan")) == 0
    recs = [r for r in records(tmp / "nan") if "loss" in r]
    assert math.isnan(recs[2]["loss"]) and [r["skipped"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert all(torch.equal(snaps[3][k], snaps[4][k]) for k in snaps[3])  # step 3 changed nothing
    assert not all(torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[2])  # (good steps do)
    opt = ck.read_optimizer_state(ck.resolve(tmp / "nan"))
    assert float(opt["state"][0]["step"]) == 5  # 6 steps, 1 skipped
    assert len(after) == 5 and all(r["moe/0/max_load"] == 1.25 for r in recs)  # MoE hooks: after_step + stats
    out = capsys.readouterr().out
    assert "step 3: non-finite loss nan / grad norm nan: step skipped (1 in a row, 1 in total)" in out
    assert "| moe (max over layers) max_load 1.25" in out


def test_k_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp, monkeypatch, capsys):
    """Promise 8: max_bad_steps consecutive non-finite steps -> exit 1 naming the last good checkpoint."""
    _patch_forward(monkeypatch, set(range(4, 100)))
    assert main(train_argv(tmp, "diverge", max_steps=20, save_interval=2, max_bad_steps=3)) == 1
    err = capsys.readouterr().err.strip()
    out = tmp / "diverge"
    assert err == (f"error: stopped at step 6 after 3 consecutive non-finite steps; last good checkpoint: "
                   f"{out / 'ckpt-0000002'} (resume it with a lower --lr, or check the data)")
    assert ck.resolve(out).name == "ckpt-0000002" and ck.load_checkpoint(out)[0] is not None
    assert not (out / "ckpt-0000004").exists()  # nothing saved during the bad streak


def test_grad_norm_is_logged_before_clipping_and_clipping_holds(tmp, monkeypatch):
    """Promise 9."""
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *a, **k):
        params = list(params)
        total = real(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        seen.append((total.item(), after))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert main(train_argv(tmp, "clip", max_steps=4, grad_clip=0.05)) == 0
    logged = [r["grad_norm"] for r in records(tmp / "clip") if "loss" in r]
    assert logged == [pre for pre, _ in seen] and min(logged) > 0.05
    assert all(post <= 0.05 * (1 + 1e-5) for _, post in seen)


def test_out_of_memory_on_the_first_step_suggests_a_smaller_micro_batch(tmp, monkeypatch, capsys):
    """Promise 10."""

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Transformer, "forward", oom)
    assert main(train_argv(tmp, "oom")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory in the first step with micro-batch 4 x 32 tokens") and "\n" not in err
    assert "smaller --batch-size" in err and "--global-batch-tokens" in err


# ----------------------------------------------------------------------------- features


def test_keep_last_n_plus_best_by_validation(tmp, monkeypatch):
    vals = iter([3.0, 2.0, 2.5, 2.7])
    monkeypatch.setattr(trainer.Run, "evaluate", lambda *a, **k: (next(vals), {}))
    assert main(train_argv(tmp, "keep", max_steps=8, save_interval=2, eval_interval=2, keep_last=2)) == 0
    out = tmp / "keep"
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000004", "ckpt-0000006", "ckpt-0000008"]
    assert (out / "best").read_text().strip() == "ckpt-0000004" and ck.resolve(out / "best").name == "ckpt-0000004"
    assert ck.resolve(out).name == "ckpt-0000008" and ck.load_checkpoint(out / "best")[0] is not None


def test_activation_checkpointing_gives_the_same_losses(tmp):
    assert main(train_argv(tmp, "noac", max_steps=3, n_layer=2)) == 0
    assert main(train_argv(tmp, "ac", max_steps=3, n_layer=2) + ["--activation-checkpointing"]) == 0
    assert train_losses(tmp / "ac") == train_losses(tmp / "noac")
    a, _ = ck.read_tensors(ck.resolve(tmp / "ac") / ck.MODEL_FILE)
    assert any(".blocks.1." in f".{k}" for k in a) and not any("checkpoint_wrapped" in k for k in a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_saves_the_scaler(tmp, dtype):
    assert main(train_argv(tmp, dtype, max_steps=3, dtype=dtype)) == 0
    losses = train_losses(tmp / dtype)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    state = ck.read_trainer_state(ck.resolve(tmp / dtype))
    assert bool(state["scaler"]) == (dtype == "float16")  # fp16 runs a grad scaler, and resume restores it
    if dtype == "float16":
        assert main(train_argv(tmp, dtype, max_steps=4, dtype=dtype) + ["--resume"]) == 0


def test_init_from_a_checkpoint_starts_from_its_weights_and_tokenizer(tmp, capsys):
    assert main(train_argv(tmp, "base", max_steps=3)) == 0
    base = ck.resolve(tmp / "base")
    assert main(train_argv(tmp, "ft", max_steps=1, lr=1e-12, min_lr=0, init_from=base)) == 0
    assert f"initialised from {base}" in capsys.readouterr().out
    a, _ = ck.read_tensors(base / ck.MODEL_FILE)
    b, _ = ck.read_tensors(ck.resolve(tmp / "ft") / ck.MODEL_FILE)
    assert all((a[k] - b[k]).abs().max() < 1e-8 for k in a)
    assert (ck.resolve(tmp / "ft") / "tokenizer.tiktoken").read_bytes() == (base / "tokenizer.tiktoken").read_bytes()


def test_wandb_offline_run_produces_its_files_and_resume_keeps_the_run_id(tmp):
    assert main(train_argv(tmp, "wb", max_steps=2) + ["--wandb", "offline"]) == 0
    run_id = ck.read_trainer_state(ck.resolve(tmp / "wb"))["wandb_run_id"]
    assert run_id and list((tmp / "wb" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert main(train_argv(tmp, "wb", max_steps=3) + ["--wandb", "offline", "--resume"]) == 0
    assert ck.read_trainer_state(ck.resolve(tmp / "wb"))["wandb_run_id"] == run_id
    assert len(list((tmp / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_qk_norm_flag_trains_and_its_gains_learn(tmp):
    """--qk-norm (RMSNorm on each query/key head): exposed as a flag, trains, and the per-head gains are updated."""
    assert main(train_argv(tmp, "qknorm", max_steps=4) + ["--qk-norm"]) == 0
    losses = train_losses(tmp / "qknorm")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    tensors, _ = ck.read_tensors(ck.resolve(tmp / "qknorm") / ck.MODEL_FILE)
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= set(tensors)
    assert not torch.equal(tensors["blocks.0.attn.q_norm.weight"], torch.ones(16))
