"""kernels/attention.py against kernels/reference.attention_ref: output, dq, dk and dv.

fp32 kernels are compared with the fp32 tolerance against the reference in fp32; fp16 (CPU and CUDA)
and bf16 (CUDA only: bf16 tl.dot is wrong under the interpreter) with the FlashAttention rule: the error
against the fp32 reference may be at most twice that of the same attention run in the low precision.

The low-precision baseline is `_attention_lowp` below (matmuls in the input dtype, softmax in fp32 rounded
back), the baseline FlashAttention's own tests use, not `attention_ref` on low-precision inputs: that one
upcasts everything and rounds only its final result, and no FlashAttention-2 backward can stay within 2x
of a single rounding. Its delta = rowsum(dO * O) reads the stored low-precision O (the fp32 O is gone), an
error of about |dO| * ulp(O) * sqrt(D) per row that reaches dq and dk; in fp16 this alone measured up to
1.2x the allowed bound for dk on a 17-token GQA case (checked by emulating the algorithm in PyTorch). The
math itself is pinned by the fp32 cases, which share every line of kernel code with fp16/bf16.
Shapes cover every supported head dim (32, 64, 80, 96, 128, 256), T in {1, 17, 63, 128, 257}, MHA /
GQA 4:1 / MQA, causal or not, T != S (prefill after a cache, and T > S where some queries see no key),
sliding windows, batch 1 and 2, custom scale and strided (non-contiguous) inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule, requires_cuda, skip_fp32_kernel_on_cuda

from kernels.attention import attention
from kernels.reference import attention_ref

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, T, S, H, Hkv, D, causal, window, scale, dtype)
CASES = [
    pytest.param(2, 1, 1, 2, 2, 64, True, None, None, FP32, id="t1-mha-d64-b2"),
    pytest.param(1, 1, 40, 4, 1, 32, True, None, None, FP16, id="t1-s40-mqa-d32-fp16"),
    pytest.param(1, 17, 17, 8, 2, 80, True, None, None, FP16, id="t17-gqa4-d80-fp16"),
    pytest.param(2, 63, 63, 4, 1, 96, False, None, None, FP32, id="t63-mqa-d96-full-b2"),
    pytest.param(1, 128, 128, 4, 1, 128, True, 37, None, FP16, id="t128-gqa4-d128-window-fp16"),
    pytest.param(1, 257, 257, 1, 1, 32, True, None, 0.3, FP32, id="t257-d32-scale"),
    pytest.param(1, 257, 257, 2, 1, 64, True, None, None, FP16, id="t257-mqa-d64-fp16"),
    pytest.param(2, 17, 63, 4, 2, 64, True, None, None, FP16, id="prefill-t17-s63-gqa-fp16"),
    pytest.param(1, 20, 9, 2, 1, 32, True, None, None, FP32, id="t20-s9-empty-rows"),
    pytest.param(1, 63, 40, 2, 2, 32, False, 11, None, FP16, id="window-noncausal-t63-s40-fp16"),
    pytest.param(1, 33, 33, 2, 1, 64, True, 1, None, FP32, id="window1-self-only"),
    pytest.param(1, 33, 33, 2, 1, 256, True, None, None, FP16, id="t33-d256-fp16"),
    pytest.param(1, 17, 17, 1, 1, 256, False, 5, 0.05, FP32, id="t17-d256-window-noncausal"),
]


def _attention_lowp(q, k, v, causal: bool = True, scale: float | None = None, window: int | None = None):
    """attention_ref's semantics computed in q's dtype: QK^T and PV in that dtype, softmax in fp32."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qt = q.transpose(1, 2)  # (B, H, T, D)
    kt = k.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)  # (B, H, S, D); grads sum over the group
    vt = v.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    qpos = torch.arange(T, device=q.device)[:, None] + (S - T)
    kpos = torch.arange(S, device=q.device)[None, :]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        mask &= kpos <= qpos
    if window is not None:
        mask &= (qpos - kpos) < window
    s = (qt @ kt.transpose(-1, -2)) * scale
    # A finite fill keeps rows without keys NaN-free; multiplying by any() zeroes them like the reference.
    p = torch.softmax(s.float().masked_fill(~mask, -1e30), dim=-1) * mask.any(-1, keepdim=True)
    return (p.to(q.dtype) @ vt).transpose(1, 2)


