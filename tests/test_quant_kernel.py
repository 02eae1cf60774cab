"""Triton W8A16 / W4A16 matmuls (kernels/quant_matmul.py) vs the references, under the interpreter on CPU.

Awkward shapes on purpose: K not a multiple of the group size (and odd, so the last int4 byte is half
used), odd N, M = 1 and 7 (decode path, split over K) and 33 (prefill path); fp16 and fp32 activations
(the interpreter runs bf16 tl.dot wrongly, so bf16 is left to GPU runs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule

from kernels import reference as ref

triton = pytest.importorskip("triton")
from kernels import quant_matmul as qm  # noqa: E402
from llm.quant import quantize_int4, quantize_int8  # noqa: E402

SHAPES = [(1, 75, 201), (7, 75, 201), (33, 75, 201), (1, 64, 128)]


def _weights(N: int, K: int, bits: int, group: int):
    w = torch.randn(N, K) * 0.05 + 0.01 * torch.randn(N, 1)  # rows not centred on 0
    if bits == 8:
        q, s = quantize_int8(w)
        return q.to(DEVICE), s.to(DEVICE), None
    q, s, z = quantize_int4(w, group)
    return q.to(DEVICE), s.to(DEVICE), z.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)], ids=["int8", "int4g32", "int4g64",
                                                                                 "int4g128"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_quant_matmul_equals_reference(M, N, K, bits, group, dtype):
    q, s, z = _weights(N, K, bits, group)
    x = torch.randn(M, K, device=DEVICE)
    bias = torch.randn(N, device=DEVICE) * 0.1
    if bits == 8:
        out = qm.int8_matmul(x.to(dtype), q, s.to(dtype), bias.to(dtype))
        hp = ref.int8_matmul_ref(x.to(dtype).float(), q, s.to(dtype), bias.to(dtype))
        lp = ref.int8_matmul_ref(x.to(dtype), q, s.to(dtype), bias.to(dtype))
    else:
        out = qm.int4_matmul(x.to(dtype), q, s.to(dtype), z.to(dtype), group, bias.to(dtype))
        hp = ref.int4_matmul_ref(x.to(dtype).float(), q, s.to(dtype), z.to(dtype), group, bias.to(dtype))
        lp = ref.int4_matmul_ref(x.to(dtype), q, s.to(dtype), z.to(dtype), group, bias.to(dtype))
    assert out.dtype == dtype and out.shape == (M, N)
    if dtype == torch.float32:
        assert_close(out, hp, name=f"int{bits}")
    else:
        assert_fa_rule(out, lp, hp, name=f"int{bits}")


def test_batched_input_keeps_its_leading_dims():
    q, s, _ = _weights(48, 96, 8, 0)
    x = torch.randn(2, 3, 96, device=DEVICE)
    assert_close(qm.int8_matmul(x, q, s), ref.int8_matmul_ref(x, q, s))


def test_every_config_is_listed_and_the_launcher_picks_from_the_list():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for M in (1, 16, 17, 4096):
            for bits, g in [(8, 0), (4, 32), (4, 64), (4, 128)]:
                path, cfg = qm.pick_config(M, 4096, bits, g, dtype)
                assert cfg in qm.configs(path, dtype)
                assert path == ("gemv" if M <= qm.GEMV_MAX_M else "gemm")
                assert bits == 8 or g % cfg.block_k == 0


def test_bad_weight_shape_is_one_clear_line():
    q, s, z = _weights(16, 64, 4, 32)
    with pytest.raises(ValueError, match="K=66"):
        qm.int4_matmul(torch.randn(1, 66, device=DEVICE), q, s, z, 32)
    with pytest.raises(ValueError, match="group size"):
        qm.int4_matmul(torch.randn(1, 64, device=DEVICE), q, s, z, 48)
