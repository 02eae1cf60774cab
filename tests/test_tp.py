"""Tensor parallelism (--tp, llm/train/tp.py) on CPU with gloo.

Fast: the wqkv row regrouping and its inverse, and the one-line refusals. Slow (torchrun launches): the
vocabulary-parallel cross-entropy (llm/vocab_parallel.py) equals F.cross_entropy forward and backward; the sharded
model computes the one-process loss and gradients with each rank holding half of every TP weight, the LM head's
vocabulary rows included, untied and tied (and, sequence parallel, half of the residual stream); TP=2 (2 ranks)
and TP=2 x FSDP2 over DP=2 (4 ranks), with and without --sequence-parallel, train with the one-process run's
losses; their single-file checkpoints (--checkpoint-format single) hold today's layout, load in one process and
resume at another TP degree (2 -> 1, 1 -> 2) with the same losses; their sharded ones (the default) resume at
TP 2, TP 1 and under FSDP2 without TP with the same losses, and consolidate to the single-file weights.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import metrics_records, run_two_ranks, step_losses, train_argv, write_code_corpus

from llm import checkpoint as ck
from llm import tp_layout
from llm.config import ConfigError, ModelConfig, TrainConfig
from llm.train import tp
from llm.train.cli import main

CFG = ModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32, kernels="torch")


def test_qkv_order_gives_each_rank_whole_heads_of_q_k_and_v():
    H, Hkv, D = CFG.n_head, CFG.n_kv_head, CFG.head_dim
    order = tp_layout.qkv_order(CFG, 2)
    assert sorted(order.tolist()) == list(range((H + 2 * Hkv) * D))
    head = (order.view(2, -1, D)[:, :, 0] // D).tolist()  # the original head row-block each rank's rows come from
    # rows [q heads 0-3; k heads 4-5; v heads 6-7] -> rank 0: q0 q1 k0 v0, rank 1: q2 q3 k1 v1
    assert head == [[0, 1, 4, 6], [2, 3, 5, 7]]
    w = torch.randn((H + 2 * Hkv) * D, CFG.n_embd)
    name = "blocks.1.attn.wqkv.weight"
    assert torch.equal(tp_layout.to_saved(name, tp_layout.to_live(name, w, CFG, 2), CFG, 2), w)
    assert tp_layout.to_live("blocks.1.attn.wo.weight", w, CFG, 2) is w and tp_layout.to_live(name, w, CFG, 1) is w


@pytest.mark.parametrize("world, kw, mkw, want", [
    (1, {}, {}, "needs a torchrun launch whose world size is a multiple of 2"),
    (4, {"tp": 4}, {}, "--tp 4 must divide the query heads (4) and the key/value heads (2)"),
    (2, {}, {"n_experts": 4}, "--tp does not shard Mixture-of-Experts layers"),
    (4, {}, {}, "needs --fsdp over the data-parallel dimension"),
    (2, {"compile": True}, {}, "--tp is not tested with --compile yet"),
    (1, {"tp": 1, "sequence_parallel": True}, {}, "--sequence-parallel splits the sequence over the TP ranks"),
    (2, {"sequence_parallel": True}, {"block_size": 33}, "--tp 2 must divide the context length (33)"),
    (2, {"sequence_parallel": True, "objective": "dpo"}, {}, "computes the cross-entropy objective only"),
    (2, {}, {"vocab_size": 301, "pad_vocab_multiple": 1}, "--tp 2 must divide the padded vocabulary (301"),
])
def test_tp_refusals_are_one_line(world, kw, mkw, want):
    t = replace(TrainConfig(), **({"tp": 2} | kw))
    with pytest.raises(ConfigError) as e:
        tp.check(replace(CFG, **mkw), t, world)
    assert want in str(e.value) and "\n" not in str(e.value)
    tp.check(CFG, replace(TrainConfig(), tp=2), 2)  # fine: 2 ranks, 4/2 heads
    tp.check(CFG, replace(TrainConfig(), tp=2, fsdp=True), 4)


SHARDED_BLOCK = """
import sys
from dataclasses import replace
import torch
from llm.config import ModelConfig
from llm.model import Transformer
import torch.distributed as dist
import torch.nn.functional as F
from llm import tp_layout
from llm.train import distributed as dd, tp
from llm.vocab_parallel import VocabSplit, vocab_parallel_cross_entropy

