"""Knowledge distillation (llm/train/objectives/distill.py, ops.linear_distill): the loss's math, runs through
train.py --teacher (pretraining and SFT + LoRA data), exact resume, and the one-line refusals (RELIABILITY 32)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import metrics_records, step_losses, train_argv, write_code_corpus

from kernels.reference import linear_cross_entropy_ref, linear_distill_ref
from llm.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(N=10, d=8, dt=12, V=37, ignore=(2, 7), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=dtype, requires_grad=True)
    tx, tw = torch.randn(N, dt, generator=g, dtype=dtype), torch.randn(V, dt, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[list(ignore)] = -100
    return x, w, tx, tw, y


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_reference_terms_equal_their_definitions(T):
    """alpha = 1 is the head's CE; alpha = 0 is T^2 times torch's KL(p || q) over the kept rows only; reverse KL
    and JSD by hand; the stats are [ce, divergence, top-1 agreement]."""
    x, w, tx, tw, y = _inputs()
    keep = y != -100
    loss1, stats = linear_distill_ref(x, w, tx, tw, y, 1.0, T)
    assert torch.allclose(loss1.double(), linear_cross_entropy_ref(x, w, y).double()) and stats[0] == loss1.float()
    s, t = (x @ w.T)[keep] / T, (tx @ tw.T)[keep] / T
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="batchmean")
    loss0, stats0 = linear_distill_ref(x, w, tx, tw, y, 0.0, T, "kl")
    assert torch.allclose(loss0, T * T * kl) and torch.allclose(stats0[1], kl.float())
    rkl = (lq.exp() * (lq - lp)).sum(-1).mean()
    assert torch.allclose(linear_distill_ref(x, w, tx, tw, y, 0.0, T, "reverse-kl")[1][1], rkl.float())
    m = (lq.exp() + lp.exp()) / 2
    jsd = 0.5 * ((lp.exp() * (lp - m.log())).sum(-1) + (lq.exp() * (lq - m.log())).sum(-1)).mean()
    assert torch.allclose(linear_distill_ref(x, w, tx, tw, y, 0.0, T, "jsd")[1][1], jsd.float())
    agree = ((x @ w.T).argmax(-1) == (tx @ tw.T).argmax(-1))[keep].float().mean()
    assert torch.allclose(stats[2], agree)


@pytest.mark.parametrize("kind", ["kl", "reverse-kl", "jsd"])
def test_reference_divergence_is_zero_for_an_equal_teacher_and_ignores_masked_rows(kind):
    x, w, tx, tw, y = _inputs()
    _, st = linear_distill_ref(x, w, x.detach(), w.detach(), y, 0.5, 1.7, kind)
    assert abs(float(st[1])) < 1e-12 and float(st[2]) == 1.0
    loss, _ = linear_distill_ref(x, w, tx, tw, y, 0.3, 2.0, kind)
    loss.backward()
    assert x.grad[[2, 7]].abs().max() == 0 and x.grad[0].abs().max() > 0  # ignored rows get no gradient
    x2 = x.detach().clone()
    x2[[2, 7]] += 5.0
    assert torch.allclose(linear_distill_ref(x2, w, tx, tw, y, 0.3, 2.0, kind)[0], loss)
    assert torch.autograd.gradcheck(lambda a, b: linear_distill_ref(a, b, tx, tw, y, 0.3, 2.0, kind)[0],
                                    (x.detach().requires_grad_(), w.detach().requires_grad_()))


# ----------------------------------------------------------------------------- runs through train.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-layer teacher trained 8 steps on the code corpus."""
    tmp = tmp_path_factory.mktemp("distill")
    write_code_corpus(tmp)
    assert main(train_argv(tmp, "teacher", n_layer=2, max_steps=8)) == 0
    return tmp


def test_alpha_one_equals_plain_ce_and_metrics_are_logged(runs, capsys):
    """--distill-alpha 1 trains exactly as plain CE (the same losses): the CE term is the model's own loss. With
    the default alpha the distill/* metrics reach metrics.jsonl, the console line and validation."""
    args = dict(max_steps=4, eval_interval=4)
    assert main(train_argv(runs, "ce", **args)) == 0
    assert main(train_argv(runs, "a1", **args) + ["--teacher", str(runs / "teacher"), "--distill-alpha", "1"]) == 0
    ce, a1 = step_losses(runs / "ce"), step_losses(runs / "a1")
    assert len(ce) == 4 and all(math.isclose(ce[s], a1[s], rel_tol=1e-5) for s in ce)
    capsys.readouterr()
    assert main(train_argv(runs, "kd", **args) + ["--teacher", str(runs / "teacher")]) == 0
    out = capsys.readouterr().out
    assert "distillation: teacher" in out and "distill/top1_agree" in out
    recs = metrics_records(runs / "kd")
    steps = [r for r in recs if "loss" in r]
    for r in steps:
        assert math.isclose(r["loss"], 0.5 * r["distill/ce"] + 0.5 * r["distill/kl"], rel_tol=1e-5)
        assert 0 <= r["distill/top1_agree"] <= 1
    assert steps[-1]["distill/kl"] < steps[0]["distill/kl"]  # the student moves toward the teacher
    val = [r for r in recs if "val_loss" in r][-1]
    assert {"val/distill/kl", "val/distill/ce", "val/distill/top1_agree"} <= val.keys()


