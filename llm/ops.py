"""The single switch between Triton kernels and the PyTorch references.

Every op the model computes goes through a function here, and `resolve` is the one place that
turns a `kernels` setting into a choice:
  "auto"   Triton when the tensors are on CUDA and Triton imports, else torch
  "triton" always Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  "torch"  always the reference in kernels/reference.py
Kernel modules are imported lazily, on first use (a plain import inside the Triton branch), so
importing the model never needs Triton. Weight-only quantized linears have a third route on CPU:
torch's own weight-only kernels (int8_linear / int4_linear). LayerNorm and GELU (GPT-2 classic only) have no Triton
kernel: torch's fused ops already run them in one launch.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from kernels import cpu_gemv, cpu_prefill
from kernels import reference as ref

KERNEL_CHOICES = ("auto", "triton", "torch")


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(kernels: str, device: torch.device | str, dtype_ok: bool = True) -> bool:
    """Whether `kernels` runs Triton for tensors on `device`; a clear error if Triton was forced but cannot run.
    dtype_ok: the op's kernel runs the tensors' dtype on that device; when it does not, "auto" and
    "triton" both take the reference (fp32 attention has no GPU kernel; "triton" forces Triton for
    every op that has one for the dtype)."""
    if kernels == "torch":
        return False
    on_cuda = torch.device(device).type == "cuda"
    if kernels == "auto":
        return on_cuda and triton_available() and dtype_ok
    if kernels == "triton":
        if not dtype_ok:
            return False
        if not triton_available():
            raise RuntimeError("kernels='triton' but triton is not installed (pip install triton)")
        if not (on_cuda or interpreting()):
            raise RuntimeError("kernels='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run kernels on CPU")
        return True
    raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")


def use_triton(kernels: str, x: Tensor, dtype_ok: bool = True) -> bool:
    """`resolve` for the device of tensor x (the common CPU answers first: this runs for every op of a step)."""
    if kernels == "torch" or (kernels == "auto" and not x.is_cuda):
        return False
    return resolve(kernels, x.device, dtype_ok)


# Dtypes the attention and decode kernels run on a GPU: their fp32 tiles spill registers at every size
# (and FlashAttention itself is fp16/bf16 only), so fp32 CUDA tensors take the reference (the kernels
# still run fp32 under TRITON_INTERPRET=1 on CPU, which is how the tests check them).
_ATTENTION_GPU_DTYPES = (torch.float16, torch.bfloat16)


def _kernel_dtype_ok(x: Tensor) -> bool:
    """Whether the attention/decode kernels take x's dtype where x lives (any dtype in the interpreter)."""
    return x.dtype in _ATTENTION_GPU_DTYPES or not x.is_cuda or interpreting()


def _attention_triton(kernels: str, x: Tensor) -> bool:
    """`resolve` for the attention family: Triton only for a dtype its kernels run on x's device."""
    return use_triton(kernels, x, dtype_ok=_kernel_dtype_ok(x))


# ----------------------------------------------------------------------------- norms and activations


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, x):
        from kernels.rmsnorm import rms_norm as kernel

        return kernel(x, weight, eps)
    return ref.rms_norm_ref(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6,
                 kernels: str = "auto") -> tuple[Tensor, Tensor]:
    if use_triton(kernels, x):
        from kernels.rmsnorm import add_rms_norm as kernel

        return kernel(x, residual, weight, eps)
    return ref.add_rms_norm_ref(x, residual, weight, eps)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    return ref.layer_norm_ref(x, weight, bias, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kernels: str = "auto") -> Tensor:
    """RoPE of x at `positions` (one call; a forward pass prepares a `Rotary` once for all its layers)."""
    return Rotary(cos, sin, positions, kernels)(x)


class Rotary:
    """RoPE at one forward pass's positions, prepared once and applied in every layer: `rotary(x)` equals
    `kernels.reference.rope_ref(x, cos, sin, positions)`. On the reference route the tables' rows are
    gathered (and widened) here, once, instead of twice per layer (kernels.reference.rope_rows_ref); the
    Triton kernel reads the tables itself."""

    def __init__(self, cos: Tensor, sin: Tensor, positions: Tensor, kernels: str = "auto") -> None:
        self.triton = use_triton(kernels, positions)
        self.cos, self.sin, self.positions = cos, sin, positions
        if not self.triton:
            self.cos2, self.sin2 = ref.rope_rows_ref(cos, sin, positions)

    def __call__(self, x: Tensor) -> Tensor:
        if self.triton:
            from kernels.rope import rope as kernel

            return kernel(x, self.cos, self.sin, self.positions)
        return ref.rope_apply_ref(x, self.cos2, self.sin2)