def check_vocab_parallel_ce(group):
    # llm/vocab_parallel.py, each rank half of a 70-row head, fp64, vs F.cross_entropy (+ z-loss) over the whole
    # head: loss, grad x, grad of the rank's head rows; ignored rows, the first / last vocabulary ids; replicated
    # rows (grad x all-reduced) and each rank's own rows (gathered, grad x reduce-scattered, a different upstream
    # gradient per rank); one chunk and several.
    r, W = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    N, C, V = 13, 24, 70  # V/W = 35 rows per rank; odd row counts
    x0, w0 = torch.randn(N * W, C, dtype=torch.float64), torch.randn(V, C, dtype=torch.float64)
    t = torch.randint(0, V, (N * W,))
    t[[1, 4, 5, 20]] = -100  # ignored rows, unevenly over the ranks' halves
    t[2], t[3] = 0, V - 1  # the first and last rows of the vocabulary
    g_up = torch.tensor([0.7, 1.3])
    for gather, z_loss, chunk in [(False, 0.0, None), (False, 1e-3, 5), (True, 0.0, 4), (True, 1e-3, None)]:
        rows = slice(r * N, (r + 1) * N) if gather else slice(None)
        x = x0[rows].clone().requires_grad_()
        w = w0.chunk(W)[r].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, w, t[rows], VocabSplit(group, gather), z_loss=z_loss,
                                            kernels="torch", chunk=chunk)
        g = g_up[r] if gather else g_up[1]  # replicated rows: every rank holds the same loss and gradient
        (loss * g).backward()
        xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        total = 0
        for s in range(W if gather else 1):
            rs = slice(s * N, (s + 1) * N) if gather else slice(None)
            z = xr[rs] @ wr.t()
            ce = F.cross_entropy(z, t[rs], ignore_index=-100)
            ce = ce + z_loss * (torch.logsumexp(z, -1)[t[rs] != -100] ** 2).mean()
            if s == r or not gather:
                want = ce.detach()
            total = total + ce * (g_up[s] if gather else g)
        total.backward()
        gw = wr.grad.chunk(W)[r]
        assert torch.allclose(loss, want, rtol=1e-10, atol=0), (loss.item(), want.item())
        gx = xr.grad[rows]
        assert torch.allclose(x.grad, gx, rtol=1e-9, atol=1e-12), (gather, (x.grad - gx).abs().max())
        assert torch.allclose(w.grad, gw, rtol=1e-9, atol=1e-12), (gather, (w.grad - gw).abs().max())
    # the Triton route (the fused CE kernels' lse and dz passes, interpreted: the launcher sets TRITON_INTERPRET=1)
    # equals the reference route, fp32, gathered rows and several chunks
    out = {}
    for kernels in ("torch", "triton"):
        x = x0[r * N:(r + 1) * N].float().requires_grad_()
        w = w0.chunk(W)[r].float().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, w, t[r * N:(r + 1) * N], VocabSplit(group, True), z_loss=1e-3,
                                            kernels=kernels, chunk=4)
        (loss * g_up[r]).backward()
        out[kernels] = (loss.detach(), x.grad, w.grad)
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
    print("vocab-parallel ce ok")


sp = sys.argv[1] == "sp"
d = dd.setup("cpu", 2, sp)
check_vocab_parallel_ce(dist.new_group([0, 1]))
base = ModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32, kernels="torch")
for cfg in (base, replace(base, tie_embeddings=True)):
    torch.manual_seed(0)
    ref = Transformer(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg)
    dd.wrap(model, d, False, False, False, split_head=True)
    a = model.blocks[0].attn
    assert a.wqkv.weight.to_local().shape == (32, 32) and a.wo.weight.to_local().shape == (32, 16), "not sharded"
    assert model.blocks[1].mlp.w2.weight.to_local().shape == (32, 64) and a.n_head == 2 and a.n_kv_head == 1
    V2 = cfg.padded_vocab_size // 2
    assert model.tok_emb.weight.to_local().shape == (V2, 32)  # vocabulary rows split
    assert model.lm_head.weight.to_local().shape == (V2, 32)  # the head too: loss parallel
    assert (model.lm_head.weight is model.tok_emb.weight) == cfg.tie_embeddings
    rows = []
    model.blocks[1].norm1.register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    idx, tgt = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    tgt[0, 3:12] = -100  # ignored targets, unevenly over the two halves of the sequence
    _, l0 = ref(idx, tgt, z_loss=1e-3)
    _, l1 = model(idx, tgt, z_loss=1e-3)
    assert rows == [8 if sp else 16], rows  # sequence parallel: the residual stream holds this rank's half
    l0.backward()
    l1.backward()
    tp.reshard_grads(model)
    if sp:  # each rank's loss is its part of the mean; the replicated weights' gradients are partial
        l1 = l1.detach().clone()
        torch.distributed.all_reduce(l1)
        tp.sync_replicated_grads(model, d.tp_group)
    assert abs(l0.item() - l1.item()) <= 1e-6 * abs(l0.item()), (l0.item(), l1.item())
    for (n, p0), p1 in zip(ref.named_parameters(), model.parameters()):
        g1 = p1.grad.full_tensor() if hasattr(p1.grad, "full_tensor") else p1.grad
        g1 = tp_layout.to_saved(n, g1, cfg, 2)
        assert (g1 - p0.grad).abs().max() <= 1e-5 * p0.grad.abs().max(), n
    model.eval()
    with torch.no_grad():  # the logits path of the split head gathers the vocabulary (and under SP the rows)
        logits, _ = model(idx)
        assert (logits - ref.eval()(idx)[0]).abs().max() <= 1e-5, "logits"
