"""The whole model with kernels='triton' matches kernels='torch': loss, every gradient, cached decoding.

On CPU the kernels run through TRITON_INTERPRET=1 in fp32; on CUDA the same check runs in bf16 against
the FlashAttention-style bound (error of the triton path vs fp32 <= 2x the error of the torch path + floor).
"""

import pytest
import torch
from conftest import DEVICE, assert_fa_rule, requires_cuda, tiny_model

from llm.generate import generate
from llm.model import Transformer


def build(kernels: str, dtype=torch.float32, **kw) -> Transformer:
    return tiny_model(**(dict(vocab_size=70, block_size=24, kernels=kernels) | kw)).to(DEVICE, dtype)


def loss_and_grads(model: Transformer, x, y):
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True, qk_norm=True)], ids=["llama", "tied-qknorm"])
def test_triton_model_matches_torch_loss_and_every_gradient(kw):
    torch.manual_seed(1)
    x = torch.randint(0, 70, (2, 9), device=DEVICE)
    y = torch.randint(0, 70, (2, 9), device=DEVICE)
    l_ref, g_ref = loss_and_grads(build("torch", **kw), x, y)
    l_tri, g_tri = loss_and_grads(build("triton", **kw), x, y)
    torch.testing.assert_close(l_tri, l_ref, atol=1e-5, rtol=1e-5)
    assert g_ref.keys() == g_tri.keys()
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_triton_cached_generation_matches_torch():
    prompt = torch.randint(0, 70, (2, 5), device=DEVICE)
    with torch.no_grad():
        ref = generate(build("torch").eval(), prompt, 12, temperature=0)
        tri = generate(build("triton").eval(), prompt, 12, temperature=0)
    assert torch.equal(ref, tri)


@requires_cuda
def test_triton_model_bf16_within_fa_rule():
    torch.manual_seed(1)
    x = torch.randint(0, 70, (4, 24), device="cuda")
    y = torch.randint(0, 70, (4, 24), device="cuda")
    l_hp, g_hp = loss_and_grads(build("torch"), x, y)
    l_lp, g_lp = loss_and_grads(build("torch", torch.bfloat16), x, y)
    l_tr, g_tr = loss_and_grads(build("triton", torch.bfloat16), x, y)
    assert_fa_rule(l_tr.float()[None], l_lp.float()[None], l_hp[None], "loss")
    for name in g_hp:
        assert_fa_rule(g_tr[name], g_lp[name], g_hp[name], name)