def swiglu(gate: Tensor, up: Tensor, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, gate):
        from kernels.swiglu import swiglu as kernel

        return kernel(gate, up)
    return ref.swiglu_ref(gate, up)


def gelu(x: Tensor) -> Tensor:
    return ref.gelu_ref(x)


# ----------------------------------------------------------------------------- losses


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0, kernels: str = "auto") -> Tensor:
    """Mean CE of (x @ weight.T) against targets; the Triton path never holds the (N, V) logits."""
    if use_triton(kernels, x):
        from kernels.cross_entropy import linear_cross_entropy as kernel

        return kernel(x, weight, targets, ignore_index, z_loss)
    return ref.linear_cross_entropy_ref(x, weight, targets, ignore_index, z_loss)


def linear_distill(x: Tensor, weight: Tensor, teacher_x: Tensor, teacher_weight: Tensor, targets: Tensor,
                   alpha: float = 0.5, temperature: float = 1.0, kind: str = "kl", ignore_index: int = -100,
                   kernels: str = "auto", compiled: bool = False) -> tuple[Tensor, Tensor]:
    """(loss, [ce, divergence, top-1 agreement]) of a student head against a teacher head, from both hidden
    states (kernels/reference.py `linear_distill_ref` has the math). Neither (N, V) logits tensor is held in full:
    on CUDA the Triton kernel (kernels/distill.py); elsewhere, kernels="auto", the same chunk loop with each chunk's
    rows in PyTorch (row_math="torch"; compiled=True: that row math under torch.compile, as `--compile` runs take
    it). kernels="torch" takes the reference itself (materialized)."""
    if use_triton(kernels, x):
        from kernels.distill import linear_distill as kernel

        return kernel(x, weight, teacher_x, teacher_weight, targets, alpha, temperature, kind, ignore_index)
    if kernels == "auto" and triton_available():  # kernels/distill.py imports triton (a Linux dependency)
        from kernels.distill import linear_distill as chunked

        return chunked(x, weight, teacher_x, teacher_weight, targets, alpha, temperature, kind, ignore_index,
                       row_math="torch-compiled" if compiled else "torch")
    return ref.linear_distill_ref(x, weight, teacher_x, teacher_weight, targets, alpha, temperature, kind,
                                  ignore_index)


def chunk_rows(n_rows: int, d: int, vocab: int) -> int:
    """Rows per chunk of a fused head + loss over `vocab` columns: kernels/cross_entropy.py's rule where Triton
    imports, else all rows in one chunk."""
    if not triton_available():
        return max(1, n_rows)
    from kernels.cross_entropy import chunk_rows as rule

    return rule(n_rows, d, vocab)


def cross_entropy_lse(logits: Tensor, targets: Tensor, ignore_index: int = -100, kernels: str = "auto") -> Tensor:
    """Per-row log-sum-exp (N,) fp32 of logits (N, V), 0 on ignored rows (the vocabulary-parallel loss's first pass)."""
    if use_triton(kernels, logits):
        from kernels.cross_entropy import cross_entropy_lse as kernel

        return kernel(logits, targets, ignore_index)
    return ref.cross_entropy_lse_ref(logits, targets, ignore_index)