def _inputs(B: int, T: int, S: int, H: int, Hkv: int, D: int, dtype: torch.dtype, seed: int):
    skip_fp32_kernel_on_cuda(dtype)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, S, Hkv, D, generator=gen)
    v = torch.randn(B, S, Hkv, D, generator=gen)
    do = torch.randn(B, T, H, D, generator=gen)
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v, do)]


def _run(fn, q, k, v, do, **kw) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of fn on fresh leaves, with upstream gradient do."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, **kw)
    return [out, *torch.autograd.grad(out, leaves, do)]


def _compare(q, k, v, do, **kw) -> None:
    got = _run(attention, q, k, v, do, **kw)
    hp = _run(attention_ref, *(x.float() for x in (q, k, v, do)), **kw)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float32:
        for name, a, r in zip(names, got, hp):
            assert a.dtype == q.dtype and a.shape == r.shape
            assert_close(a, r, name=name)
    else:
        lp = _run(_attention_lowp, q, k, v, do, **kw)
        for name, a, r_lp, r_hp in zip(names, got, lp, hp):
            assert a.dtype == q.dtype and a.shape == r_hp.shape
            assert_fa_rule(a, r_lp, r_hp, name=name)


@pytest.mark.parametrize("B, T, S, H, Hkv, D, causal, window, scale, dtype", CASES)
def test_attention_matches_reference(B, T, S, H, Hkv, D, causal, window, scale, dtype):
    q, k, v, do = _inputs(B, T, S, H, Hkv, D, dtype, seed=T * 1000 + S + D)
    _compare(q, k, v, do, causal=causal, scale=scale, window=window)


def test_lowp_baseline_has_reference_semantics():
    # The fp16 baseline must compute the same function as attention_ref (checked in fp32).
    q, k, v, do = _inputs(2, 21, 30, 4, 2, 32, FP32, seed=5)
    for kw in (dict(causal=True, window=7), dict(causal=False, window=None), dict(causal=True, window=None)):
        for name, a, r in zip(("out", "dq", "dk", "dv"), _run(_attention_lowp, q, k, v, do, **kw),
                              _run(attention_ref, q, k, v, do, **kw)):
            assert_close(a, r, name=name)


def test_empty_rows_are_zero_with_zero_grads():
    # T > S with causal: the first T - S queries sit before position 0 and see nothing.
    q, k, v, do = _inputs(1, 12, 5, 2, 1, 32, FP32, seed=7)
    out, dq, _, _ = _run(attention, q, k, v, do, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert out[:, :7].abs().max() == 0 and dq[:, :7].abs().max() == 0
    assert out[:, 7:].abs().min() > 0


@pytest.mark.parametrize("layout", ["fused-qkv", "bhtd-transposed"])
def test_strided_inputs(layout):
    B, T, H, Hkv, D = 2, 19, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    if layout == "fused-qkv":  # the model's split of one projection: row stride (H + 2 Hkv) * D
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen).to(DEVICE)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    else:  # (B, H, T, D) storage seen as (B, T, H, D)
        q = torch.randn(B, H, T, D, generator=gen).to(DEVICE).transpose(1, 2)
        k = torch.randn(B, Hkv, T, D, generator=gen).to(DEVICE).transpose(1, 2)
        v = torch.randn(B, Hkv, T, D, generator=gen).to(DEVICE).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    do = torch.randn(B, H, T, D, generator=gen).to(DEVICE).transpose(1, 2)  # strided upstream grad too
    got = _run(attention, q, k, v, do, causal=True)
    ref = _run(attention_ref, q, k, v, do, causal=True)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, r, name=name)


def test_bad_inputs_raise():
    q, k, v, _ = _inputs(1, 4, 4, 3, 2, 32, FP32, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 32, FP32, seed=1)
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="B="):
        attention(q, k[:, :, :, :16], v)


@requires_cuda
@pytest.mark.parametrize("B, T, S, H, Hkv, D, causal, window", [
    pytest.param(2, 257, 257, 8, 2, 128, True, None, id="t257-gqa4-d128"),
    pytest.param(1, 100, 300, 4, 1, 64, True, 64, id="prefill-mqa-d64-window"),
    pytest.param(2, 129, 129, 4, 4, 80, False, None, id="mha-d80-full"),
    pytest.param(1, 64, 64, 2, 1, 256, True, None, id="d256"),
])
def test_attention_bf16_cuda(B, T, S, H, Hkv, D, causal, window):
    q, k, v, do = _inputs(B, T, S, H, Hkv, D, BF16, seed=11)
    _compare(q, k, v, do, causal=causal, window=window)
