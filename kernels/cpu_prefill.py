"""CPU prefill through weight-only int8 / int4 linears: dequantize a block of output rows at a time, one GEMM each.

The references (kernels/reference.py `int8_matmul_ref`, `int4_matmul_ref`) dequantize the whole (N, K) weight to
fp32 before one GEMM: for int4 that is eight passes over N*K values (unpack to int32, stack, float, two
repeat_interleaves of the scales and zeros, subtract, multiply, add), each a fresh tensor of up to 4 N K bytes.
On the 16x1024 Llama (MLP 2816 x 1024) that made one prefill linear of 128 rows cost ~4-6x its fp32 GEMM and a
128-token prompt take seconds (benchmarks/NOTES.md, "CPU prefill through int4 / int8 weights").

Here the weight is dequantized CHUNK output rows at a time into one reused fp32 buffer (CHUNK x K x 4 bytes:
256 x 1024 is 1 MiB, L2-sized), in place and with the group's scale and zero broadcast, not repeated:

    W[n, g*G + j] = (q[n, g*G + j] - 8) * s[n, g] + z[n, g]      (int4; j < G, the last group may be short)
    W[n, k]       = q[n, k] * s[n]                                (int8)

then y[:, n0:n1] = x @ W[n0:n1].T (+ b) by one GEMM per chunk. Same values as the references up to the GEMM's
summation order (a test holds them to fp32 rounding). Used for CPU inputs of more rows than a decode GEMV takes
(llm/ops.py routes them), eager only: under torch.compile the reference is traced instead (inductor fuses its
dequantization; an unrolled chunk loop would only lengthen compilation).

    int8_matmul(x, qweight, scales, bias)                        x (..., K), q (N, K) int8, s (N,)   -> (..., N)
    int4_matmul(x, qweight, scales, zeros, group_size, bias)     q (N, ceil(K/2)) uint8, s, z (N, ceil(K/G))
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 256  # output rows dequantized per GEMM (measured 64 / 128 / 256 on the 16x1024 shapes: 256 or 128 best)


def _gemm_by_chunks(x: Tensor, n: int, width: int, fill, bias: Tensor | None) -> Tensor:
    """y (..., n) = x @ W.T + b where fill(n0, n1, buf) writes W[n0:n1] (fp32) into buf[: n1 - n0, :width]."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    buf = torch.empty(min(CHUNK, n), width, dtype=torch.float32)
    for n0 in range(0, n, CHUNK):
        n1 = min(n, n0 + CHUNK)
        w = fill(n0, n1, buf[: n1 - n0])[:, :k]
        y[:, n0:n1] = x2 @ w.t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ (q * s[:, None]).T + b, as int8_matmul_ref. x (..., K) float on the CPU; y in x's dtype."""
    s = scales.float()

    def fill(n0: int, n1: int, buf: Tensor) -> Tensor:
        buf.copy_(qweight[n0:n1])
        return buf.mul_(s[n0:n1, None])

    return _gemm_by_chunks(x, qweight.shape[0], qweight.shape[1], fill, bias)


def int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """y = x @ dequant(q).T + b, as int4_matmul_ref (format there: even k in the low nibble, (q - 8) * s + z).
    x (..., K) float on the CPU; y in x's dtype. K need not be a multiple of group_size or even."""
    half = qweight.shape[1]
    groups = scales.shape[1]
    width = max(groups * group_size, 2 * half)  # room for every unpacked code and whole groups
    s, z = scales.float(), zeros.float()

    def fill(n0: int, n1: int, buf: Tensor) -> Tensor:
        b, rows = qweight[n0:n1], n1 - n0
        pairs = buf[:, : 2 * half].view(rows, half, 2)
        pairs[:, :, 0].copy_(b & 0xF)
        pairs[:, :, 1].copy_(b >> 4)
        w = buf[:, : groups * group_size].view(rows, groups, group_size)  # columns past K: sliced off after
        w.sub_(8.0).mul_(s[n0:n1, :, None]).add_(z[n0:n1, :, None])
        return buf

    return _gemm_by_chunks(x, qweight.shape[0], width, fill, bias)