def cross_entropy_dlogits(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor | float,
                          ignore_index: int = -100, z_loss: float = 0.0, kernels: str = "auto") -> Tensor:
    """dz of the cross-entropy w.r.t. logits (N, V) for a given lse (N,), times scale; targets outside [0, V)
    have no one-hot term (a vocabulary slice). The Triton path writes dz over the logits in place."""
    if use_triton(kernels, logits):
        from kernels.cross_entropy import cross_entropy_dlogits as kernel

        return kernel(logits, targets, lse, scale, ignore_index, z_loss, out=logits if logits.is_contiguous() else None)
    return ref.cross_entropy_dlogits_ref(logits, targets, lse, scale, ignore_index, z_loss)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, z_loss: float = 0.0,
                  kernels: str = "auto") -> Tensor:
    """Mean CE of logits (N, V) against targets (N,), plus z_loss * mean(lse^2)."""
    if use_triton(kernels, logits):
        from kernels.cross_entropy import cross_entropy as kernel

        return kernel(logits, targets, ignore_index, z_loss)
    return ref.cross_entropy_ref(logits, targets, ignore_index, z_loss)


# ----------------------------------------------------------------------------- attention


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
              window: int | None = None, kernels: str = "auto") -> Tensor:
    if _attention_triton(kernels, q):
        from kernels.attention import attention as kernel

        return kernel(q, k, v, causal, scale, window)
    return ref.attention_ref(q, k, v, causal, scale, window)


def doc_attention(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, causal: bool = True,
                  scale: float | None = None, window: int | None = None, kernels: str = "auto") -> Tensor:
    """Document-masked causal attention over packed rows (segments (B, T): one id per contiguous document)."""
    if _attention_triton(kernels, q):
        from kernels.attention import doc_attention as kernel

        return kernel(q, k, v, segments, causal, scale, window)
    return ref.doc_attention_ref(q, k, v, segments, causal, scale, window)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                     scale: float | None = None, kernels: str = "auto") -> Tensor:
    if _attention_triton(kernels, q):
        from kernels.decode import decode_attention as kernel

        return kernel(q, k_cache, v_cache, lengths, scale)
    return ref.decode_attention_ref(q, k_cache, v_cache, lengths, scale)


def paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
                           scale: float | None = None, window: int | None = None, kernels: str = "auto") -> Tensor:
    if _attention_triton(kernels, q):
        from kernels.paged_decode import paged_decode_attention as kernel

        return kernel(q, k_pool, v_pool, block_table, lengths, scale, window)
    return ref.paged_decode_attention_ref(q, k_pool, v_pool, block_table, lengths, scale, window)


# A compiled CPU decode step (llm/serve/captured.py) of B rows whose block tables span S keys of Hkv x D values
# attends over all of them inside the graph when B * S * Hkv * D is at most this (masked past each row's length:
# fused, no op boundary); beyond it, `paged_attention_to_length`, which reads only the blocks the longest row holds
# but is an opaque call per layer (~0.2 ms here). Forward ms, tiny preset (Hkv x D = 96), 1 thread, inline /
# opaque: B=8 S=128 1.45 / 2.6; B=1 S=512 0.80 / 1.68; B=1 S=2048 1.30 / 1.31; B=8 S=512 3.50 / 2.63; B=8 S=2048
# 9.7 / 2.6: the full-width gather costs ~1 ns per value, equal to the op's overhead at 2048 x 96 values
# (benchmarks/NOTES.md "Captured decode step").
STATIC_INLINE_VALUES = 2048 * 96


