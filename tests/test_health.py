"""Training-health telemetry and the loss-spike detector (llm/train/health.py; RELIABILITY.md promise 8)."""

import math

import pytest
import torch
from conftest import metrics_records, plant_losses, tiny_config, train_argv

from llm import checkpoint as ck
from llm import ops
from llm.model import Transformer
from llm.train import distributed as dd
from llm.train.cli import main
from llm.train.health import Health, SpikeDetector

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tmp(corpus_tmp):
    return corpus_tmp


records = metrics_records


def test_telemetry_every_interval_leaves_training_bit_identical(tmp):
    assert main(train_argv(tmp, "plain", health_interval=0)) == 0
    assert main(train_argv(tmp, "health", health_interval=3, n_layer=1)) == 0
    plain = [r["loss"] for r in records(tmp / "plain") if "loss" in r]
    recs = [r for r in records(tmp / "health") if "loss" in r]
    assert [r["loss"] for r in recs] == plain
    for r in recs:
        keys = {k for k in r if k.startswith("health/")}
        if r["step"] % 3:
            assert not keys
            continue
        want = {f"health/{s}/{lay}" for s in ("grad_rms", "update_ratio") for lay in ("0", "emb", "head")}
        want |= {f"health/{s}/0" for s in ("act_rms", "attn_max_logit", "attn_entropy")} | {"health/logit_max"}
        assert keys == want, keys
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in keys)
        assert r["health/attn_entropy/0"] <= math.log(32) + 1e-4  # at most uniform over the 32 keys
    assert (tmp / "health" / "health.png").stat().st_size > 0


def test_probe_matches_a_direct_computation():
    """The recomputed head-0 scores: softmax entropy of row T-1 and max logit agree with plain torch."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(qk_norm=True))
    x = torch.randint(0, 101, (2, 20))
    stats = Health(model, 1, dd.Dist(), False).probe(model, x)
    attn = model.blocks[0].attn
    h = model.blocks[0].norm1(model.tok_emb(x[:1]))
    q, k, _ = attn.wqkv(h).split([4 * 8, 2 * 8, 2 * 8], -1)
    q, k = attn.q_norm(q.view(1, 20, 4, 8))[:, :, 0], attn.k_norm(k.view(1, 20, 2, 8))[:, :, 0]  # (1, T, D)
    pos = torch.arange(20)
    q = ops.rope(q[:, :, None], model.rope_cos, model.rope_sin, pos, kernels="torch")[0, :, 0]
    k = ops.rope(k[:, :, None], model.rope_cos, model.rope_sin, pos, kernels="torch")[0, :, 0]
    s = (q @ k.T / math.sqrt(8)).masked_fill(torch.ones(20, 20).triu(1).bool(), float("-inf"))[4:]  # last 16 rows
    p = s.softmax(-1)
    assert stats["health/attn_max_logit/0"] == pytest.approx(s.max().item(), rel=1e-5)
    assert stats["health/attn_entropy/0"] == pytest.approx(-(p * p.clamp_min(1e-30).log()).sum(-1).mean().item(),
                                                           rel=1e-5)
    assert stats["health/logit_max"] == pytest.approx(model(x)[0].max().item(), rel=1e-5)


def test_spike_detector_flags_outliers_only_once_the_window_is_full():
    det = SpikeDetector(window=4, zscore=6.0)
    assert [det.check(v)[0] for v in (5.0, 4.9, 4.8, 4.85)] == [False] * 4
    assert det.check(4.83)[0] is False and det.check(50.0)[0] is True and det.check(float("nan"))[0] is True
    assert det.state_dict() == [4.9, 4.8, 4.85, 4.83]  # spikes never enter the window


def test_a_planted_spike_batch_is_skipped_and_logged(tmp, monkeypatch, capsys):
    """One finite loss spike: the step is skipped (weights unchanged), logged as an event, and training goes on."""
    plant_losses(monkeypatch, {8: 10.0})
    args = train_argv(tmp, "spike", max_steps=10, spike_window=4, spike_zscore=6, health_interval=0)
    assert main(args) == 0
    recs = records(tmp / "spike")
    events = [r for r in recs if "event" in r]
    assert [(e["step"], e["event"], e["reason"]) for e in events] == [(8, "skip", "spike")] and events[0]["z"] > 6
    assert [r["skipped"] for r in recs if "loss" in r][6:8] == [0, 1]
    assert "step 8: loss spike" in capsys.readouterr().out


def test_repeated_bad_batches_roll_back_to_the_last_checkpoint_past_the_bad_data(tmp, monkeypatch, capsys):
    """A NaN then a spike in a row (spike_rollback 2): the run rolls back to ckpt-8, reads the data after the bad
    batches, keeps every checkpoint, and finishes."""
    batches: list[int] = []
    plant_losses(monkeypatch, {10: float("nan"), 11: 10.0}, batches)
    args = train_argv(tmp, "rollback", max_steps=12, save_interval=4, spike_window=4, spike_zscore=6,
                      spike_rollback=2, health_interval=0)
    assert main(args) == 0
    out = tmp / "rollback"
    events = [r for r in records(out) if "event" in r]
    assert [(e["step"], e["event"]) for e in events] == [(10, "skip"), (11, "skip"), (8, "rollback")]
    assert events[-1]["from_step"] == 11 and events[-1]["data_skip_steps"] == 3
    assert batches == [*range(11), *range(11, 15)]  # steps 9-12 after the rollback read batches 11-14
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, 13))  # the rolled-back steps' records are replaced
    assert (out / "ckpt-0000008").is_dir() and ck.load_checkpoint(out / "ckpt-0000008")[0] is not None
    assert ck.resolve(out).name == "ckpt-0000012"
    st = ck.read_trainer_state(ck.resolve(out))
    assert st["rollbacks"] == 1 and st["data"]["skip_steps"] == 3 and st["skipped"] == 2
    assert "rolled back to" in capsys.readouterr().out
