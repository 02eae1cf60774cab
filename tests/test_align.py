"""Preference tuning: preference data (llm/data/preference.py), the reward model and DPO objectives
(llm/train/objectives/reward.py, dpo.py): their losses against straightforward implementations written here
(the formulas of TRL's DPOTrainer / RewardTrainer), runs through train.py, exact resume, and bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import metrics_records, train_argv, write_code_corpus

from llm import lora
from llm.config import ConfigError, DataConfig, TrainConfig, check_configs
from llm.data import preference
from llm.data.corpus import DataError
from llm.loading import load_model
from llm.train.cli import main
from llm.train.objectives.dpo import dpo_loss
from llm.train.objectives.pairs import answer_logps, last_scored
from llm.train.objectives.reward import Reward, bradley_terry, score

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the losses


def test_bradley_terry_equals_the_formula():
    torch.manual_seed(0)
    rc, rr = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    want = torch.stack([-torch.log(1 / (1 + torch.exp(-(a - b)))) for a, b in zip(rc, rr)]).mean()
    assert torch.allclose(bradley_terry(rc, rr), want, rtol=1e-12, atol=1e-12)


def test_smoothed_bradley_terry_equals_the_formula():
    """--reward-smoothing eps: each pair is right with probability 1 - eps (cDPO's conservative loss on the margin):
    -(1 - eps) log sigmoid(d) - eps log sigmoid(-d), minimal at d = log((1 - eps) / eps); eps 0 is plain BT."""
    torch.manual_seed(3)
    rc, rr = torch.randn(9, dtype=torch.float64) * 4, torch.randn(9, dtype=torch.float64) * 4
    sig = lambda z: 1 / (1 + torch.exp(-z))  # noqa: E731
    for eps in (0.0, 0.1, 0.3):
        want = torch.stack([-(1 - eps) * torch.log(sig(a - b)) - eps * torch.log(sig(b - a))
                            for a, b in zip(rc, rr)]).mean()
        assert torch.allclose(bradley_terry(rc, rr, eps), want, rtol=1e-12, atol=1e-12)
    d = torch.tensor([math.log(0.9 / 0.1)], dtype=torch.float64, requires_grad=True)
    bradley_terry(d, torch.zeros(1, dtype=torch.float64), 0.1).backward()
    assert abs(d.grad.item()) < 1e-12  # no pull past the smoothed optimum


def test_dpo_loss_equals_the_formula():
    """TRL's sigmoid DPO loss, written out: -log sigmoid(beta * ((pc - rc) - (pr - rr))), mean over pairs."""
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) * 10 for _ in range(4))
    for beta in (0.1, 0.5, 2.0):
        want = torch.stack([-F.logsigmoid(beta * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)]).mean()
        loss, margin = dpo_loss(pc, pr, rc, rr, beta)
        assert abs(loss.item() - want.item()) < 1e-12
        assert torch.allclose(margin, beta * ((pc - rc) - (pr - rr)))


def test_answer_logps_sum_only_the_answer_tokens():
    torch.manual_seed(2)
    R, L, C, V = 5, 7, 6, 11
    h, w = torch.randn(R, L, C, dtype=torch.float64), torch.randn(V, C, dtype=torch.float64)
    y = torch.randint(0, V, (R, L))
    y[:, :3] = -100
    y[1, 5:] = -100
    got, counts = answer_logps(h, w, y, chunk=2)
    lp = torch.log_softmax(h @ w.T, -1)
    want = torch.tensor([sum(lp[r, t, y[r, t]].item() for t in range(L) if y[r, t] != -100) for r in range(R)],
                        dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-10) and counts.tolist() == [4, 2, 4, 4, 4]
    assert last_scored(y).tolist() == [6, 4, 6, 6, 6]


# ----------------------------------------------------------------------------- data


def test_embedded_pairs_share_the_prompt_and_differ_in_the_answer():
    rows = list(preference.pairs(DataConfig(dataset=preference.EMBEDDED)))
    assert len(rows) > 1000 and {s for s, *_ in rows} == {"train", "val", "dev"}
    for _, name, chosen, rejected in rows[:200]:
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["content"] != rejected[-1]["content"]
        assert name.split(".")[-1] in chosen[0]["content"]


def test_embedded_pairs_take_wrong_answers_from_their_own_split():
    """A held-out pair never pits an unseen answer against one that fine-tuning on stdlib-qa has taught."""
    rows = list(preference.pairs(DataConfig(dataset=preference.EMBEDDED)))
    answers = {s: {c[-1]["content"] for t, _, c, _ in rows if t == s} for s in ("train", "val", "dev")}
    per_question: dict[str, set] = {}
    for split, name, _, rejected in rows:
        assert rejected[-1]["content"] in answers[split]
        per_question.setdefault(name, set()).add(rejected[-1]["content"])
    assert {len(v) for v in per_question.values()} == {preference.NEGATIVES}  # distinct wrong answers


