"""CPU decode GEMVs that stream int8 / int4 / 16-bit weights once: y = x @ W^T + b for a few rows of x.

The kernels are C with AVX2 intrinsics (kernels/cpu_gemv.c, which documents the formats and the math),
compiled on first use by the system C compiler into a per-user cache and called through ctypes; OpenMP
threads come from torch's own libgomp, so `torch.set_num_threads` governs them. Why C and not torch's
kernels: on an AVX2 CPU (no AVX-512, no native bf16) torch 2.13's `_weight_int8pack_mm` is vectorized for
bf16 activations only and `_weight_int4pack_mm_for_cpu` reads its weight at a fraction of the memory rate
(benchmarks/NOTES.md, issue 32). The int8 / int4 kernels round x to integers per block and sum codes times x
in int32, at act_bits = 8 (int8 per 32 values as llama.cpp's q8_0 activations, or per int4 group, error
<= 1/254 of the block's largest |x|, vpmaddubsw) or 16 (int16 per block, 1.5e-5, vpmaddwd: half the products
per instruction); defaults INT8_ACT_BITS / INT4_ACT_BITS below. The 16-bit kernel computes in fp32.

    available() -> bool                      a compiler and a build, or False (the caller falls back)
    int8_gemv(x, q, s, bias, act_bits)       x (M, K) float, q (N, K) int8, s (N,)            -> (M, N)
    int4_gemv(x, q, s, z, group_size, bias, act_bits)
                                             q (N, ceil(K/2)) uint8, s, z (N, ceil(K/G))        -> (M, N)
    w16_gemv(x, w, bias)                     w (N, K) fp16 / bf16                              -> (M, N)
    f32_rows_gemm(x, w, bias)                w (N, K) fp32, contiguous or K-major (w.t() is)   -> (M, N)
    f32_rows_plan(w, bias) -> run(x)         the same bound to one weight, checked once (few_rows' linears)
x may be fp32, fp16 or bf16 (widened to fp32 once, K values per row); y comes back in x's dtype.
M <= MAX_M (decode rows); larger inputs belong to a GEMM.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

MAX_M = 16
# Default activation precision per weight format, chosen on benchmarks/bench_cpu_gemv.py (benchmarks/NOTES.md,
# issue 32 session 4): int4 at 8 bits runs ~2x its 16-bit kernel (two maddubs per 64 codes, no widening);
# int8 at 8 bits (maddubs(|w|, sign(w) x), one fp32 scaling per 32 values) ran ~10% slower than at 16.
INT8_ACT_BITS = 16
INT4_ACT_BITS = 8
GROUP_SIZES = (32, 64, 128)  # multiples of the kernel's 32-code step
_SRC = Path(__file__).with_name("cpu_gemv.c")
_P = ctypes.c_void_p
_I = ctypes.c_int


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-kernels"


@cache
def _build(simd: bool) -> ctypes.CDLL | None:
    """Build (once per source + flags) and load the shared library, with AVX2/FMA/F16C (simd) or the scalar
    loops only; None without a C compiler or on failure."""
    cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if cc is None or not _SRC.exists():
        return None
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno"]
    if simd:
        flags += ["-mavx2", "-mfma", "-mf16c"]
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc] + flags).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_gemv-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as d:
            tmp = Path(d) / out.name
            r = subprocess.run([cc, *flags, str(_SRC), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:
                return None
            os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes
    lib = ctypes.CDLL(str(out))  # torch (imported above) loaded libgomp.so.1 first: the library shares it
    lib.int8_gemv.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I]
    lib.int4_gemv.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I]
    lib.w16_gemv.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I]
    lib.f32_kmajor_gemm.argtypes = lib.f32_nmajor_gemm.argtypes = [_P, _P, _P, _P, _I, _I, _I]
    for f in (lib.int8_gemv, lib.int4_gemv, lib.w16_gemv, lib.f32_kmajor_gemm, lib.f32_nmajor_gemm):
        f.restype = None
    return lib


@cache
def _lib() -> ctypes.CDLL | None:
    """The build for this CPU: the AVX2 kernels where it has AVX2, FMA and F16C, else the scalar loops."""
    return _build({"avx2", "fma", "f16c"} <= _cpu_flags())


@torch.compiler.assume_constant_result  # torch.compile reads it once while tracing (it opens files: not traceable)
def available() -> bool:
    """Whether the C kernels are built and loaded (a C compiler was found and compiled them)."""
    return _lib() is not None


def _rows(x: Tensor, K: int) -> Tensor:
    """x as contiguous fp32 (M, K) rows (a view when it already is one)."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {K}")
    x2 = x.view(-1, K) if x.dtype == torch.float32 and x.is_contiguous() else x.reshape(-1, K).float().contiguous()
    if x2.shape[0] > MAX_M:
        raise ValueError(f"the CPU GEMV serves at most {MAX_M} rows, got {x2.shape[0]}")
    return x2


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float().contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _out(y: Tensor, x: Tensor, N: int) -> Tensor:
    """y (M, N) fp32 -> (..., N) in x's dtype."""
    if x.dim() != 2:
        y = y.view(x.shape[:-1] + (N,))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _act_bits(act_bits: int) -> int:
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    return act_bits


