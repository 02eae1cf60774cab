"""CPU prefill through int8 / int4 weights (kernels/cpu_prefill.py): equal to the whole-weight references on
awkward shapes (several chunks and a short last one, K odd or not a multiple of the group, 3-D inputs, bias,
bf16 activations), and llm.ops routes prefill rows there instead of dequantizing the whole weight."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_prefill
from kernels import reference as ref
from llm import ops, quant

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("N,K,group", [(48, 96, 32), (70, 100, 64), (37, 257, 32), (33, 64, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_equals_the_references(N, K, group, bias, dtype, monkeypatch):
    monkeypatch.setattr(cpu_prefill, "CHUNK", 16)  # several chunks, the last one short
    torch.manual_seed(N + K)
    w = torch.randn(N, K) * 0.05
    b = torch.randn(N) if bias else None
    x = torch.randn(2, 9, K).to(dtype)
    q8, s8 = quant.quantize_int8(w)
    got, want = cpu_prefill.int8_matmul(x, q8, s8, b), ref.int8_matmul_ref(x, q8, s8, b)
    assert got.dtype == want.dtype == dtype and got.shape == (2, 9, N)
    torch.testing.assert_close(got, want)
    q4, s4, z4 = quant.quantize_int4(w, group)
    got, want = cpu_prefill.int4_matmul(x, q4, s4, z4, group, b), ref.int4_matmul_ref(x, q4, s4, z4, group, b)
    assert got.dtype == want.dtype == dtype and got.shape == (2, 9, N)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_rows_never_dequantize_the_whole_weight(mode, monkeypatch):
    lin = torch.nn.Linear(100, 40, bias=True)
    m = quant.QuantLinear.from_linear(lin, mode, 32, "auto")
    x = torch.randn(ops.CPU_WOQ_MAX_M + 5, 100)
    want = m(x)

    def whole(*a, **k):
        raise AssertionError("prefill dequantized the whole weight")

    monkeypatch.setattr(ref, "int4_dequant_ref", whole)
    monkeypatch.setattr(ref, "int8_matmul_ref", whole)
    monkeypatch.setattr(ref, "int4_matmul_ref", whole)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
