"""The MoE layer in the model: router, balancing (aux loss, aux-loss-free bias), shared experts,
checkpoints, cached generation, and the grouped kernel inside a model."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import cached_and_uncached, tiny_config

from llm import checkpoint as ck
from llm import ops
from llm.config import ConfigError, ModelConfig
from llm.layers import MLP
from llm.model import Transformer
from llm.moe import MoE
from llm.tokenizer import Tokenizer


def cfg(**kw) -> ModelConfig:
    return tiny_config(**(dict(n_experts=4, top_k=2, expert_hidden=48) | kw))


def layer(**kw) -> MoE:
    torch.manual_seed(0)
    return Transformer(cfg(**kw)).blocks[0].mlp


@pytest.mark.parametrize("kw,msg", [
    (dict(top_k=5), r"top_k \(5\) must be between 1 and n_experts \(4\)"),
    (dict(top_k=0), r"top_k \(0\) must be between 1"),
    (dict(first_dense_layers=3), r"first_dense_layers \(3\) must be in \[0, n_layer=2\]"),
    (dict(mlp="gelu"), "MoE experts are SwiGLU"),
    (dict(aux_coef=-1.0), "aux_coef must be >= 0"),
    (dict(route_scale=0.0), "route_scale must be > 0"),
    (dict(score_func="relu"), "score_func must be one of"),
], ids=["topk-high", "topk-zero", "dense-layers", "gelu", "aux-coef", "route-scale", "score"])
def test_invalid_moe_config_gives_one_clear_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(**kw)


def test_layout_first_dense_layers_shared_experts_and_active_params():
    model = Transformer(cfg(n_layer=3, first_dense_layers=1, n_shared_experts=2))
    assert isinstance(model.blocks[0].mlp, MLP) and isinstance(model.blocks[2].mlp, MoE)
    moe = model.blocks[1].mlp
    assert moe.experts.w_gate.shape == (4, 48, 32) and moe.experts.w_down.shape == (4, 32, 48)
    assert moe.router.weight.shape == (4, 32) and moe.shared.w1.weight.shape == (96, 32)
    inactive = 2 * (4 - 2) * 3 * 48 * 32  # two MoE layers, two idle experts each
    assert model.num_active_params() == model.num_params() - inactive


def test_one_expert_top1_equals_dense_swiglu_mlp():
    moe = layer(n_experts=1, top_k=1, expert_hidden=64).eval()
    mlp = MLP(cfg(), hidden=64).eval()
    with torch.no_grad():
        mlp.w1.weight.copy_(moe.experts.w_gate[0])
        mlp.w3.weight.copy_(moe.experts.w_up[0])
        mlp.w2.weight.copy_(moe.experts.w_down[0])
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x), mlp(x), atol=1e-6, rtol=1e-5)


def test_router_gets_gradient_and_aux_loss_is_in_the_total():
    torch.manual_seed(0)
    model = Transformer(cfg(aux_coef=0.1, z_coef=0.01)).train()
    idx = torch.randint(0, 101, (2, 17))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    aux = model.aux_loss()
    assert aux.item() > 0.1  # balance term >= 1 at coefficient 0.1, plus the z-loss
    logits, _ = model(idx[:, :-1])  # same weights, same routing
    ce = ops.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), kernels="torch")
    torch.testing.assert_close(loss, ce + aux, atol=1e-5, rtol=1e-5)
    loss.backward()
    for b in model.blocks:
        assert b.mlp.router.weight.grad.abs().sum() > 0
    model.eval()
    _, val = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(val, ce, atol=1e-5, rtol=1e-5)  # evaluation losses are pure cross-entropy


def test_router_gets_gradient_from_the_lm_loss_alone():
    torch.manual_seed(0)
    model = Transformer(cfg(aux_coef=0.0, z_coef=0.0, balance="none"))
    idx = torch.randint(0, 101, (2, 17))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert model.aux_loss().item() == 0.0
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # through the gates


def test_uniform_routing_gives_the_known_aux_value():
    E = 4
    moe = layer(aux_coef=0.5, z_coef=0.25).train()
    with torch.no_grad():
        moe.router.weight.zero_()  # every token: p_e = 1/E  ->  L_bal = E * sum_e f_e / E = 1
    moe(torch.randn(2, 9, 32))
    stats = moe.load_stats()
    assert stats["balance_loss"] == pytest.approx(1.0, abs=1e-6)
    assert stats["z_loss"] == pytest.approx(math.log(E) ** 2, rel=1e-6)  # logsumexp of E zeros = log E
    assert moe.aux_loss.item() == pytest.approx(0.5 + 0.25 * math.log(E) ** 2, rel=1e-6)


def test_collapsed_routing_gives_aux_value_near_n_experts_and_high_load_stats():
    E = 4
    moe = layer(top_k=1, aux_coef=1.0, z_coef=0.0).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
    moe(torch.rand(2, 9, 32) + 1.0)  # logit of expert 2 is sum(x) > 32: every token picks it
    stats = moe.load_stats()
    assert stats["balance_loss"] == pytest.approx(E, rel=1e-6)
    assert stats["max_over_mean"] == pytest.approx(E)  # 18 tokens on one expert, mean 4.5
    assert stats["cv"] == pytest.approx(math.sqrt(3))  # counts (0, 0, 18, 0): std / mean = sqrt(3)


def test_ties_go_to_the_lower_expert_id():
    moe = layer(n_experts=6, top_k=3)
    with torch.no_grad():
        moe.router.weight.zero_()
    r = moe.router(torch.randn(5, 32))
    assert torch.equal(r.idx, torch.tensor([[0, 1, 2]]).repeat(5, 1))
    torch.testing.assert_close(r.weight, torch.full((5, 3), 1 / 3))


def test_bias_balancing_lowers_an_overloaded_experts_bias_and_changes_selection_not_gates():
    moe = layer(balance="bias", bias_rate=0.5, norm_topk=False, top_k=2).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 0.05  # expert 0 ahead for every (positive) token, then 1 (ties: lower id)
    x = torch.rand(3, 8, 32) + 0.5
    before = moe.router(x.reshape(-1, 32))
    assert (before.idx[:, 0] == 0).all()
    moe(x)
    moe.after_step()
    bias = moe.router.expert_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, torch.tensor([-0.5, -0.5, 0.5, 0.5]))  # counts (24, 24, 0, 0), mean 12
    after = moe.router(x.reshape(-1, 32))
    assert (after.idx >= 2).all()  # selection moved off the overloaded experts
    scores = after.logits.softmax(-1)
    torch.testing.assert_close(after.weight, scores.gather(-1, after.idx))  # gates: scores without the bias


def test_router_bias_round_trips_through_a_checkpoint_and_stays_fp32(tmp_path):
    tok = Tokenizer.train(["hello world, hello there " * 20], 300)
    torch.manual_seed(0)
    model = Transformer(cfg(vocab_size=300, balance="bias"))
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            b.mlp.router.expert_bias.copy_(torch.tensor([0.001, -0.002, 0.0031, -0.0007]) * (i + 1))
    ck.save(tmp_path, "ckpt-1", model.eval(), tok)
    loaded, _, _ = ck.load_checkpoint(tmp_path, dtype=torch.bfloat16)
    for a, b in zip(model.blocks, loaded.blocks):
        assert b.mlp.router.expert_bias.dtype == torch.float32
        assert torch.equal(a.mlp.router.expert_bias, b.mlp.router.expert_bias)
    assert loaded.blocks[0].mlp.experts.w_gate.dtype == torch.bfloat16
    loaded32, _, _ = ck.load_checkpoint(tmp_path)
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(idx)[0], loaded32(idx)[0])


def test_routing_of_a_token_does_not_depend_on_the_rest_of_the_batch():
    moe = layer(n_experts=8, top_k=2, n_shared_experts=1).eval()
    x = torch.randn(4, 11, 32)
    full_r = moe.router(x.reshape(-1, 32))
    part_r = moe.router(x[1:2, 3:9].reshape(-1, 32))
    rows = torch.arange(14, 20)  # the same tokens' rows (1 * 11 + 3 ... 1 * 11 + 8) in the full batch
    assert torch.equal(full_r.idx[rows], part_r.idx)
    torch.testing.assert_close(full_r.weight[rows], part_r.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe(x)[1:2, 3:9], moe(x[1:2, 3:9]), atol=1e-6, rtol=1e-6)


def test_cached_generation_with_an_moe_model_equals_uncached():
    torch.manual_seed(0)
    model = Transformer(cfg(block_size=96, n_shared_experts=1, score_func="sigmoid", balance="bias")).eval()
    prompt = torch.randint(0, 101, (2, 5))
    _, cached, full = cached_and_uncached(model, prompt, 40)
    torch.testing.assert_close(cached[:, :-1], full[:, :-1], atol=1e-5, rtol=1e-5)


def test_grouped_kernel_model_matches_loop_model_loss_and_every_gradient():
    # kernels='triton' runs every op, the grouped experts among them, as Triton kernels (through
    # TRITON_INTERPRET=1 here); kernels='torch' runs the references, the experts as a loop.
    def run(kernels):
        torch.manual_seed(0)
        model = Transformer(cfg(n_layer=1, kernels=kernels, n_shared_experts=1, n_experts=8))
        idx = torch.randint(0, 101, (2, 13))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    l_loop, g_loop = run("torch")
    l_grp, g_grp = run("triton")
    torch.testing.assert_close(l_grp, l_loop, atol=1e-5, rtol=1e-5)
    for name in g_loop:
        torch.testing.assert_close(g_grp[name], g_loop[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _dp_worker(rank: int, port: int, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        moe = layer(balance="bias", bias_rate=0.01, top_k=1).train()
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[rank] = 1.0  # rank 0 routes everything to expert 0, rank 1 to expert 1
        moe(torch.rand(1, 10, 32) + 1.0)
        moe.after_step()
        out[rank] = moe.router.expert_bias.clone()
    finally:
        torch.distributed.destroy_process_group()


def test_bias_update_sums_token_counts_over_data_parallel_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_dp_worker, args=(port, out), nprocs=2)
    # Summed counts (10, 10, 0, 0), mean 5: experts 0 and 1 overloaded on *both* ranks.
    for rank in (0, 1):
        torch.testing.assert_close(out[rank], torch.tensor([-0.01, -0.01, 0.01, 0.01]))
