"""The single switch between Triton kernels and the PyTorch references.

Every op the model computes goes through a function here. `kernels` is one
of:
  "auto"   Triton when the tensors are on CUDA and Triton imports, else torch
  "triton" always Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  "torch"  always the reference in kernels/reference.py
Kernel modules are imported lazily, on first use, so importing the model never
needs Triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

from torch import Tensor

from kernels import reference as ref

KERNEL_CHOICES = ("auto", "triton", "torch")


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(kernels: str, x: Tensor) -> bool:
    """Resolve `kernels` for tensor `x`; raise a clear error if Triton was forced but cannot run."""
    if kernels == "torch":
        return False
    if kernels == "auto":
        return x.is_cuda and triton_available()
    if kernels == "triton":
        if not triton_available():
            raise RuntimeError("kernels='triton' but triton is not installed (pip install triton)")
        if not (x.is_cuda or interpreting()):
            raise RuntimeError("kernels='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run kernels on CPU")
        return True
    raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(f"kernels.{module}"), name)


# ----------------------------------------------------------------------------- ops


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, x):
        return _kernel("rmsnorm", "rms_norm")(x, weight, eps)
    return ref.rms_norm_ref(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6,
                 kernels: str = "auto") -> tuple[Tensor, Tensor]:
    if use_triton(kernels, x):
        return _kernel("rmsnorm", "add_rms_norm")(x, residual, weight, eps)
    return ref.add_rms_norm_ref(x, residual, weight, eps)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5,
               kernels: str = "auto") -> Tensor:
    # GPT-2 classic only; no Triton kernel (torch's fused LayerNorm is already one launch).
    return ref.layer_norm_ref(x, weight, bias, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, x):
        return _kernel("rope", "rope")(x, cos, sin, positions)
    return ref.rope_ref(x, cos, sin, positions)


def swiglu(gate: Tensor, up: Tensor, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, gate):
        return _kernel("swiglu", "swiglu")(gate, up)
    return ref.swiglu_ref(gate, up)


def gelu(x: Tensor, kernels: str = "auto") -> Tensor:
    return ref.gelu_ref(x)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0, kernels: str = "auto") -> Tensor:
    """Mean CE of (x @ weight.T) against targets; the Triton path never holds the (N, V) logits."""
    if use_triton(kernels, x):
        return _kernel("cross_entropy", "linear_cross_entropy")(x, weight, targets, ignore_index, z_loss)
    return ref.linear_cross_entropy_ref(x, weight, targets, ignore_index, z_loss)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, z_loss: float = 0.0,
                  kernels: str = "auto") -> Tensor:
    return ref.cross_entropy_ref(logits, targets, ignore_index, z_loss)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
              window: int | None = None, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, q):
        return _kernel("attention", "attention")(q, k, v, causal, scale, window)
    return ref.attention_ref(q, k, v, causal, scale, window)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                     scale: float | None = None, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, q):
        return _kernel("decode", "decode_attention")(q, k_cache, v_cache, lengths, scale)
    return ref.decode_attention_ref(q, k_cache, v_cache, lengths, scale)


def moe_experts(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_idx: Tensor,
                topk_weight: Tensor, kernels: str = "auto") -> Tensor:
    if use_triton(kernels, x):
        return _kernel("moe", "moe_experts")(x, w_gate, w_up, w_down, topk_idx, topk_weight)
    return ref.moe_experts_ref(x, w_gate, w_up, w_down, topk_idx, topk_weight)