@torch.library.custom_op("llm::paged_attention_to_length", mutates_args=())
def paged_attention_to_length(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
                              window: int | None = None) -> Tensor:
    """`paged_decode_attention_ref` over the first ceil(max(lengths) / block_size) blocks of each row's table only
    (the keys past them are masked anyway) -> (B, Tq, H, D). An opaque op to torch.compile (its fake is q's shape),
    so a compiled decode step keeps its static shapes while the work follows the longest row, not the table's
    width (vLLM's piecewise graphs leave attention out for the same reason). It reads lengths on the host: CPU
    only (under a CUDA graph that read would be a sync)."""
    nb = max(1, -(-int(lengths.max()) // k_pool.shape[1]))
    return ref.paged_decode_attention_ref(q, k_pool, v_pool, block_table[:, :nb], lengths, window=window)


@paged_attention_to_length.register_fake
def _(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
      window: int | None = None) -> Tensor:
    return torch.empty_like(q)


def _segmented_paged(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, lengths: Tensor,
                     window: int | None, segments: list[tuple[int, int]]) -> Tensor:
    """q (N, 1, H, D), one row per token; rows r0 .. r0 + n - 1 of a segment are one sequence's consecutive
    tokens (same block table, lengths ascending by one) -> (N, 1, H, D) through `paged_decode_attention_ref`."""
    out = torch.empty_like(q)
    singles = [r0 for r0, n in segments if n == 1]
    if singles:
        idx = torch.tensor(singles, device=q.device)
        nb = -(-int(lengths[idx].max()) // k_pool.shape[1])  # their own blocks only, not a long prefill's table
        out[idx] = ref.paged_decode_attention_ref(q[idx], k_pool, v_pool, block_table[idx, :nb], lengths[idx],
                                                  window=window)
    for r0, n in segments:
        if n > 1:  # the segment as one row of n queries; its length counts all n new tokens
            nb = -(-int(lengths[r0 + n - 1]) // k_pool.shape[1])
            o = ref.paged_decode_attention_ref(q[r0:r0 + n].transpose(0, 1), k_pool, v_pool,
                                               block_table[r0:r0 + 1, :nb], lengths[r0 + n - 1:r0 + n], window=window)
            out[r0:r0 + n] = o.transpose(0, 1)
    return out


# A few-row pass (Transformer.few_rows) with rows at one length attends with few_query_attention_ref for up to this
# many new tokens: on hf-16x1024's shapes (16 heads, 8 KV heads, 131 keys, 1 thread) the `attention` route (SDPA
# with a (T, S) mask) cost 1.2-1.6x it at T = 3-5 (benchmarks/NOTES.md, "Speculative decoding, session 6").
FEW_QUERIES = 8


def kv_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, host_lengths: list[int] | None,
                 window: int | None = None, kernels: str = "auto", block_table: Tensor | None = None,
                 segments: list[tuple[int, int]] | None = None, few: bool = False) -> Tensor:
    """Attention of q (B, T, H, D) over each row's KV cache -> (B, T, H, D): the one place that picks how.

    k_cache, v_cache (B, S_max, Hkv, D) hold the T new entries already; lengths (B,) counts each row's
    valid entries including them (on the device); host_lengths is the same on the host, or None inside
    a static step (compiled or captured), which must not read host state. Query t of row b sits at
    lengths[b] - T + t (the definition is `kv_attention_ref`); every route below equals it:
      static step            the Triton decode kernel for T = 1 without a window (sync-free, so a CUDA
                             graph captures it; not under torch.compile), else the reference over every
                             slot (shape-static, it compiles into the step)
      rows at one length,    the reference route (CPU decode): `one_query_attention_ref` over the valid
      T = 1, no window       prefix, no mask and no sync; a Triton route goes on to `decode_attention`
      rows at one length,    `few_query_attention_ref` over the valid prefix (two batched matmuls, the last
      2 <= T <= FEW_QUERIES, T scores masked in place), when the caller says `few` (a few-row pass:
      no window, `few`       Transformer.few_rows, the speculative verify pass); other passes keep the next route
      rows at one length,    `attention` over the valid keys: its bottom-right causal alignment is this
      T > 1 or a window      mask (with a window only the last w + T - 1 keys); one (T, S) mask, not one per row
      otherwise, no window   `decode_attention` (decode steps; ragged rows)
      ragged and windowed    the reference over the first max(lengths) slots
    With a block_table (B, max_blocks) the caches are a paged pool (n_blocks, block_size, Hkv, D)
    (`llm.paged_cache`): every call goes to `paged_decode_attention` (the Triton paged kernel, any T,
    windows included, or its reference, which gathers each row's blocks). A ragged paged batch
    (`PagedKVCache.ragged`: T = 1, one row per new token) names its `segments`, (first row, count) of
    each sequence's consecutive tokens: the kernel takes the token rows as they are; the reference, which
    would gather a sequence's blocks once per token, runs once per segment of a prefill (its tokens as
    one row of T queries) and once for all one-token segments together (`_segmented_paged`). A static paged
    view (`PagedKVCache.static_rows`, host_lengths None, no segments: a compiled or captured decode step) takes,
    on the CPU when rows x table keys x Hkv x D exceed STATIC_INLINE_VALUES, `paged_attention_to_length` (the
    reference over the blocks the longest row holds, opaque to torch.compile); otherwise `paged_decode_attention`
    over its whole fixed-width table (the kernel, or the masked reference: both shape-static and sync-free, so
    torch.compile fuses them and a CUDA graph captures them). With
    kernels="auto", fp32 CUDA tensors take the reference on every route (`_kernel_dtype_ok`).
    """
    if block_table is not None:
        if segments is not None and not _attention_triton(kernels, q):
            return _segmented_paged(q, k_cache, v_cache, block_table, lengths, window, segments)
        if (host_lengths is None and q.device.type == "cpu" and not _attention_triton(kernels, q)
                and q.shape[0] * block_table.shape[1] * math.prod(k_cache.shape[1:]) > STATIC_INLINE_VALUES):
            return paged_attention_to_length(q, k_cache, v_cache, block_table, lengths, window)
        return paged_decode_attention(q, k_cache, v_cache, block_table, lengths, window=window, kernels=kernels)
    T = q.shape[1]
    if host_lengths is None:
        if window is None and T == 1 and _attention_triton(kernels, q) and not torch.compiler.is_compiling():
            return decode_attention(q, k_cache, v_cache, lengths, kernels=kernels)
        return ref.kv_attention_ref(q, k_cache, v_cache, lengths, window)
    lo, hi = min(host_lengths), max(host_lengths)
    if lo == hi and T == 1 and window is None and not _attention_triton(kernels, q):
        return ref.one_query_attention_ref(q, k_cache[:, :hi], v_cache[:, :hi])  # every key visible: no mask
    if few and lo == hi and 1 < T <= min(FEW_QUERIES, hi) and window is None and not _attention_triton(kernels, q):
        return ref.few_query_attention_ref(q, k_cache[:, :hi], v_cache[:, :hi])
    if lo == hi and (T > 1 or window is not None):
        s0 = 0 if window is None else max(0, hi - T - window + 1)
        return attention(q, k_cache[:, s0:hi], v_cache[:, s0:hi], causal=True, window=window, kernels=kernels)
    if window is None:
        return decode_attention(q, k_cache, v_cache, lengths, kernels=kernels)
    return ref.kv_attention_ref(q, k_cache[:, :hi], v_cache[:, :hi], lengths, window)


# ----------------------------------------------------------------------------- mixture of experts


def moe_experts(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor,
                topk_weight: Tensor, kernels: str = "auto") -> Tensor:
    """sum_j w_j * Expert_{e_j}(x): the grouped-GEMM Triton kernel, or the reference loop over experts."""
    if use_triton(kernels, x):
        from kernels.moe import moe_experts as kernel

        return kernel(x, w_gate, w_up, w_down, topk_idx, topk_weight)
    return ref.moe_experts_ref(x, w_gate, w_up, w_down, topk_idx, topk_weight)


# ----------------------------------------------------------------------------- fp32 linears, a few CPU rows

def n_rows(x: Tensor) -> int:
    """Rows of x (..., K): the number of vectors a linear multiplies (decode: the batch; prefill: batch x tokens)."""
    return x.numel() // max(1, x.shape[-1])


# A speculative verify pass feeds the target 1 + K ids: K + 1 rows against every weight. On this AVX2 CPU MKL's
# sgemm costs about one GEMV per row at 2-8 rows (1.7-3.4x a single-row GEMV on the 16x1024 shapes), so the
# pass cost ~K + 1 decode steps and speculation could not win. kernels/cpu_gemv.c's f32_*major_gemm read each
# fp32 weight once for all rows (either layout Transformer.decode_layout leaves); measurements in
# benchmarks/NOTES.md ("Draft-model speculative decoding, session 5"). One row stays on MKL's GEMV.
CPU_F32_MAX_M = 8


def f32_rows_linear_plan(weight: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """linear(x) = F.linear(x, weight, bias) for one weight, except 2..CPU_F32_MAX_M contiguous fp32 CPU rows
    against an fp32 CPU weight, contiguous or K-major (no autograd, not under torch.compile, the C kernels built):
    kernels/cpu_gemv.py's f32_rows_plan, every weight read once for all rows. Same math, fp32 sums. The weight's
    checks run once, here (Transformer.few_rows prepares one per linear: a verify pass calls ~100 linears, and
    per-call checks cost more than F.linear's dispatch); each call checks only x."""
    gemm = None
    if (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and (cpu_gemv.is_kmajor(weight) or weight.is_contiguous()) and cpu_gemv.available()):
        gemm = cpu_gemv.f32_rows_plan(weight, bias)

    def linear(x: Tensor) -> Tensor:
        if (gemm is not None and 1 < n_rows(x) <= CPU_F32_MAX_M and x.dtype == torch.float32 and x.is_cpu
                and x.is_contiguous() and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return gemm(x)
        return torch.nn.functional.linear(x, weight, bias)

    return linear


# ----------------------------------------------------------------------------- weight-only quantized linears

# CPU decode rows (up to CPU_WOQ_MAX_M) take kernels/cpu_gemv.py: C GEMVs that read each int8 / int4 code once and
# multiply it in registers (activations rounded to int16 / int8 per block, exact int32 sums, fp32 scaling). Under
# torch.compile they are the custom ops cpu_int8_gemv / cpu_int4_gemv below (opaque to the graph, which fuses the
# rest of the step around them; a bare ctypes call would break the graph). Where no C compiler built them,
# torch's own weight-only kernels (aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu) take the rows:
# vectorized for bf16 activations only (on this AVX2 CPU fp32 activations ran 10x slower than fp32 F.linear), so
# x is rounded to bf16 and the result cast back. Longer inputs (prefill) dequantize a block of output rows at a time
# into one reused fp32 buffer and run one GEMM per block (kernels/cpu_prefill.py: ~5x the whole-weight reference
# for int4 at 128 rows). Measurements: benchmarks/NOTES.md (issues 21 and 32).
CPU_WOQ_MAX_M = 8


@cache
def _torch_cpu_op(name: str) -> bool:
    """Whether the installed torch has the CPU weight-only kernel `torch.ops.aten.<name>`."""
    return hasattr(torch.ops.aten, name)


def _cpu_rows(kernels: str, x: Tensor) -> bool:
    return kernels == "auto" and x.device.type == "cpu" and n_rows(x) <= CPU_WOQ_MAX_M


def _cpu_gemv(kernels: str, x: Tensor) -> bool:
    """The C GEMVs serve these rows: CPU decode and the library built."""
    return _cpu_rows(kernels, x) and cpu_gemv.available()


@torch.library.custom_op("llm::cpu_int8_gemv", mutates_args=())
def cpu_int8_gemv(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """kernels.cpu_gemv.int8_gemv as an op torch.compile keeps whole: x (..., K) -> (..., N) in x's dtype."""
    return cpu_gemv.int8_gemv(x, qweight, scales, bias)


@cpu_int8_gemv.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape[:-1] + (qweight.shape[0],))


@torch.library.custom_op("llm::cpu_int4_gemv", mutates_args=())
def cpu_int4_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                  bias: Tensor | None = None) -> Tensor:
    """kernels.cpu_gemv.int4_gemv as an op torch.compile keeps whole: x (..., K) -> (..., N) in x's dtype."""
    return cpu_gemv.int4_gemv(x, qweight, scales, zeros, group_size, bias)


@cpu_int4_gemv.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
      bias: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape[:-1] + (qweight.shape[0],))


def _cpu_woq(kernels: str, x: Tensor, op: str) -> bool:
    return _cpu_rows(kernels, x) and _torch_cpu_op(op)


def _cpu_prefill(kernels: str, x: Tensor) -> bool:
    """Other CPU inputs (prefill, or decode without the C build) dequantize a block of rows per GEMM
    (kernels/cpu_prefill.py) in eager mode; under torch.compile the reference is traced (inductor fuses it)."""
    return kernels == "auto" and x.device.type == "cpu" and not torch.compiler.is_compiling()


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
                kernels: str = "auto") -> Tensor:
    """x @ (q * s[:, None]).T + b for an int8 per-channel weight q (N, K): the Triton W8A16 kernel; for a few
    CPU rows (see CPU_WOQ_MAX_M) the C GEMV or torch's CPU kernel; else the reference."""
    if use_triton(kernels, x):
        from kernels.quant_matmul import int8_matmul as kernel

        return kernel(x, qweight, scales, bias)
    if _cpu_gemv(kernels, x):
        if torch.compiler.is_compiling():
            return cpu_int8_gemv(x, qweight, scales, bias)
        return cpu_gemv.int8_gemv(x, qweight, scales, bias)  # eager: no dispatcher hop
    if _cpu_woq(kernels, x, "_weight_int8pack_mm"):
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(torch.bfloat16)).float()
        y = y if bias is None else y + bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])
    if _cpu_prefill(kernels, x):
        return cpu_prefill.int8_matmul(x, qweight, scales, bias)
    return ref.int8_matmul_ref(x, qweight, scales, bias)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None = None, kernels: str = "auto", cache: dict | None = None) -> Tensor:
    """x @ dequant(q).T + b for a group-wise int4 weight (kernels/reference.py has the format).

    Triton W4A16 on CUDA; for a few CPU rows the C GEMV (any K: a last group shorter than G included; under
    torch.compile the custom op cpu_int4_gemv), or (no C build) torch's kernel (aten._weight_int4pack_mm_for_cpu)
    when the shape fits it (N % 16 == 0, G divides K); else the reference. torch's kernel wants its own packing: it is
    built on first use and kept in `cache` (a dict the caller owns, one per weight), keyed by the weight's
    storage.
    """
    if use_triton(kernels, x):
        from kernels.quant_matmul import int4_matmul as kernel

        return kernel(x, qweight, scales, zeros, group_size, bias)
    if _cpu_gemv(kernels, x):
        if torch.compiler.is_compiling():
            return cpu_int4_gemv(x, qweight, scales, zeros, group_size, bias)
        return cpu_gemv.int4_gemv(x, qweight, scales, zeros, group_size, bias)  # eager: no dispatcher hop
    N, K = qweight.shape[0], x.shape[-1]
    if (cache is not None and N % 16 == 0 and K % group_size == 0
            and _cpu_woq(kernels, x, "_weight_int4pack_mm_for_cpu")):
        key = (qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr())
        if cache.get("key") != key:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ref.int4_unpack_ref(qweight, K), 1)
            sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/G, N, 2)
            cache.clear()
            cache.update(key=key, packed=packed, scales_zeros=sz)
        x2 = x.reshape(-1, K).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, cache["packed"], group_size, cache["scales_zeros"]).float()
        y = y if bias is None else y + bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], N)
    if _cpu_prefill(kernels, x):
        return cpu_prefill.int4_matmul(x, qweight, scales, zeros, group_size, bias)
    return ref.int4_matmul_ref(x, qweight, scales, zeros, group_size, bias)


