"""Muon (llm/train/muon.py): Newton-Schulz orthogonality, the parameter split, per-expert updates, exact resume
(RELIABILITY.md promise 21) and 2-process DDP / FSDP2 equal to one process."""

import json

import pytest
import torch
from conftest import run_two_ranks, step_losses, tiny_model, train_argv

from llm import checkpoint as ck
from llm.config import TrainConfig
from llm.train.cli import main
from llm.train.muon import NS_BAND, Muon, muon_groups, newton_schulz
from llm.train.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _spectrum(m: int, n: int, lo: float) -> torch.Tensor:
    """An (m, n) matrix with singular values log-spaced in [lo, 1]."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))
    return ((U * torch.logspace(lo, 0, k, dtype=torch.float64)) @ V.T).float()


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (1, 7), (4, 48, 16), (256, 160)],
                         ids=["wide", "tall", "row", "experts", "large"])
def test_newton_schulz_output_is_near_orthogonal(shape):
    """Full-rank random inputs: every singular value of NS5's output lies in the documented band."""
    G = torch.randn(*shape) * 3.0
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O.double())
    assert NS_BAND[0] <= s.min() and s.max() <= NS_BAND[1], (s.min().item(), s.max().item())


def test_newton_schulz_flattens_an_ill_conditioned_spectrum():
    """Singular values spanning 100x map into the band (orthogonalisation, not just normalisation)."""
    s = torch.linalg.svdvals(newton_schulz(_spectrum(128, 64, -2)).double())
    assert NS_BAND[0] <= s.min() and s.max() <= NS_BAND[1], (s.min().item(), s.max().item())


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model(n_experts=4, top_k=2, expert_hidden=16)
    groups = muon_groups(model, 0.1, 10.0)
    muon = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {f"blocks.{i}.{w}" for i in range(2) for w in
                     ("attn.wqkv.weight", "attn.wo.weight", "mlp.experts.w_gate", "mlp.experts.w_up",
                      "mlp.experts.w_down")}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert groups[1]["weight_decay"] == 0.1 and all(p.dim() < 2 for p in groups[2]["params"])


def test_expert_weights_are_orthogonalised_per_expert():
    w = torch.nn.Parameter(torch.randn(3, 16, 8))
    w.grad = torch.randn(3, 16, 8)
    before = w.detach().clone()
    Muon([{"params": [w], "kind": "muon"}], lr=0.1, momentum=0.0).step()
    for e in range(3):  # each expert's update is its own gradient's orthogonalisation, scaled for (16, 8)
        want = before[e] - 0.1 * 2 ** 0.5 * newton_schulz(w.grad[e])
        torch.testing.assert_close(w[e].detach(), want, atol=1e-6, rtol=1e-6)


def test_make_optimizer_scales_the_muon_group_learning_rate():
    opt = make_optimizer(tiny_model(), TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr_mult"] == pytest.approx(20.0)


losses = step_losses


@pytest.fixture(scope="module")
def tmp(corpus_tmp):
    return corpus_tmp


def test_muon_resume_is_bit_exact(tmp):
    """Promise 21: 4 Muon steps + stop + resume 4 == 8 straight steps, bitwise; the momentum is in the checkpoint."""
    args = dict(max_steps=8, optimizer="muon", dropout=0.1)
    assert main(train_argv(tmp, "straight", **args)) == 0
    assert main(train_argv(tmp, "stopped", **args), callbacks=[lambda step, rec: step == 4]) == 0
    assert ck.resolve(tmp / "stopped").name == "ckpt-0000004"
    osd = ck.read_optimizer_state(ck.resolve(tmp / "stopped"))
    assert any("momentum_buffer" in st for st in osd["state"].values())
    assert main(train_argv(tmp, "stopped", **args) + ["--resume"]) == 0
    want, got = losses(tmp / "straight"), losses(tmp / "stopped")
    assert sorted(got) == list(range(1, 9)) and got == want
    a, _ = ck.read_tensors(tmp / "straight" / "ckpt-0000008" / ck.MODEL_FILE)
    b, _ = ck.read_tensors(tmp / "stopped" / "ckpt-0000008" / ck.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)




@pytest.mark.slow
def test_muon_two_processes_equal_one_process_ddp_and_fsdp(tmp):
    """2 ranks (gloo) x 1 micro-batch == 1 rank x 2 micro-batches: DDP bitwise; FSDP2 (gathered momentum,
    sharded update) within float rounding, through a stop at step 3 and a resume; the health telemetry agrees."""
    def args(out, *extra):
        argv = train_argv(tmp, out, n_layer=2, global_batch_tokens=256, optimizer="muon", health_interval=2)
        return [str(a) for a in argv] + list(extra)

    assert main(args("one")) == 0
    jobs = [(args("ddp"), -1), (args("fsdp", "--fsdp"), 3), (args("fsdp", "--fsdp", "--resume"), -1)]
    r = run_two_ranks(tmp, jobs)
    ref, ddp, fsdp = losses(tmp / "one"), losses(tmp / "ddp"), losses(tmp / "fsdp")
    assert sorted(ddp) == list(range(1, 7)) and all(ddp[s] == ref[s] for s in ref), (ddp, ref)
    assert sorted(fsdp) == list(range(1, 7)) and "resumed from" in r.stdout
    assert all(abs(fsdp[s] - ref[s]) <= 1e-5 * abs(ref[s]) for s in ref), (fsdp, ref)
    # the health telemetry (every 2 steps) runs under both wrappers and agrees with one process
    health = [{k: v for k, v in json.loads(line).items() if k.startswith("health/")}
              for name in ("one", "ddp", "fsdp") for line in (tmp / name / "metrics.jsonl").read_text().splitlines()
              if '"step": 4,' in line and "health/" in line]
    assert len(health) == 3 and len(health[0]) == 2 * 4 + 3 * 2 + 1  # (grad, update) x 4 layers, 3 x 2 blocks, logits
    for got in health[1:]:
        assert got.keys() == health[0].keys()
        assert all(abs(got[k] - health[0][k]) <= 1e-4 * abs(health[0][k]) + 1e-7 for k in got), (got, health[0])