def test_more_training_negatives_leave_the_held_out_pairs_unchanged(tmp_path):
    """--pref-negatives N: N distinct wrong answers per training question, the held-out pairs exactly as by
    default (the benchmark's held-out accuracy is measured on the same pairs), prepared under another name."""
    default = list(preference.pairs(DataConfig(dataset=preference.EMBEDDED)))
    more = list(preference.pairs(DataConfig(dataset=preference.EMBEDDED, pref_negatives=7)))
    assert [r for r in more if r[0] == "val"] == [r for r in default if r[0] == "val"]
    per_question: dict[str, set] = {}
    for split, name, chosen, rejected in more:
        if split == "train":
            assert rejected[-1]["content"] != chosen[-1]["content"]
            per_question.setdefault(name, set()).add(rejected[-1]["content"])
    assert {len(v) for v in per_question.values()} == {7}
    assert len(more) - len(default) == 3 * len(per_question)
    tok = type("T", (), {"info": {"kind": "tiktoken", "name": "t"}})  # dataset_dir reads only its slug
    dirs = {n: preference.dataset_dir(DataConfig(dataset=preference.EMBEDDED, pref_negatives=n), tok, 64).name
            for n in (4, 7)}
    assert dirs[4] != dirs[7] and dirs[4].startswith(f"{preference.EMBEDDED}-x4-")
    with pytest.raises(ConfigError, match="--pref-negatives"):
        check_configs(DataConfig(dataset=preference.EMBEDDED, pref_negatives=0), TrainConfig())


def test_the_dev_split_comes_from_the_training_questions_and_leaves_the_test_pairs_unchanged(runs, tmp_path):
    """--pref-dev-fraction carves a dev split (the trainer's validation) out of the TRAINING questions: the held-out
    pairs are the same pairs, prepared into the same bytes (manifest sha256s) as with no dev split; no question is
    in two splits; dev questions get 4 pairs like held-out ones."""
    rows = {f: list(preference.pairs(DataConfig(dataset=preference.EMBEDDED, pref_dev_fraction=f)))
            for f in (0.0, 0.05, 0.2)}
    assert [r for r in rows[0.0] if r[0] == "val"] == [r for r in rows[0.05] if r[0] == "val"] == \
        [r for r in rows[0.2] if r[0] == "val"]
    assert "dev" not in {r[0] for r in rows[0.0]}
    names = {f: {s: {r[1] for r in rs if r[0] == s} for s in ("train", "val", "dev")} for f, rs in rows.items()}
    for n in names.values():
        assert not (n["train"] & n["dev"]) and not (n["val"] & n["dev"]) and not (n["train"] & n["val"])
    assert names[0.0]["train"] == names[0.05]["train"] | names[0.05]["dev"]
    assert 0.03 < len(names[0.05]["dev"]) / len(names[0.0]["train"]) < 0.07 and names[0.05]["dev"] < names[0.2]["dev"]
    per = [r[1] for r in rows[0.05] if r[0] == "dev"]
    assert {per.count(n) for n in set(per)} == {preference.NEGATIVES}
    _, tok, _ = load_model(runs / "sft")
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(60)))
    made = {d: preference.prepare(DataConfig(dataset=str(f), data_dir=str(tmp_path / "data"), pref_dev_fraction=d),
                                  tok, 32, log=lambda _: None) for d in (0.0, 0.1)}
    m = {d: json.loads((p / "manifest.json").read_text())["splits"] for d, p in made.items()}
    assert made[0.0] != made[0.1] and m[0.0]["val"] == m[0.1]["val"] and "dev" not in m[0.0]
    assert m[0.1]["dev"]["pairs"] >= 1 and m[0.1]["train"]["pairs"] + m[0.1]["dev"]["pairs"] == m[0.0]["train"]["pairs"]
    with pytest.raises(ConfigError, match="--pref-dev-fraction"):
        check_configs(DataConfig(dataset=preference.EMBEDDED, pref_dev_fraction=1.0), TrainConfig())


def test_an_edited_preference_file_is_prepared_again(runs, tmp_path):
    """Prepared pairs are named by the file's path, size and modification time: an edited file is not served
    from the old preparation."""
    _, tok, _ = load_model(runs / "sft")
    f = tmp_path / "p.jsonl"
    line = json.dumps({"prompt": "Double 1.", "chosen": "2", "rejected": "3"}) + "\n"
    f.write_text(line * 2)
    cfg = DataConfig(dataset=str(f), data_dir=str(tmp_path / "data"), val_fraction=0.0)
    first = preference.prepare(cfg, tok, 32, log=lambda _: None)
    f.write_text(line * 3)
    second = preference.prepare(cfg, tok, 32, log=lambda _: None)
    manifest = [json.loads((d / "manifest.json").read_text()) for d in (first, second)]
    assert first != second
    assert [sum(m["splits"][s]["pairs"] for s in m["splits"]) for m in manifest] == [2, 3]


