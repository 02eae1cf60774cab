"""Weight-only quantized matmuls in Triton: W8A16 and W4A16, y = x @ dequant(W).T, dequantized in the weight load.

Weight formats (the same as kernels/reference.py):
  int8  q (N, K) int8,              w[n, k] = q[n, k] * s[n]                       (per output channel)
  int4  q (N, ceil(K/2)) uint8,     w[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g],   g = k // G
        two codes per byte, even k in the low nibble; the last group is shorter when G does not divide K.
Activations x (M, K) fp16 / bf16 / fp32; y (M, N) in x's dtype; accumulation in fp32.

Two paths, both reading each weight byte once from memory:
  gemv  M <= 16 (decode): one 16-row tile of x against BLOCK_N output channels; when N gives too few
        programs to fill the GPU, K is split across programs too (split-K) and the fp32 partial sums are
        added by the launcher (deterministic, no atomics). Memory-bound: the weight bytes are the cost.
  gemm  M > 16 (prefill): a 2D grid of (BLOCK_M, BLOCK_N) output tiles, K looped in BLOCK_K steps.
int8: the per-channel scale factors out of the sum, so the tile is x @ q and s multiplies the result.
int4: BLOCK_K divides G, so one (scale, offset) pair per output channel covers a whole K step.
fp32 activations use input_precision="ieee" (exact fp32 products, not TF32) so fp32 matches the reference.
Every launch configuration is one of `configs(path, dtype)` (data the AOT compile check enumerates).
Forward only: quantized weights are for inference (training from them is refused in llm/).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GEMV_MAX_M = 16  # rows served by the decode path (one tl.dot tile; tl.dot needs M >= 16)
GROUP_SIZES = (32, 64, 128)


@triton.jit
def _weight_tile(
    w_ptr,  # quantized weight: (N, K) int8 or (N, ceil(K/2)) uint8
    s_ptr,  # int4 scales (N, n_groups); unused for int8 (scaled after the dot)
    z_ptr,  # int4 offsets (N, n_groups)
    offs_k,  # (BLOCK_K,) input indices of this step
    offs_n,  # (BLOCK_N,) output channels of this program
    k0,  # first k of this step (a multiple of BLOCK_K, so k0 // GROUP is this step's group)
    K, N,  # logical sizes
    stride_wn, stride_sn,  # row strides in elements
    BITS: tl.constexpr,  # 8 or 4
    GROUP: tl.constexpr,  # int4 group size (BLOCK_K divides it)
):
    """The (BLOCK_K, BLOCK_N) tile of dequantized weights (int8: the raw codes), fp32."""
    n_ok = offs_n < N
    mask = (offs_k < K)[:, None] & n_ok[None, :]
    if BITS == 8:
        q = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask, other=0)
        return q.to(tl.float32)
    # Each byte holds codes k and k + 1: two lanes read the same byte; the second read hits L1, so
    # DRAM traffic stays K/2 bytes per channel.
    b = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // 2)[:, None], mask=mask, other=0).to(tl.int32)
    q = ((b >> ((offs_k % 2) * 4)[:, None]) & 0xF).to(tl.float32)
    g = k0 // GROUP
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    # Masked k (past K) give finite values here; x is 0 there, so they add nothing.
    return (q - 8.0) * s[None, :] + z[None, :]


@triton.jit
def _qmm_gemv_kernel(
    x_ptr,  # (M, K) activations, M <= BLOCK_M, rows contiguous
    w_ptr, s_ptr, z_ptr,  # quantized weight, scales, int4 offsets (see _weight_tile)
    part_ptr,  # (SPLIT_K, M, N) fp32 out: partial sums of each K split
    M, N, K,
    stride_xm, stride_wn, stride_sn,  # row strides in elements
    k_per_split,  # K range of one split (a multiple of BLOCK_K)
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 16: every decode row in one tl.dot tile
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # inputs per step (divides GROUP for int4)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 activations, else "tf32" (ignored for fp16/bf16)
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xm = (offs_m < M)[:, None] & (offs_k < k_hi)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xm, other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, K, N, stride_wn, stride_sn, BITS, GROUP)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _qmm_gemm_kernel(
    x_ptr,  # (M, K) activations, rows contiguous
    w_ptr, s_ptr, z_ptr,  # quantized weight, scales, int4 offsets (see _weight_tile)
    b_ptr,  # (N,) bias, added in fp32 before the one rounding to x's dtype (unused without HAS_BIAS)
    y_ptr,  # (M, N) out, x's dtype
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,  # row strides in elements
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # output tile
    BLOCK_K: tl.constexpr,  # inputs per step (divides GROUP for int4)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 activations
    HAS_BIAS: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # int64 rows: row * stride passes 2^31 for long prefills of wide layers.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xm = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xm, other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, K, N, stride_wn, stride_sn, BITS, GROUP)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ym = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


# ----------------------------------------------------------------------------- configurations


class Config(NamedTuple):
    """One launch configuration: tile sizes (constexprs) and Triton launch options."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def configs(path: str, dtype: torch.dtype) -> list[Config]:
    """Every configuration the launcher may pick for `path` ("gemv" | "gemm") and activation dtype.

    The launcher chooses only from this list (`pick_config`), so compiling each entry for every BITS and
    GROUP in GROUP_SIZES covers every kernel that can run (each compiles for sm_80 and sm_90 without
    register spills). fp32 ("ieee") dots take smaller tiles: fp32 operands double a tile's registers.
    """
    if path == "gemv":
        # BLOCK_N 64: enough channels per program to coalesce; BLOCK_K up to 128 = one int4 group of 128.
        # fp32 ("ieee") dots with BLOCK_K > 32 spill registers on sm_80/sm_90 (AOT check), so fp32 keeps 32.
        return [Config(16, 64, bk, 4, 3) for bk in ((32,) if dtype == torch.float32 else (32, 64, 128))]
    if path == "gemm":
        # BLOCK_K 64 spills the int8 tile's registers; fp32 ("ieee", FMA) tiles spill unless BLOCK_K is 16.
        if dtype == torch.float32:
            return [Config(32, 64, 16, 4, 2), Config(64, 64, 16, 8, 2)]
        return [Config(64, 64, 32, 4, 3), Config(128, 128, 32, 8, 3)]
    raise ValueError(f"unknown quant_matmul path {path!r} (gemv or gemm)")


