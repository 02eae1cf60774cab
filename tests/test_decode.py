"""kernels/decode.py against kernels/reference.decode_attention_ref (forward only: inference op).

fp32 with the fp32 tolerance; fp16 with the FlashAttention rule (the reference run in fp16 sets the
budget); bf16 on CUDA only (bf16 tl.dot is wrong under the interpreter). Caches are filled with random
values beyond each row's length, so reading past a length shows up as a wrong answer. Small forced split
sizes make several splits (and splits that end mid-block or past a row's length) on short caches.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule, requires_cuda, skip_fp32_kernel_on_cuda

from kernels.attention import attention
from kernels.decode import decode_attention
from kernels.reference import decode_attention_ref

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (lengths, Tq, H, Hkv, D, S_max, partition, dtype); partition forces split_size (fixed keys per split)
# or num_splits (each row cuts its own length that many ways, as the default does on a GPU).
CASES = [
    pytest.param([1, 37, 200], 1, 8, 2, 64, 208, dict(split_size=32), FP32, id="tq1-gqa4-ragged-split32"),
    pytest.param([1, 37, 200], 1, 8, 2, 64, 208, dict(num_splits=5), FP16, id="tq1-gqa4-ragged-5splits-fp16"),
    pytest.param([300], 1, 4, 1, 32, 300, dict(split_size=48), FP32, id="tq1-b1-mqa-7splits"),
    pytest.param([3, 50, 129], 3, 4, 1, 128, 130, dict(split_size=24), FP16, id="tq3-mqa-d128-split24-fp16"),
    pytest.param([5, 77], 3, 2, 2, 80, 90, dict(), FP32, id="tq3-mha-d80-default"),
    pytest.param([2, 45], 2, 4, 2, 256, 50, dict(num_splits=3), FP16, id="tq2-d256-3splits-fp16"),
    pytest.param([9, 33], 1, 6, 2, 96, 40, dict(split_size=8), FP32, id="tq1-gqa3-d96-split8"),
    pytest.param([40, 40], 20, 8, 2, 64, 48, dict(), FP16, id="tq20-equal-to-attention-fp16"),
    pytest.param([25, 60], 20, 4, 2, 32, 64, dict(num_splits=4), FP32, id="tq20-ragged-chunks"),
]


def _inputs(lengths: list[int], Tq: int, H: int, Hkv: int, D: int, S_max: int, dtype: torch.dtype, seed: int):
    skip_fp32_kernel_on_cuda(dtype)
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, Tq, H, D, generator=gen)
    k = torch.randn(B, S_max, Hkv, D, generator=gen)  # random past each length: garbage must be masked
    v = torch.randn(B, S_max, Hkv, D, generator=gen)
    lens = torch.tensor(lengths, dtype=torch.long, device=DEVICE)
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v)] + [lens]


def _compare(q, k, v, lens, scale: float | None = None, **partition) -> None:
    out = decode_attention(q, k, v, lens, scale, **partition)
    kw = dict(scale=scale)
    hp = decode_attention_ref(q.float(), k.float(), v.float(), lens, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    if q.dtype == torch.float32:
        assert_close(out, hp)
    else:
        assert_fa_rule(out, decode_attention_ref(q, k, v, lens, **kw), hp)


@pytest.mark.parametrize("lengths, Tq, H, Hkv, D, S_max, partition, dtype", CASES)
def test_decode_matches_reference(lengths, Tq, H, Hkv, D, S_max, partition, dtype):
    q, k, v, lens = _inputs(lengths, Tq, H, Hkv, D, S_max, dtype, seed=sum(lengths) + Tq + D)
    _compare(q, k, v, lens, **partition)


def test_custom_scale_and_strided_q():
    # q as the model makes it: a view into a fused projection (non-contiguous rows).
    B, Tq, H, Hkv, D = 2, 2, 4, 2, 32
    gen = torch.Generator().manual_seed(4)
    fused = torch.randn(B, Tq, (H + 2 * Hkv) * D, generator=gen).to(DEVICE)
    q = fused[..., : H * D].view(B, Tq, H, D)
    assert not q.is_contiguous()
    k = torch.randn(B, 70, Hkv, D, generator=gen).to(DEVICE)
    v = torch.randn(B, 70, Hkv, D, generator=gen).to(DEVICE)
    lens = torch.tensor([70, 19], device=DEVICE)
    _compare(q, k, v, lens, scale=0.2, split_size=32)


def test_partitions_agree():
    q, k, v, lens = _inputs([130, 7, 64], 1, 4, 2, 32, 140, FP32, seed=9)
    a = decode_attention(q, k, v, lens)
    b = decode_attention(q, k, v, lens, split_size=20)  # 7 splits, the last partly past every length
    c = decode_attention(q, k, v, lens, num_splits=6)  # per-row sizes: 32, 16 and 16 keys per split
    assert_close(b, a)
    assert_close(c, a)


def test_prefill_then_token_by_token_matches_full_attention():
    """Cached use: prefill P tokens, then decode one token at a time; equals one attention() call."""
    B, N, P, H, Hkv, D, S_max = 2, 40, 23, 8, 2, 64, 48
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, N, H, D, generator=gen).to(DEVICE)
    k = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE)
    v = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE)
    full = attention(q, k, v, causal=True)
    k_cache = torch.randn(B, S_max, Hkv, D, generator=gen).to(DEVICE)  # stale garbage past the length
    v_cache = torch.randn(B, S_max, Hkv, D, generator=gen).to(DEVICE)
    k_cache[:, :P], v_cache[:, :P] = k[:, :P], v[:, :P]
    lens = torch.full((B,), P, device=DEVICE)
    outs = [decode_attention(q[:, :P], k_cache, v_cache, lens)]  # Tq = 23 > 16: the attention() route
    for t in range(P, N):
        k_cache[:, t], v_cache[:, t] = k[:, t], v[:, t]
        lens += 1
        outs.append(decode_attention(q[:, t:t + 1], k_cache, v_cache, lens, split_size=8))
    assert_close(torch.cat(outs, dim=1), full)


def test_requires_grad_and_bad_inputs_raise():
    q, k, v, lens = _inputs([5, 9], 1, 4, 2, 32, 12, FP32, seed=1)
    with pytest.raises(ValueError, match="inference-only"):
        decode_attention(q.clone().requires_grad_(), k, v, lens)
    with torch.no_grad():  # fine without grad mode
        decode_attention(q.clone().requires_grad_(), k, v, lens)
    q20 = torch.randn(2, 20, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="S_max"):  # checked where the host reads lengths anyway (Tq > 16)
        decode_attention(q20, k, v, torch.tensor([20, 21], device=DEVICE))
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k, v, torch.tensor([5.0, 9.0], device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :, :3], k, v, lens)


@requires_cuda
@pytest.mark.parametrize("lengths, Tq, H, Hkv, D, S_max", [
    pytest.param([1, 1000, 4097], 1, 32, 8, 128, 4100, id="tq1-gqa4-d128"),
    pytest.param([3, 700], 3, 16, 2, 64, 800, id="tq3-gqa8-d64"),
    pytest.param([513, 200], 24, 8, 8, 128, 520, id="tq24-ragged-mha"),
])
def test_decode_bf16_cuda(lengths, Tq, H, Hkv, D, S_max):
    q, k, v, lens = _inputs(lengths, Tq, H, Hkv, D, S_max, BF16, seed=3)
    _compare(q, k, v, lens)