def int8_gemv(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
              act_bits: int = INT8_ACT_BITS) -> Tensor:
    """y = x @ (q * s[:, None]).T + b; x (..., K), q (N, K) int8, s and b (N,); int8_matmul_ref's signature
    (x rounded to act_bits integers per block, see the module docstring)."""
    N, K = qweight.shape
    _act_bits(act_bits)
    if qweight.dtype != torch.int8 or not qweight.is_contiguous():
        raise ValueError("int8_gemv: qweight must be a contiguous int8 (N, K) tensor")
    x2, s, b = _rows(x, K), _f32(scales), _f32(bias)
    M = x2.shape[0]
    y = torch.empty(M, N)
    _lib().int8_gemv(x2.data_ptr(), qweight.data_ptr(), s.data_ptr(), _ptr(b), y.data_ptr(), M, N, K, act_bits)
    return _out(y, x, N)


def int4_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
              bias: Tensor | None = None, act_bits: int = INT4_ACT_BITS) -> Tensor:
    """y = x @ dequant(q).T + b; q (N, ceil(K/2)) uint8, s and z (N, ceil(K/G)); int4_matmul_ref's signature
    (x rounded to act_bits integers per block, see the module docstring)."""
    _act_bits(act_bits)
    N, K = qweight.shape[0], x.shape[-1]
    n_groups = -(-K // group_size)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4_gemv: group size must be one of {GROUP_SIZES}, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (K + 1) // 2 or not qweight.is_contiguous():
        raise ValueError(f"int4_gemv: qweight must be contiguous uint8 ({N}, {(K + 1) // 2}) for K = {K}")
    if scales.shape != (N, n_groups) or zeros.shape != (N, n_groups):
        raise ValueError(f"int4_gemv: scales and zeros must be ({N}, {n_groups})")
    x2, s, z, b = _rows(x, K), _f32(scales), _f32(zeros), _f32(bias)
    M = x2.shape[0]
    y = torch.empty(M, N)
    _lib().int4_gemv(x2.data_ptr(), qweight.data_ptr(), s.data_ptr(), z.data_ptr(), _ptr(b), y.data_ptr(),
                     M, N, K, group_size, act_bits)
    return _out(y, x, N)


def w16_gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + b with W (N, K) fp16 or bf16, widened in registers, fp32 accumulation."""
    N, K = weight.shape
    if weight.dtype not in (torch.float16, torch.bfloat16) or not weight.is_contiguous():
        raise ValueError("w16_gemv: weight must be a contiguous fp16 or bf16 (N, K) tensor")
    x2, b = _rows(x, K), _f32(bias)
    y = torch.empty(x2.shape[0], N)
    _lib().w16_gemv(x2.data_ptr(), weight.data_ptr(), _ptr(b), y.data_ptr(), x2.shape[0], N, K,
                    0 if weight.dtype == torch.float16 else 1)
    return _out(y, x, N)


def is_kmajor(weight: Tensor) -> bool:
    """Whether an (N, K) weight is stored K-major (w.t() contiguous: Transformer.decode_layout's layout)."""
    return weight.dim() == 2 and weight.t().is_contiguous()


def f32_rows_gemm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + b for W (N, K) fp32, x (..., K) with at most MAX_M rows; every weight read once for all rows
    (MKL's sgemm costs about one GEMV per row at 2-8 rows on this AVX2 CPU). W contiguous (N-major: a dot per
    output) or K-major (W.t() contiguous, Transformer.decode_layout's layout: rank-1 updates of 16-column tiles)."""
    N, K = weight.shape
    kmajor = is_kmajor(weight)
    if weight.dtype != torch.float32 or not (kmajor or weight.is_contiguous()):
        raise ValueError("f32_rows_gemm: weight must be an fp32 (N, K) tensor, contiguous or K-major (w.t() is)")
    x2, b = _rows(x, K), _f32(bias)
    y = torch.empty(x2.shape[0], N)
    fn = _lib().f32_kmajor_gemm if kmajor else _lib().f32_nmajor_gemm
    fn(x2.data_ptr(), weight.data_ptr(), _ptr(b), y.data_ptr(), x2.shape[0], N, K)
    return _out(y, x, N)


def f32_rows_plan(weight: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """f32_rows_gemm bound to one weight: its checks done and its pointers taken once, so each call is a ctypes
    call on x's rows (a speculative verify pass runs ~100 of them; the per-call checks of f32_rows_gemm cost
    more than the F.linear dispatch they replace). The returned run(x) takes a contiguous fp32 x (..., K) of
    1..MAX_M rows -> (..., N) fp32. The weight must not move while the plan is in use (it keeps it alive)."""
    N, K = weight.shape
    kmajor = is_kmajor(weight)
    if weight.dtype != torch.float32 or not (kmajor or weight.is_contiguous()):
        raise ValueError("f32_rows_plan: weight must be an fp32 (N, K) tensor, contiguous or K-major (w.t() is)")
    b = _f32(bias)
    fn = _lib().f32_kmajor_gemm if kmajor else _lib().f32_nmajor_gemm
    w_ptr, b_ptr = weight.data_ptr(), _ptr(b)

    def run(x: Tensor) -> Tensor:
        M = x.numel() // K
        if x.shape[-1] != K or x.dtype != torch.float32 or not x.is_contiguous() or not 0 < M <= MAX_M:
            raise ValueError(f"f32_rows_plan: x must be contiguous fp32 (..., {K}) with 1..{MAX_M} rows")
        y = torch.empty(x.shape[:-1] + (N,))
        fn(x.data_ptr(), w_ptr, b_ptr, y.data_ptr(), M, N, K)
        return y

    run.weight, run.bias = weight, b  # alive as long as the plan
    return run