def pick_config(M: int, N: int, bits: int, group_size: int, dtype: torch.dtype) -> tuple[str, Config]:
    """(path, config) for an (M, K) x (K, N) problem: the largest BLOCK_K that divides the group, then
    the GEMM tile by size (big tiles only when there are enough of them to fill the machine)."""
    path = "gemv" if M <= GEMV_MAX_M else "gemm"
    ok = [c for c in configs(path, dtype) if bits == 8 or group_size % c.block_k == 0]
    bk = max(c.block_k for c in ok)
    ok = [c for c in ok if c.block_k == bk]
    if path == "gemm":
        big = M >= 256 and N >= 2048
        ok = sorted(ok, key=lambda c: c.block_m * c.block_n, reverse=big)
    return path, ok[0]


def aot_cases() -> list[AotCase]:
    """Every kernel `pick_config` can launch, for `python -m kernels.aot`: each entry of `configs(path,
    dtype)` with int8 and with int4 at every group size its BLOCK_K divides (the launcher's rule), the GEMM
    with and without bias. Scales and offsets are fp16 (llm.quant's SCALE_DTYPE)."""
    f32, f16, cases = torch.float32, torch.float16, []
    for dtype in _DTYPES:
        prec = "ieee" if dtype == f32 else "tf32"
        for path, kernel in (("gemv", _qmm_gemv_kernel), ("gemm", _qmm_gemm_kernel)):
            for c in configs(path, dtype):
                tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, DOT_PRECISION=prec)
                for bits, group in [(8, 1)] + [(4, g) for g in GROUP_SIZES if g % c.block_k == 0]:
                    ptrs = dict(w_ptr=torch.int8 if bits == 8 else torch.uint8, s_ptr=f16, z_ptr=f16, part_ptr=f32)
                    label = f"{DTYPE_NAMES[dtype]} int{bits}" + (f" G={group}" if bits == 4 else "")
                    for bias in ((False, True) if path == "gemm" else (None,)):
                        consts = dict(BITS=bits, GROUP=group, **tiles)
                        if bias is not None:
                            consts["HAS_BIAS"] = bias
                        cases.append(AotCase(kernel, consts, c.num_warps, c.num_stages, dtype, label, ptrs=ptrs))
    return cases


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split_k(N: int, K: int, cfg: Config, device: torch.device) -> int:
    """K splits per output tile so that about 2 programs per SM run (1 when N alone fills the GPU)."""
    n_tiles = triton.cdiv(N, cfg.block_n)
    want = triton.cdiv(2 * _num_sms(device), n_tiles)
    return max(1, min(want, triton.cdiv(K, cfg.block_k)))


