"""The trainer's objective interface (llm/train/objectives/): chosen by --objective, its loss trains, its metrics
reach metrics.jsonl and the validation record, its state rides in trainer.json."""

import json

import torch
from conftest import metrics_records, train_argv

from llm import checkpoint as ck
from llm.train import objectives
from llm.train.cli import main


class _Hidden(objectives.Objective):
    """CE computed from the model's hidden states (the path a chunked objective takes), plus two metrics."""

    name = "test-hidden"

    def setup(self, ctx):
        self.calls = 0

    def loss(self, fwd, batch):
        x, y = batch
        h, _ = fwd(x, hidden=True)  # (B, T, C)
        head = fwd.module.lm_head if hasattr(fwd, "module") else fwd.lm_head
        logits = head(h).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        self.calls += 1
        return loss, {"test/top1": (logits.argmax(-1) == y).float().mean(), "test/calls": torch.tensor(1.0)}

    def state_dict(self):
        return {"calls": self.calls}


def test_unknown_objective_is_one_line(corpus_tmp, capsys):
    tmp = corpus_tmp
    assert main(train_argv(tmp, "bad") + ["--objective", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown --objective 'nope'; choose one of: ce") and "\n" not in err


def test_objective_loss_metrics_and_state(corpus_tmp, monkeypatch):
    """A registered objective trains through the one loop: the losses equal plain CE's (hidden states + head is
    the same math as the fused CE, fp32 on CPU within rounding), its metrics are logged per step and for
    validation, and its state_dict lands in trainer.json."""
    tmp = corpus_tmp
    monkeypatch.setitem(objectives.OBJECTIVES, "test-hidden", _Hidden)
    args = dict(max_steps=4, eval_interval=4, log_interval=1)
    assert main(train_argv(tmp, "ce", **args)) == 0
    assert main(train_argv(tmp, "hid", **args) + ["--objective", "test-hidden"]) == 0
    ce = [r["loss"] for r in metrics_records(tmp / "ce") if "loss" in r]
    recs = metrics_records(tmp / "hid")
    hid = [r["loss"] for r in recs if "loss" in r]
    assert len(hid) == 4 and torch.allclose(torch.tensor(hid), torch.tensor(ce), rtol=1e-5, atol=1e-5)
    steps = [r for r in recs if "loss" in r]
    assert all(r["test/calls"] == 1.0 and 0.0 <= r["test/top1"] <= 1.0 for r in steps)
    val = [r for r in recs if "val_loss" in r]
    assert len(val) == 1 and 0.0 <= val[0]["val/test/top1"] <= 1.0 and val[0]["val/test/calls"] == 1.0
    state = json.loads((ck.resolve(tmp / "hid") / "trainer.json").read_text())
    assert state["objective"]["name"] == "test-hidden" and state["objective"]["calls"] > 4
