"""16-bit weights with fp32 compute for CPU decode (`llm sample --weights f16|bf16`, `llm serve --weights`).

A decode step on a CPU is bound by the bytes it reads, and fp32 weights are 4 bytes each. `to_w16` replaces
every Linear in the blocks and the output head by a W16Linear that keeps its weight in 16 bits (fp16: 10
mantissa bits, relative rounding error <= 2^-11 per weight for |w| >= 2^-14; bf16: 7 bits, <= 2^-8) and
computes in fp32: y = x @ widen(W16).T + b, exact products of the rounded weights, fp32 sums (llama.cpp's f16
files, at the same precision). Decode rows go to the C GEMV (kernels/cpu_gemv.c, llm.ops.w16_linear),
which reads half of fp32's bytes; prefill widens each weight once per call for one fp32 GEMM. The token
embedding stays fp32 (a step reads B of its rows); a tied head gets its own 16-bit copy (the model is untied).
Activations, norms, RoPE and the KV cache stay fp32.

The 16 bits are stored as an int16 buffer (the fp16 / bf16 bit pattern): `model.to(dtype)` casts floating
buffers, and it must not undo or re-round the format.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch import Tensor

from llm import ops

FORMATS = {"f16": torch.float16, "bf16": torch.bfloat16}


class WeightsError(ValueError):
    """A --weights request this code cannot serve; the message is one line."""


def check_weights(fmt: str | None, device: torch.device, dtype: torch.dtype, quantize: object = None,
                  lora: object = None) -> None:
    """Refuse, in one line and before any weight is read, a --weights request that cannot run as asked."""
    if fmt is None:
        return
    if fmt not in FORMATS:
        raise WeightsError(f"unknown --weights {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if device.type != "cpu":
        raise WeightsError(f"--weights {fmt} is a CPU decode format (16-bit weights, fp32 compute); on "
                           f"{device.type} use --dtype bfloat16 or float16")
    if dtype != torch.float32:
        raise WeightsError(f"--weights {fmt} computes in fp32: drop --dtype {str(dtype).removeprefix('torch.')} "
                           "(or give --dtype float32)")
    if quantize:
        raise WeightsError(f"--weights {fmt} and --quantize are two weight formats: give one")
    if lora:
        raise WeightsError(f"--weights {fmt} does not combine with --peft/--lora adapters (they wrap fp32 "
                           "Linears); merge the adapter first (llm merge) or drop --weights")


class W16Linear(nn.Module):
    """y = x @ W.T + b with W (N, K) stored in 16 bits, x and y fp32; x (..., K) -> (..., N). Inference only.

    Buffers: bits (N, K) int16 (the fp16 / bf16 pattern), bias (N,) fp32 or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str = "f16", kernels: str = "auto",
                 device=None) -> None:
        super().__init__()
        self.kernels = kernels  # "auto": the C GEMV for CPU decode rows; "torch": always the reference
        if fmt not in FORMATS:
            raise WeightsError(f"unknown 16-bit weight format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("bits", torch.empty(out_features, in_features, dtype=torch.int16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, kernels: str = "auto") -> W16Linear:
        w = lin.weight.detach()
        m = cls(w.shape[1], w.shape[0], lin.bias is not None, fmt, kernels, device=w.device)
        m.bits = w.to(FORMATS[fmt]).contiguous().view(torch.int16)  # round to nearest even, once
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m

    @property
    def weight16(self) -> Tensor:
        """The stored weight (N, K) as fp16 / bf16 (a view of `bits`)."""
        return self.bits.view(FORMATS[self.fmt])

    @property
    def weight(self) -> Tensor:
        """The weight (N, K) widened to fp32 (exact; a new tensor: callers that only read .dtype / .device, such as
        Transformer.new_cache, get fp32, the compute dtype)."""
        return self.weight16.float()

    def forward(self, x: Tensor) -> Tensor:
        return ops.w16_linear(x, self.weight16, self.bias, kernels=self.kernels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def to_w16(model: nn.Module, fmt: str = "f16") -> nn.Module:
    """Replace, in place, every nn.Linear in model.blocks and the output head by a W16Linear (weights rounded to
    `fmt` once); a tied head gets its own copy and the config is untied. Returns the model."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown 16-bit weight format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if getattr(model, "quantization", None):
        raise WeightsError(f"--weights {fmt}: the model is quantized already; load its unquantized source")
    if any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in model.modules()):
        raise WeightsError(f"--weights {fmt}: the model carries adapters (LoRA); merge them first (llm merge)")
    for parent in list(model.blocks.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, W16Linear.from_linear(child, fmt, model.cfg.kernels))
    if type(model.lm_head) is nn.Linear:
        model.lm_head = W16Linear.from_linear(model.lm_head, fmt, model.cfg.kernels)
        model.cfg = replace(model.cfg, tie_embeddings=False)
    model.weights16 = fmt
    return model