def test_distill_run_resumes_exactly(runs):
    """Promise 5 with a teacher: 6 steps == 3 steps + resume + 3 steps (per-step losses and metrics, bitwise)."""
    kd = ["--teacher", str(runs / "teacher"), "--distill-temperature", "2", "--distill-loss", "jsd"]
    assert main(train_argv(runs, "straight") + kd) == 0
    assert main(train_argv(runs, "resumed", max_steps=3) + kd) == 0
    assert main(train_argv(runs, "resumed") + kd + ["--resume"]) == 0
    a = [r for r in metrics_records(runs / "straight") if "loss" in r]
    b = [r for r in metrics_records(runs / "resumed") if "loss" in r]
    keys = ("step", "loss", "distill/kl", "distill/ce", "distill/top1_agree")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b] and len(a) == 6


def test_sft_lora_student_distills_from_a_fine_tuned_teacher(runs):
    """SFT data (answer tokens only) and a LoRA student, the teacher a LoRA chat checkpoint (same ChatML
    tokenizer): trains, logs the metrics; the first step's CE equals a plain LoRA run's first loss."""
    (runs / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"Double {i}.", "output": f"{2 * i}"}) + "\n"
                                            for i in range(40)))
    ft = dict(init_from=runs / "teacher", dataset=runs / "sft.jsonl", val_fraction=0.1, max_steps=3, lora_rank=4)

    def argv(out, **kw):
        return [a for a in train_argv(runs, out, **(ft | kw)) if a not in ("--vocab-size", "300")]

    assert main(argv("sft-teacher", max_steps=4)) == 0
    assert main(argv("sft-plain")) == 0
    assert main(argv("sft-kd") + ["--teacher", str(runs / "sft-teacher")]) == 0
    plain = [r for r in metrics_records(runs / "sft-plain") if "loss" in r]
    kd = [r for r in metrics_records(runs / "sft-kd") if "loss" in r]
    assert len(kd) == 3 and math.isclose(kd[0]["distill/ce"], plain[0]["loss"], rel_tol=1e-5)
    assert all(r["distill/kl"] > 0 for r in kd)


@pytest.mark.parametrize("case", ["other-tokenizer", "missing", "alpha", "temperature", "objective", "no-teacher"])
def test_bad_teacher_settings_are_one_line_before_any_work(runs, capsys, case):
    teacher = str(runs / "teacher")
    if case == "other-tokenizer":  # trained on the same text with another vocabulary size; the student starts
        # from the 300-id teacher (a student trained from scratch adopts its teacher's tokenizer)
        assert main(train_argv(runs, "other", vocab_size=280, data_dir=runs / "data280", max_steps=1)) == 0
    extra = {"other-tokenizer": ["--init-from", teacher, "--teacher", str(runs / "other")],
             "missing": ["--teacher", str(runs / "nope")], "alpha": ["--teacher", teacher, "--distill-alpha", "1.5"],
             "temperature": ["--teacher", teacher, "--distill-temperature", "0"],
             "objective": ["--teacher", teacher, "--objective", "nope"],
             "no-teacher": ["--objective", "distill"]}[case]
    capsys.readouterr()
    assert main(train_argv(runs, f"bad-{case}", data_dir=runs / "fresh-data") + extra) == 2
    err = capsys.readouterr().err.strip()
    want = {"other-tokenizer": "do not share a tokenizer: 300 vs 280 token ids", "missing": "--teacher",
            "alpha": "--distill-alpha must be in [0, 1]", "temperature": "--distill-temperature must be > 0",
            "objective": "--teacher applies to distillation", "no-teacher": "needs --teacher"}[case]
    assert err.startswith("error: ") and want in err and "\n" not in err, err
    assert not (runs / "fresh-data").exists()  # refused before the data was prepared


@pytest.mark.slow
def test_distill_under_ddp_and_fsdp_matches_one_process(runs):
    """2 gloo ranks (DDP, then FSDP2) with a teacher against one process with the same global batch: the same
    per-step losses (the student's head gradient reaches the wrappers' reductions through the objective)."""
    from conftest import run_two_ranks

    kd = ["--teacher", str(runs / "teacher")]
    assert main(train_argv(runs, "kd-one", grad_accum=2, max_steps=4) + kd) == 0
    ddp = train_argv(runs, "kd-ddp", grad_accum=1, max_steps=4) + kd
    fsdp = train_argv(runs, "kd-fsdp", grad_accum=1, max_steps=4) + kd + ["--fsdp"]
    r = run_two_ranks(runs, [(ddp, -1), (fsdp, -1)])
    assert "DDP" in r.stdout and "FSDP2" in r.stdout
    one = step_losses(runs / "kd-one")
    for out in ("kd-ddp", "kd-fsdp"):
        two = step_losses(runs / out)
        assert sorted(two) == [1, 2, 3, 4]
        assert all(abs(two[s] - one[s]) <= 1e-5 * abs(one[s]) for s in one), (out, two, one)