# ----------------------------------------------------------------------------- launchers


def _check(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"quant_matmul: x must be fp32/fp16/bf16, got {x.dtype}")
    want = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want or qweight.dim() != 2:
        raise ValueError(f"quant_matmul: int{bits} weight must be a 2D {want} tensor, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    K = x.shape[-1]
    width = K if bits == 8 else (K + 1) // 2
    if qweight.shape[1] != width:
        raise ValueError(f"quant_matmul: x has K={K} but the int{bits} weight has {qweight.shape[1]} columns "
                         f"(want {width})")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"quant_matmul: int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if qweight.device != x.device or scales.device != x.device:
        raise ValueError(f"quant_matmul: x on {x.device}, weight on {qweight.device}, scales on {scales.device}")


def quant_matmul_fwd(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                     bits: int, group_size: int = 0) -> Tensor:
    """y (..., N) = x (..., K) @ dequant(W).T + b in x's dtype; W int8 (bits 8) or packed int4 (bits 4).

    The bias is added to the fp32 sums (one rounding to x's dtype, like the reference).
    """
    _check(x, qweight, scales, bits, group_size)
    K, N = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = scales if zeros is None else zeros.contiguous()  # int8: an unused stand-in pointer
    stride_sn = scales.stride(0) if scales.dim() == 2 else 1
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    path, c = pick_config(M, N, bits, group_size, x.dtype)
    if M == 0 or N == 0:
        return x.new_zeros((*x.shape[:-1], N))
    if path == "gemv":
        split = _split_k(N, K, c, x.device)
        k_per = triton.cdiv(triton.cdiv(K, split), c.block_k) * c.block_k
        split = triton.cdiv(K, k_per)
        part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        _qmm_gemv_kernel[(triton.cdiv(N, c.block_n), split)](
            x2, qweight, scales, zeros, part, M, N, K, x2.stride(0), qweight.stride(0), stride_sn, k_per,
            BITS=bits, GROUP=group_size or 1, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            DOT_PRECISION=prec, num_warps=c.num_warps, num_stages=c.num_stages)
        y = part[0] if split == 1 else part.sum(0)
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    else:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        _qmm_gemm_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
            x2, qweight, scales, zeros, scales if bias is None else bias.contiguous(), y, M, N, K, x2.stride(0),
            qweight.stride(0), stride_sn, y.stride(0), BITS=bits, GROUP=group_size or 1, BLOCK_M=c.block_m,
            BLOCK_N=c.block_n, BLOCK_K=c.block_k, DOT_PRECISION=prec, HAS_BIAS=bias is not None,
            num_warps=c.num_warps, num_stages=c.num_stages)
    return y.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- public ops


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (q * s[:, None]).T + b: W8A16. x (..., K); qweight (N, K) int8; scales, bias (N,). Forward only."""
    return quant_matmul_fwd(x, qweight, scales, None, bias, 8)


def int4_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """x @ dequant(q).T + b: W4A16. qweight (N, ceil(K/2)) uint8; scales, zeros (N, ceil(K/G)). Forward only."""
    return quant_matmul_fwd(x, qweight, scales, zeros, bias, 4, group_size)