@pytest.mark.parametrize("line,msg", [
    ({"prompt": "Hi", "chosen": "Hello"}, "expected an object with \"chosen\" and \"rejected\""),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": 3}, "field 'rejected' must be a string"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "field \"prompt\" must be a string or a list"),
    ({"prompt": "Hi", "chosen": "", "rejected": "b"}, "empty answer"),
], ids=["no-rejected", "bad-type", "bad-prompt", "empty-answer"])
def test_bad_preference_lines_name_file_and_line(tmp_path, line, msg):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"{f}:2") as e:
        list(preference.pairs(DataConfig(dataset=str(f))))
    assert msg in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained base (6 steps), an SFT model from it (6 steps: chat tokens added) and a preference file:
    'Double i.' answered right (chosen) and wrong (rejected)."""
    tmp = tmp_path_factory.mktemp("align")
    write_code_corpus(tmp)
    assert main(train_argv(tmp, "base")) == 0
    (tmp / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"Double {i}.", "output": f"{2 * i}"}) + "\n"
                                           for i in range(40)))
    sft = dict(init_from=tmp / "base", dataset=tmp / "sft.jsonl", val_fraction=0.1)
    assert main([a for a in train_argv(tmp, "sft", **sft) if a not in ("--vocab-size", "300")]) == 0
    (tmp / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Double {i}.", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"}) + "\n"
        for i in range(40)))
    return tmp


def align_argv(tmp: Path, out: str, **kw) -> list[str]:
    base = dict(init_from=tmp / "sft", dataset=tmp / "prefs.jsonl", val_fraction=0.1, max_steps=6, lr=1e-3,
                eval_interval=3)
    return [a for a in train_argv(tmp, out, **(base | kw)) if a not in ("--vocab-size", "300")]


def test_reward_model_trains_saves_and_scores(runs, capsys):
    assert main(align_argv(runs, "rm", objective="reward")) == 0
    assert "validating on the dev split" in capsys.readouterr().out  # not on the held-out pairs
    recs = metrics_records(runs / "rm")
    steps = [r for r in recs if "loss" in r]
    assert abs(steps[0]["loss"] - 0.6931) < 1e-3  # the zero-initialised head scores every answer 0: log 2
    assert all(0 <= r["reward/acc"] <= 1 for r in steps) and any("val/reward/acc" in r for r in recs)
    model, tok, cfg = load_model(runs / "rm")
    assert cfg["model"]["reward_head"] and model.reward_head is not None
    assert model.reward_head.weight.abs().sum() > 0  # it trained
    convo = [{"role": "user", "content": "Double 3."}, {"role": "assistant", "content": "6"}]
    s = score(model, tok, convo)
    assert isinstance(s, float) and s == score(model, tok, convo)
    from llm.train.score import main as score_main

    capsys.readouterr()
    assert score_main(["--checkpoint", str(runs / "rm"), "--prompt", "Double 3.", "--answer", "6", "--answer", "7",
                       "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["answer"] for o in out] == ["6", "7"] and abs(out[0]["score"] - s) < 1e-6
    assert score_main(["--checkpoint", str(runs / "rm"), "--jsonl", str(runs / "prefs.jsonl")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("40 pairs: chosen scored higher in")
    assert score_main(["--checkpoint", str(runs / "sft"), "--prompt", "x", "--answer", "y"]) == 2
    assert "has no reward head" in capsys.readouterr().err


def test_reward_smoothing_reaches_the_objectives_loss():
    """--reward-smoothing flows from the config into the reward objective's loss: on fixed hidden states (a stub
    model) its loss is bradley_terry(scores of the chosen rows, of the rejected rows, eps)."""
    torch.manual_seed(4)
    x, y = torch.zeros(6, 5, dtype=torch.long), torch.full((6, 5), 1)  # 3 pairs: chosen rows first
    h = torch.randn(6, 5, 8)
    head = torch.nn.Linear(8, 1)
    r = head(h[:, -1]).squeeze(-1)
    for eps in (0.0, 0.2):
        obj = Reward(TrainConfig(objective="reward", reward_smoothing=eps), DataConfig())
        obj.head = head
        loss, metrics = obj.loss(lambda x, hidden: (h, None), (x, y))
        assert torch.allclose(loss, bradley_terry(r[:3], r[3:], eps))
        assert torch.allclose(metrics["reward/margin"], (r[:3] - r[3:]).mean())


def test_lora_reward_model_saves_its_head_with_the_adapter_scores_and_rewards_grpo(runs, capsys):
    """--objective reward --lora-rank: the base frozen, LoRA and the scalar head trained and saved together in
    adapter.safetensors; the checkpoint loads (on its recorded base) as a reward model with that head, scores
    from `llm score`, resumes exactly (6 == 3 + resume + 3) and serves as GRPO's --reward-model."""
    assert main(align_argv(runs, "rm-lora", objective="reward", lora_rank=4)) == 0
    ckpt = runs / "rm-lora" / "ckpt-0000006"
    saved = load_model(runs / "sft")[0].state_dict()
    adapter = json.loads((ckpt / lora.ADAPTER_CONFIG).read_text())
    assert adapter["reward_head"] and not (ckpt / "model.safetensors").exists()
    from safetensors.torch import load_file

    tensors = load_file(ckpt / lora.ADAPTER_FILE)
    assert "reward_head.weight" in tensors and any(".lora_" in k for k in tensors)
    assert not any(k in saved for k in tensors if k != "reward_head.weight")  # no base tensor: only the adapter
    model, tok, cfg = load_model(runs / "rm-lora")
    assert model.reward_head is not None and torch.equal(model.reward_head.weight, tensors["reward_head.weight"])
    assert model.reward_head.weight.abs().sum() > 0  # it trained
    for k, v in model.state_dict().items():  # the base as it was
        if ".lora_" not in k and k != "reward_head.weight" and k in saved:
            assert torch.equal(v, saved[k]), k
    convo = [{"role": "user", "content": "Double 3."}, {"role": "assistant", "content": "6"}]
    s = score(model, tok, convo)
    from llm.train.score import main as score_main

    capsys.readouterr()
    assert score_main(["--checkpoint", str(runs / "rm-lora"), "--prompt", "Double 3.", "--answer", "6",
                       "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)[0]["score"] - s) < 1e-6
    assert main(align_argv(runs, "rm-lora2", objective="reward", lora_rank=4, max_steps=3)) == 0
    assert main(align_argv(runs, "rm-lora2", objective="reward", lora_rank=4) + ["--resume"]) == 0
    a = [r["loss"] for r in metrics_records(runs / "rm-lora") if "loss" in r]
    b = [r["loss"] for r in metrics_records(runs / "rm-lora2") if "loss" in r]
    assert a == b[:3] + b[-3:]
    assert main(align_argv(runs, "grpo-lora-rm", objective="grpo", dataset=runs / "sft.jsonl",
                           reward_model=runs / "rm-lora", grpo_group=3, grpo_max_new=4, batch_size=2,
                           max_steps=1)) == 0
    r = [r for r in metrics_records(runs / "grpo-lora-rm") if "loss" in r][0]
    assert math.isfinite(r["grpo/reward"]) and r["grpo/reward"] != 0.0  # scored by the LoRA reward model


def test_dpo_full_finetune_resumes_exactly(runs):
    """DPO against a frozen copy of the starting policy: 6 steps == 3 + resume + 3 (losses and metrics bitwise)."""
    assert main(align_argv(runs, "dpo", objective="dpo")) == 0
    assert main(align_argv(runs, "dpo2", objective="dpo", max_steps=3)) == 0
    assert main(align_argv(runs, "dpo2", objective="dpo", max_steps=6) + ["--resume"]) == 0
    a = [r for r in metrics_records(runs / "dpo") if "loss" in r]
    b = [r for r in metrics_records(runs / "dpo2") if "loss" in r]
    assert [r["loss"] for r in a] == [r["loss"] for r in b[:3] + b[-3:]]
    assert [r["dpo/margin"] for r in a] == [r["dpo/margin"] for r in b[:3] + b[-3:]]
    assert abs(a[0]["loss"] - 0.6931) < 1e-3 and a[0]["dpo/margin"] == 0.0  # policy == reference at step 0


def test_dpo_nll_adds_the_chosen_answers_nll(runs):
    """--dpo-nll alpha (RPO): at step 0 the policy is its reference (DPO loss log 2), so the loss is log 2 + alpha *
    the chosen answers' per-token NLL, which the run logs as dpo/chosen_nll."""
    assert main(align_argv(runs, "rpo", objective="dpo", dpo_nll=0.5, max_steps=1)) == 0
    r = [r for r in metrics_records(runs / "rpo") if "loss" in r][0]
    assert r["loss"] == pytest.approx(math.log(2) + 0.5 * r["dpo/chosen_nll"], rel=1e-5)


def test_dpo_with_lora_uses_the_base_as_reference(runs):
    """LoRA DPO needs no second model: its reference (adapters off) equals the --init-from model's log-probs, so
    the first step's loss is log 2 and the margin 0, and a run with --ref pointing at that model gives the same."""
    assert main(align_argv(runs, "dpo-lora", objective="dpo", lora_rank=4, max_steps=3)) == 0
    assert main(align_argv(runs, "dpo-lora-ref", objective="dpo", lora_rank=4, max_steps=3,
                           ref=runs / "sft")) == 0
    a = [r for r in metrics_records(runs / "dpo-lora") if "loss" in r]
    b = [r for r in metrics_records(runs / "dpo-lora-ref") if "loss" in r]
    assert abs(a[0]["loss"] - 0.6931) < 1e-3 and a[0]["dpo/margin"] == 0.0
    assert torch.allclose(torch.tensor([r["loss"] for r in a]), torch.tensor([r["loss"] for r in b]), rtol=1e-5)
    model, _, _ = load_model(runs / "dpo-lora")
    x = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        on, _ = model(x)
        with lora.disabled(model):
            off, _ = model(x)
        again, _ = model(x)
    assert torch.equal(on, again) and not torch.equal(on, off)  # off inside the block only


@pytest.mark.parametrize("flags,msg", [
    (dict(objective="dpo", dpo_beta=0), "--dpo-beta must be > 0"),
    (dict(objective="dpo", dpo_nll=-1), "--dpo-nll must be >= 0"),
    (dict(objective="reward", reward_smoothing=0.5), "--reward-smoothing must be in [0, 0.5)"),
    (dict(objective="reward", dataset="SFT"), "trains on preference pairs"),
    (dict(objective="dpo", ref="OTHER"), "another tokenizer"),
], ids=["beta-0", "nll-negative", "smoothing-half", "not-preference-data", "ref-other-tokenizer"])
def test_bad_preference_settings_are_one_line(runs, capsys, flags, msg):
    if flags.get("dataset") == "SFT":
        flags = flags | {"dataset": runs / "sft.jsonl"}
    if flags.get("ref") == "OTHER":  # the pretrained base: no chat tokens, so other ids than the SFT model's
        flags = flags | {"ref": runs / "base"}
    capsys.readouterr()
    assert main(align_argv(runs, "bad", **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and "\n" not in err


# ----------------------------------------------------------------------------- GRPO


def test_group_advantages_and_grpo_loss_equal_the_formulas():
    """GRPO (DeepSeekMath; TRL's GRPOTrainer with one update per sample): advantages standardised per group, the
    k3 KL estimator, the per-answer token mean."""
    from llm.train.objectives.grpo import group_advantages, grpo_loss

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4)
    g = r.view(2, 4)
    want = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + 1e-4)
    assert torch.allclose(adv, want.flatten()) and torch.equal(adv[4:], torch.zeros(4))
    torch.manual_seed(3)
    logp = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(8, 5, dtype=torch.float64)
    mask = (torch.rand(8, 5) > 0.3).double()
    mask[:, 0] = 1
    loss, kl = grpo_loss(logp, ref, adv.double(), mask, 0.04)
    per = []
    for i in range(8):
        terms = [-(adv[i].item() - 0.04 * (torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1))
                 for t in range(5) if mask[i, t]]
        per.append(torch.stack(terms).mean())
    assert abs(loss.item() - torch.stack(per).mean().item()) < 1e-12
    loss.backward()  # the ratio's gradient is the policy gradient: d/dlogp of -A * exp(logp - sg(logp)) = -A
    n = mask.sum(1, keepdim=True)
    d = ref - logp.detach()
    want_grad = (-(adv.double()[:, None]) - 0.04 * (torch.exp(d) - 1)) * mask / n / 8
    assert torch.allclose(logp.grad, want_grad, atol=1e-12)
    assert kl.item() >= 0


def test_grpo_run_is_deterministic_and_resumes_exactly(runs):
    """GRPO with the built-in exact-match reward on 'Double i.' prompts: 4 steps == 2 + resume + 2 (sampled
    answers are seeded by the batch index, so losses and rewards repeat bitwise)."""
    kw = dict(objective="grpo", dataset=runs / "sft.jsonl", reward="prefix_match", grpo_group=3, grpo_max_new=4,
              batch_size=2, eval_interval=100)
    assert main(align_argv(runs, "grpo", max_steps=4, **kw)) == 0
    assert main(align_argv(runs, "grpo2", max_steps=2, **kw)) == 0
    assert main(align_argv(runs, "grpo2", max_steps=4, **kw) + ["--resume"]) == 0
    a = [r for r in metrics_records(runs / "grpo") if "loss" in r]
    b = [r for r in metrics_records(runs / "grpo2") if "loss" in r]
    assert len(a) == 4 and [r["loss"] for r in a] == [r["loss"] for r in b[:2] + b[-2:]]
    assert [r["grpo/reward"] for r in a] == [r["grpo/reward"] for r in b[:2] + b[-2:]]
    assert all(0 <= r["grpo/reward"] <= 1 and r["grpo/kl"] >= 0 and 1 <= r["grpo/answer_len"] <= 4 for r in a)


def test_grpo_reward_settings_are_one_line(runs, capsys):
    kw = dict(objective="grpo", dataset=runs / "sft.jsonl")
    for flags, msg in [({}, "needs one reward"), (dict(reward="nope"), "give a built-in"),
                       (dict(reward="no_such_module_xyz:f"), "cannot import"),
                       (dict(reward="exact_match", grpo_group=1), "--grpo-group must be >= 2")]:
        assert main(align_argv(runs, "bad-grpo", **kw, **flags)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err, (flags, err)


# ----------------------------------------------------------------------------- data-parallel


@pytest.mark.slow
def test_preference_objectives_under_ddp_and_fsdp_match_one_process(runs):
    """2 gloo ranks (DDP, then FSDP2) against one process with the same global batch (2 micro-batches): the same
    per-step losses for the reward model, DPO and GRPO (under FSDP2 the ranks sample in lockstep: every forward
    gathers the weights, so each rank makes the same number of calls)."""
    from conftest import run_two_ranks, step_losses

    grpo = dict(objective="grpo", dataset=runs / "sft.jsonl", reward="prefix_match", grpo_group=3, grpo_max_new=4,
                batch_size=2)
    cases = {"rm": dict(objective="reward"), "dpo": dict(objective="dpo"), "grpo": grpo}
    jobs = []
    for name, kw in cases.items():
        assert main(align_argv(runs, f"{name}-one", max_steps=3, grad_accum=2, **kw)) == 0
        jobs += [(align_argv(runs, f"{name}-ddp", max_steps=3, **kw), -1),
                 (align_argv(runs, f"{name}-fsdp", max_steps=3, **kw) + ["--fsdp"], -1)]
    r = run_two_ranks(runs, jobs)
    assert "DDP" in r.stdout and "FSDP2" in r.stdout
    for name in cases:
        one = step_losses(runs / f"{name}-one")
        for kind in ("ddp", "fsdp"):
            two = step_losses(runs / f"{name}-{kind}")
            assert sorted(two) == [1, 2, 3], (name, kind, two)
            assert all(abs(two[s] - one[s]) <= 1e-5 * abs(one[s]) + 1e-7 for s in one), (name, kind, two, one)


# ----------------------------------------------------------------------------- weight averaging (--ema-decay)


def test_ema_is_the_moving_average_of_the_saved_weights_and_loads_as_a_checkpoint(runs):
    """--ema-decay d with a reward model: <ckpt>/ema holds d^3 w0 + d^2 (1-d) w1 + d (1-d) w2 + (1-d) w3 of the
    trained tensors (w_t saved at every step, w0 the SFT model with the zero head), the frozen LM head as it is;
    it loads as a reward model; the run validates it (val/ema_loss) and its best checkpoint is picked by it."""
    d = 0.6
    assert main(align_argv(runs, "rm-ema", objective="reward", ema_decay=d, max_steps=3, save_interval=1,
                           keep_last=0, eval_interval=1)) == 0
    w = [load_model(runs / "rm-ema" / f"ckpt-{s:07d}")[0].state_dict() for s in (1, 2, 3)]
    sft = load_model(runs / "sft")[0].state_dict()
    w = [sft | {"reward_head.weight": torch.zeros_like(w[0]["reward_head.weight"])}] + w
    avg, _, cfg = load_model(runs / "rm-ema" / "ckpt-0000003" / "ema")
    assert cfg["model"]["reward_head"]
    weights = [d ** 3, d ** 2 * (1 - d), d * (1 - d), 1 - d]
    for k, v in avg.state_dict().items():
        if k == "lm_head.weight" or not v.is_floating_point():  # frozen (the reward objective does not train it)
            assert torch.equal(v, w[3][k]), k
            continue
        want = sum(c * t[k].float() for c, t in zip(weights, w))
        assert torch.allclose(v, want, rtol=1e-5, atol=1e-6), k
    assert not torch.equal(avg.reward_head.weight, w[3]["reward_head.weight"])
    recs = metrics_records(runs / "rm-ema")
    ema_vals = {r["step"]: r["val/ema_loss"] for r in recs if "val/ema_loss" in r}
    assert sorted(ema_vals) == [1, 2, 3] and any("val/ema/reward/acc" in r for r in recs)
    best = (runs / "rm-ema" / "best").read_text().strip()
    assert best == f"ckpt-{min(ema_vals, key=ema_vals.get):07d}"
    convo = [{"role": "user", "content": "Double 3."}, {"role": "assistant", "content": "6"}]
    assert isinstance(score(avg, load_model(runs / "rm-ema")[1], convo), float)


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 4}], ids=["full", "lora"])
def test_ema_resumes_exactly(runs, extra):
    """6 steps == 3 + resume + 3 with --ema-decay (SFT cross-entropy: every objective averages): the losses and the
    final average bitwise; a LoRA run's average is an adapter on the same base."""
    kw = dict(init_from=runs / "base", dataset=runs / "sft.jsonl", ema_decay=0.7, eval_interval=3) | extra
    argv = lambda out, **k: [a for a in align_argv(runs, out, **(kw | k)) if a]  # noqa: E731
    assert main(argv("ema-a")) == 0
    assert main(argv("ema-b", max_steps=3)) == 0
    assert main(argv("ema-b") + ["--resume"]) == 0
    a = [r["loss"] for r in metrics_records(runs / "ema-a") if "loss" in r]
    b = [r["loss"] for r in metrics_records(runs / "ema-b") if "loss" in r]
    assert a == b[:3] + b[-3:]
    ea, eb = (load_model(runs / o / "ckpt-0000006" / "ema")[0].state_dict() for o in ("ema-a", "ema-b"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    raw = load_model(runs / "ema-a")[0].state_dict()
    assert any(not torch.equal(ea[k], raw[k]) for k in ea)
    if extra:
        assert (runs / "ema-a" / "ckpt-0000006" / "ema" / lora.ADAPTER_FILE).is_file()


def test_ema_bad_settings_are_one_line(runs, capsys):
    for flags, msg in ((dict(ema_decay=1.0), "--ema-decay must be in (0, 1)"),
                       (dict(ema_decay=0.9, checkpoint_format="sharded"), "single-file checkpoints only")):
        capsys.readouterr()
        assert main(align_argv(runs, "bad-ema", objective="reward", **flags)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err


def test_bench_align_select_chooses_on_the_dev_split_only(runs, capsys, tmp_path):
    """benchmarks/bench_align.py select: every checkpoint and its EMA is scored on the dev split; the pick is the best
    dev preference accuracy among those within (1 + tol) x the reference's dev chosen-answer loss (the rule written
    out here), and the same pick comes out with the held-out (val) files deleted: it never looks at the test pairs."""
    import shutil

    from benchmarks.bench_align import candidates, eval_pairs, select
    from benchmarks.bench_align import main as bench

    assert main(align_argv(runs, "dpo-sel", objective="dpo", ema_decay=0.6, max_steps=3, save_interval=1,
                           keep_last=0, lr=1e-2)) == 0
    _, tok, _ = load_model(runs / "sft")
    data = preference.dataset_dir(DataConfig(dataset=str(runs / "prefs.jsonl"), data_dir=str(runs / "data"),
                                             val_fraction=0.1), tok, 32)
    run = runs / "dpo-sel"
    cands = candidates(run)
    assert [str(c.relative_to(run)) for c in cands] == [f"ckpt-{s:07d}{e}" for s in (1, 2, 3) for e in ("", "/ema")]
    dev = [eval_pairs(c, data, split="dev") for c in cands]
    limit = 1.05 * eval_pairs(runs / "sft", data, split="dev")["chosen_nll"]
    ok = [i for i, m in enumerate(dev) if m["chosen_nll"] <= limit]
    want = cands[max(ok, key=lambda i: (dev[i]["pref_acc"], -i))] if ok else None
    best, rows = select(run, data, log=lambda _: None)
    assert best == want and [m for _, m in rows] == dev
    no_test = tmp_path / "no-test"
    shutil.copytree(data, no_test)
    for f in no_test.glob("val.*"):
        f.unlink()
    assert select(run, no_test, log=lambda _: None)[0] == want
    capsys.readouterr()
    bench(["select", "--run", str(run), "--data", str(data), "--tol", "100"])  # any loss allowed: best dev accuracy
    out = capsys.readouterr().out.splitlines()
    pick = cands[max(range(len(cands)), key=lambda i: (dev[i]["pref_acc"], -i))]
    assert out[-2] == f"selected on dev: {pick}"
    assert json.loads(out[-1]) == {"checkpoint": str(pick), "split": "val"} | eval_pairs(pick, data)
    with pytest.raises(SystemExit, match="^error: no checkpoint of .* keeps the dev chosen-answer loss"):
        bench(["select", "--run", str(run), "--data", str(data), "--tol", "-1"])


def test_bench_align_reward_ensemble_and_soup(runs, capsys):
    """benchmarks/bench_align.py eval --reward-ensemble: the ensemble ranks a pair by the mean of its members' scores
    (an ensemble of one is the model; each member's accuracy is eval_pairs'); --standardize divides each member's
    scores by their std on the dev pairs first; --soup is one model whose float tensors are the members' mean
    (a soup of one model is that model)."""
    from benchmarks.bench_align import eval_pairs, eval_reward_ensemble, reward_pairs, soup
    from benchmarks.bench_align import main as bench

    for seed in (1, 2):
        assert main(align_argv(runs, f"rm-ens{seed}", objective="reward", seed=seed, max_steps=4, lr=3e-3)) == 0
    a, b = runs / "rm-ens1", runs / "rm-ens2"
    _, tok, _ = load_model(runs / "sft")
    data = preference.dataset_dir(DataConfig(dataset=str(runs / "prefs.jsonl"), data_dir=str(runs / "data"),
                                             val_fraction=0.1), tok, 32)
    ma, mb = load_model(a)[0], load_model(b)[0]
    sa, sb = reward_pairs(ma, data), reward_pairs(mb, data)
    assert not torch.equal(sa, sb)  # two different models
    acc = lambda s: float((s[:, 0] > s[:, 1]).double().mean())  # noqa: E731
    single = eval_pairs(a, data)["reward_acc"]
    assert acc(sa) == single and eval_reward_ensemble([a], data)["reward_acc"] == single
    ens = eval_reward_ensemble([a, b], data)
    assert ens["members"] == [single, eval_pairs(b, data)["reward_acc"]]
    assert ens["reward_acc"] == acc((sa + sb) / 2) and ens["pairs"] == len(sa)
    da, db = reward_pairs(ma, data, "dev").std(), reward_pairs(mb, data, "dev").std()
    assert eval_reward_ensemble([a, b], data, standardize=True)["reward_acc"] == acc(sa / da + sb / db)
    ta, tb = ma.state_dict(), mb.state_dict()
    one = soup([a]).state_dict()
    assert all(torch.equal(one[k], ta[k]) for k in ta)
    two = soup([a, b]).state_dict()
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)
    for k, v in ta.items():
        assert torch.allclose(two[k], (v + tb[k]) / 2, rtol=0, atol=1e-7), k
    ma.load_state_dict({k: (v + tb[k]) / 2 for k, v in ta.items()})
    want = acc(reward_pairs(ma, data))
    assert eval_reward_ensemble([a, b], data, weights=True)["reward_acc"] == want
    capsys.readouterr()
    bench(["eval", "--reward-ensemble", str(a), str(b), "--data", str(data)])
    assert json.loads(capsys.readouterr().out) == ens
    with pytest.raises(SystemExit, match="^error: a checkpoint without a reward head"):
        eval_reward_ensemble([a, runs / "sft"], data)


def test_reward_ensemble_scores_and_rewards_grpo_with_the_mean(runs, capsys):
    """Several reward models as one: `llm score --checkpoint A --checkpoint B` prints the mean of the two models'
    scores, and GRPO with --reward-model A,B logs as its first step's mean reward the mean of the runs with A alone
    and B alone (the same sampled answers: same policy and seed)."""
    from llm.train.score import main as score_main

    for seed in (1, 2):
        assert main(align_argv(runs, f"rm-e{seed}", objective="reward", seed=seed, max_steps=3, lr=3e-3)) == 0
    a, b = str(runs / "rm-e1"), str(runs / "rm-e2")
    convo = [{"role": "user", "content": "Double 3."}, {"role": "assistant", "content": "7"}]
    (ma, tok, _), (mb, _, _) = load_model(a), load_model(b)
    sa, sb = score(ma, tok, convo), score(mb, tok, convo)
    assert sa != sb
    capsys.readouterr()
    assert score_main(["--checkpoint", a, "--checkpoint", b, "--prompt", "Double 3.", "--answer", "7", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)[0]["score"] - (sa + sb) / 2) < 1e-6
    assert score_main(["--checkpoint", a, "--checkpoint", str(runs / "sft"), "--prompt", "x", "--answer", "y"]) == 2
    assert "has no reward head" in capsys.readouterr().err
    grpo = dict(objective="grpo", dataset=runs / "sft.jsonl", grpo_group=3, grpo_max_new=4, batch_size=2, max_steps=1)
    reward = {}
    for name, rm in (("a", a), ("b", b), ("ab", f"{a},{b}")):
        assert main(align_argv(runs, f"grpo-ens-{name}", reward_model=rm, **grpo)) == 0
        reward[name] = [r for r in metrics_records(runs / f"grpo-ens-{name}") if "loss" in r][0]["grpo/reward"]
    assert reward["a"] != reward["b"]
    assert abs(reward["ab"] - (reward["a"] + reward["b"]) / 2) < 1e-5