print("sharded block ok")
dd.cleanup()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tp", "sp"])
def test_sharded_blocks_compute_the_one_process_loss_and_gradients(tmp_path, mode):
    """The vocabulary-parallel cross-entropy against F.cross_entropy (check_vocab_parallel_ce), then the sharded
    model, untied and tied, against the unsharded one: local shapes, loss (z-loss on), every gradient, logits."""
    script = tmp_path / "sharded_block.py"
    script.write_text(SHARDED_BLOCK)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), mode], cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("sharded block ok") == 2, r.stderr[-3000:]
    assert r.stdout.count("vocab-parallel ce ok") == 2


def args(tmp: Path, out: str, *extra, **kw) -> list[str]:
    """2 layers, 4 query / 2 kv heads, micro-batch 2, 8 sequences per step, a checkpoint at step 3 of 6."""
    kw = dict(n_layer=2, n_head=4, n_kv_head=2, global_batch_tokens=256, batch_size=2, save_interval=3,
              eval_interval=3, health_interval=3) | kw
    return [str(a) for a in train_argv(tmp, out, **kw)] + list(extra)


def close(a: dict, b: dict, steps) -> bool:
    """Equal losses within 1e-5 relative (row-parallel layers sum their partial products in another order)."""
    return all(abs(a[s] - b[s]) <= 1e-5 * abs(b[s]) for s in steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    write_code_corpus(tmp)
    assert main(args(tmp, "one")) == 0  # the one-process reference: 6 steps
    assert main(args(tmp, "one_muon", optimizer="muon")) == 0
    assert main(args(tmp, "one_tied", "--tie-embeddings")) == 0
    one3 = str(tmp / "one" / "ckpt-0000003")
    out2 = run_two_ranks(tmp, [(args(tmp, "tp2", "--tp", "2", "--checkpoint-format", "single"), -1),
                               (args(tmp, "one_to_tp2", "--tp", "2", "--resume", one3), -1),
                               (args(tmp, "tp2sp", "--tp", "2", "--sequence-parallel"), -1),
                               (args(tmp, "tp2muon", "--tp", "2", "--sequence-parallel", optimizer="muon"), -1),
                               (args(tmp, "tp2sp_tied", "--tp", "2", "--sequence-parallel", "--tie-embeddings"), -1),
                               # sharded (DCP) checkpoints of TP runs: async + SP, resumed at the same degree
                               (args(tmp, "tp2s", "--tp", "2", "--sequence-parallel", "--async-checkpoint"), -1),
                               (args(tmp, "tp2s_to_tp2", "--tp", "2", "--checkpoint-format", "sharded", "--resume",
                                     tmp / "tp2s" / "ckpt-0000003"), -1)]
                         ).stdout
    out4 = run_two_ranks(tmp, [(args(tmp, "dp2tp2", "--tp", "2", "--fsdp", "--checkpoint-format", "single"), -1),
                               (args(tmp, "dp2tp2sp", "--tp", "2", "--fsdp", "--sequence-parallel"), -1),
                               (args(tmp, "dp2tp2s", "--tp", "2", "--fsdp"), -1),  # sharded: the default
                               (args(tmp, "dp2tp2s_to_fsdp4", "--fsdp", "--resume", tmp / "dp2tp2s" / "ckpt-0000003"),
                                -1)],
                         nproc=4).stdout
    assert main(args(tmp, "tp2_to_one", "--resume", str(tmp / "tp2" / "ckpt-0000003"))) == 0
    assert main(args(tmp, "tp2s_to_one", "--resume", str(tmp / "tp2s" / "ckpt-0000003"))) == 0
    return tmp, out2, out4


@pytest.mark.slow
def test_tp_and_dp_x_tp_with_and_without_sequence_parallelism_train_with_the_one_process_losses(runs):
    tmp, out2, out4 = runs
    assert "tensor parallel 2 x 1 data-parallel" in out2 and "FSDP2, tensor parallel 2 x 2 data-parallel" in out4
    ref = step_losses(tmp / "one")
    assert len(ref) == 6
    assert "tensor parallel 2 x 1 data-parallel, sequence parallel" in out2
    assert "FSDP2, tensor parallel 2 x 2 data-parallel, sequence parallel" in out4
    devices = [line for line in (out2 + out4).splitlines() if line.startswith("device:") and "tensor parallel" in line]
    assert len(devices) == 10 and all("loss parallel" in line for line in devices)  # the head split by vocabulary
    for run in ("tp2", "dp2tp2", "tp2sp", "dp2tp2sp"):
        assert close(step_losses(tmp / run), ref, range(1, 7)), run
    # the health records count every element once: TP shards summed over the group, replicated weights once
    health = [{k: v for k, v in r.items() if "grad_rms" in k or "update_ratio" in k}
              for r in metrics_records(tmp / "one") if "health/grad_rms/0" in r]
    assert len(health) == 2
    for run in ("tp2", "dp2tp2sp"):
        got = [r for r in metrics_records(tmp / run) if "health/grad_rms/0" in r]
        assert len(got) == 2 and all(abs(g[k] - h[k]) <= 1e-4 * abs(h[k]) for g, h in zip(got, health) for k in h)
    # Muon orthogonalises the gathered momentum: the regrouped wqkv rows permute it, which commutes with Newton-Schulz
    assert close(step_losses(tmp / "tp2muon"), step_losses(tmp / "one_muon"), range(1, 7))
    # a tied embedding is the split head's Shard(0) parameter: looked up row-wise, read by the vocab-parallel loss
    assert close(step_losses(tmp / "tp2sp_tied"), step_losses(tmp / "one_tied"), range(1, 7))


@pytest.mark.slow
def test_tp_checkpoints_hold_the_one_process_layout_and_resume_at_another_tp_degree(runs):
    tmp, out2, _ = runs
    ref = step_losses(tmp / "one")
    assert "resume: tensor parallel 1 -> 2" in out2
    assert close(step_losses(tmp / "one_to_tp2"), ref, [4, 5, 6])  # 1 -> 2
    assert close(step_losses(tmp / "tp2_to_one"), ref, [4, 5, 6])  # 2 -> 1
    for run in ("tp2", "dp2tp2"):
        src = tmp / run / "ckpt-0000003"
        assert not ck.is_sharded(src)  # a single file, loadable by every tool as it is
        one, _, _ = ck.load_checkpoint(tmp / "one" / "ckpt-0000003")
        got, _, _ = ck.load_checkpoint(src)
        a, b = one.state_dict(), got.state_dict()
        assert a.keys() == b.keys() and b["lm_head.weight"].shape == (320, 32)  # the split head saved whole
        for k in a:  # wqkv back in [q; k; v] order: equal to the one-process weights up to summation order
            assert (a[k] - b[k]).abs().max() <= 1e-4 * a[k].abs().max() + 1e-7, k


@pytest.mark.slow
def test_sharded_tp_checkpoints_reshard_to_any_tp_degree_and_consolidate(runs, tmp_path):
    """Sharded checkpoints under --tp (the default under torchrun, and --async-checkpoint): every rank writes its own
    shards (wqkv rows as regrouped for the saving degree, config.json says it); resumed at the same degree (DCP
    straight into the shards), at TP 1 in one process and under FSDP2 over 4 ranks (wqkv regrouped on the way in)
    with the one-process losses; consolidated / read directly, it holds the single-file TP checkpoint's weights
    exactly (the same run with --checkpoint-format single)."""
    tmp, out2, out4 = runs
    ref = step_losses(tmp / "one")
    for run in ("tp2s", "dp2tp2s"):
        src = tmp / run / "ckpt-0000003"
        assert ck.is_sharded(src) and ck.read_config(src)["sharded"]["tp"] == 2
        assert close(step_losses(tmp / run), ref, range(1, 7)), run
    assert "async sharded checkpoints" in out2 and "resume: tensor parallel 2 -> 1 (sharded" in out4
    for run in ("tp2s_to_tp2", "tp2s_to_one", "dp2tp2s_to_fsdp4"):
        assert close(step_losses(tmp / run), ref, [4, 5, 6]), run
    single, _, _ = ck.load_checkpoint(tmp / "dp2tp2" / "ckpt-0000003")  # the same run, saved gathered
    direct, _, _ = ck.load_checkpoint(tmp / "dp2tp2s" / "ckpt-0000003")
    merged, _, _ = ck.load_checkpoint(ck.consolidate(tmp / "dp2tp2s" / "ckpt-0000003", tmp_path / "merged"))
    a = single.state_dict()
    for b in (direct.state_dict(), merged.state_dict()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
