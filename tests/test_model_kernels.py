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


def test_fp32_attention_and_decode_take_the_reference_on_gpus(monkeypatch):
    """fp32 attention/decode tiles spill registers on GPUs, so llm.ops picks the reference for fp32 CUDA
    tensors with kernels='auto' and the launchers refuse fp32 outside the interpreter, naming the dtype."""
    from kernels.common import check_gpu_dtype
    from llm import ops

    assert ops.resolve("auto", "cuda", dtype_ok=False) is False
    assert ops.resolve("auto", "cuda") is ops.triton_available()
    assert ops.resolve("torch", "cuda") is False
    assert ops.resolve("triton", "cuda", dtype_ok=False) is False
    x = torch.randn(2)
    assert ops._kernel_dtype_ok(x) and ops._kernel_dtype_ok(x.half())  # CPU: the interpreter or the reference
    gpu = (torch.float16, torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="fp32 on a GPU"):
        check_gpu_dtype("attention", x, gpu)
    check_gpu_dtype("attention", x.bfloat16(), gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_gpu_dtype("attention", x, gpu)  # the interpreter runs fp32 through the kernels (CPU tests)


@requires_cuda
def test_fp32_cuda_attention_and_decode_equal_the_reference():
    from kernels.attention import attention as attention_kernel
    from kernels.reference import attention_ref, decode_attention_ref
    from llm import ops

    q, k, v = (torch.randn(2, 5, 4, 32, device="cuda") for _ in range(3))
    assert not ops._kernel_dtype_ok(q)
    torch.testing.assert_close(ops.attention(q, k, v), attention_ref(q, k, v), rtol=0, atol=0)
    lengths = torch.tensor([5, 3], device="cuda")
    torch.testing.assert_close(ops.decode_attention(q[:, :1], k, v, lengths),
                               decode_attention_ref(q[:, :1], k, v, lengths), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fp32 on a GPU"):
        attention_kernel(q, k, v)