# ----------------------------------------------------------------------------- 16-bit weights, fp32 compute

# `--weights f16` (llm/weights16.py) stores the linears' weights in fp16 and computes in fp32: a CPU decode row
# (up to W16_MAX_M rows) takes the C GEMV that widens each fp16 weight in registers (F16C) and accumulates in fp32,
# so a step reads half of fp32's bytes; longer inputs (prefill) widen the weight once per call and run one fp32
# GEMM (the widening costs ~10% of the GEMM at 128 rows; the GEMV re-widens per row and loses above ~4 rows).
W16_MAX_M = 4


@torch.library.custom_op("llm::cpu_w16_gemv", mutates_args=())
def cpu_w16_gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """kernels.cpu_gemv.w16_gemv as an op torch.compile keeps whole: x (..., K) -> (..., N) in x's dtype."""
    return cpu_gemv.w16_gemv(x, weight, bias)


@cpu_w16_gemv.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def w16_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, kernels: str = "auto") -> Tensor:
    """x @ W.T + b for W (N, K) stored fp16 / bf16 and x fp32: the C GEMV for a few CPU rows (under torch.compile
    the custom op cpu_w16_gemv), else the reference (W widened to x's dtype, one GEMM)."""
    if (kernels == "auto" and x.device.type == "cpu" and n_rows(x) <= W16_MAX_M and x.dtype == torch.float32
            and cpu_gemv.available()):
        if torch.compiler.is_compiling():
            return cpu_w16_gemv(x, weight, bias)
        return cpu_gemv.w16_gemv(x, weight, bias)  # eager: no dispatcher hop
    return ref.w16_matmul_ref(x, weight, bias)
