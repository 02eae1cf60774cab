"""µP, the maximal-update parametrisation (Yang et al. 2022, Tensor Programs V), for AdamW, and its coordinate check.

With m = n_embd / mup_base_width (the width multiplier; µP equals the standard parametrisation at m = 1):
  hidden matrices (attention, MLP, experts: fan-in grows with width)  init std x 1/sqrt(m),  AdamW lr x 1/m
  embeddings, LM head, norms, biases, the MoE router                   init and lr unchanged
  logits                                                               x 1/m   (ModelConfig.output_mult)
  attention scores q.k / sqrt(D)                                       x sqrt(D_base / D), i.e. q.k / D scaled
                                                                       to match at the base head dim (attn_mult)
Then an AdamW update moves every layer's pre-activations by O(1) whatever the width, so the learning rate
that is best at the base width stays best at m > 1. The init rescale multiplies the drawn weights (no extra
RNG draws); it is skipped on resume and with --init-from. With --optimizer muon, µP sets the init and the
multipliers, while the Muon matrices keep Muon's own shape scale (sqrt(out / in)), already width-aware.

`activation_rms` is the coordinate check's measurement: the RMS of each layer's output (attention, MLP,
block, logits) on one batch, via forward hooks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from llm.config import ModelConfig, TrainConfig


def width_mult(mcfg: ModelConfig, tcfg: TrainConfig) -> float:
    return mcfg.n_embd / tcfg.mup_base_width


def configure(mcfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
    """The model config with µP's multipliers when --mup (the head count is kept, so D grows with the width)."""
    if not tcfg.mup:
        return mcfg
    m = width_mult(mcfg, tcfg)
    return replace(mcfg, output_mult=1.0 / m, attn_mult=1.0 / math.sqrt(m))


def hidden_params(model: nn.Module) -> set[int]:
    """ids of the matrices whose fan-in grows with the width: the 2-D/3-D weights of the blocks except the router."""
    return {id(p) for n, p in model.blocks.named_parameters() if p.dim() >= 2 and "router" not in n}


@torch.no_grad()
def scale_init(model: nn.Module, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Hidden matrices' init std x 1/sqrt(m) (in place; no RNG draws)."""
    if not tcfg.mup:
        return
    s = 1.0 / math.sqrt(width_mult(mcfg, tcfg))
    hidden = hidden_params(model)
    for p in model.parameters():
        if id(p) in hidden:
            p.mul_(s)


def lr_groups(model: nn.Module, mcfg: ModelConfig, tcfg: TrainConfig) -> list[dict]:
    """AdamW groups under µP: hidden matrices at lr / m (decayed), other matrices decayed, vectors not."""
    hidden = hidden_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in hidden], "weight_decay": tcfg.weight_decay,
             "lr_mult": 1.0 / width_mult(mcfg, tcfg)},
            {"params": [p for p in params if id(p) not in hidden and p.dim() >= 2], "weight_decay": tcfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@torch.no_grad()
def activation_rms(model: nn.Module, x: Tensor) -> dict[str, float]:
    """RMS of every block's attention output, MLP output and block output, and of the logits, on tokens x (B, T)."""
    out: dict[str, float] = {}

    def hook(name: str):
        return lambda m, a, y: out.__setitem__(name, y.float().pow(2).mean().sqrt().item())

    hooks = []
    for i, b in enumerate(model.blocks):
        hooks += [b.attn.register_forward_hook(hook(f"attn/{i}")), b.mlp.register_forward_hook(hook(f"mlp/{i}")),
                  b.register_forward_hook(hook(f"block/{i}"))]
    try:
        logits, _ = model(x)
    finally:
        for h in hooks:
            h.remove()
    out["logits"] = logits.float().pow(2).mean().sqrt().item()
    return out
