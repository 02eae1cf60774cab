"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), the model frozen.

An adapter is a small residual network on a sublayer's output h (..., C):
    h -> h + W_up act(W_down h + b_down) + b_up,   W_down (r, C), W_up (C, r), r = --adapter-dim << C,
with W_up and b_up zero at start, so step 0 is the base exactly. Placement:
    houlsby   two per block: after the attention's output projection and after the MLP (before each residual add)
    pfeiffer  one per block, after the MLP (Pfeiffer et al.'s AdapterFusion configuration: about the same quality
              at half the parameters and half the extra latency)
An `Adapted` module wraps the projection (`attn.wo`, `mlp.w2`) and adds `.adapter.{down,up}.{weight,bias}` to the
state dict; the wrapped projection's own tensors move under `.base.` (frozen, never saved in adapter files).
Adapters are not mergeable: the nonlinearity between W_down and W_up keeps them out of any weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llm.config import ConfigError
from llm.layers import MLP

PLACEMENTS = {"houlsby": ("attn.wo", "mlp.w2"), "pfeiffer": ("mlp.w2",)}


@dataclass
class AdapterConfig:
    dim: int = 16
    placement: str = "houlsby"

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"--adapter-dim must be >= 1 (the bottleneck width), got {self.dim}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--adapter-placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")


class Bottleneck(nn.Module):
    """h (..., C) -> W_up gelu(W_down h + b_down) + b_up (..., C): the adapter's residual branch."""

    def __init__(self, width: int, dim: int, device, dtype) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim, device=device, dtype=dtype)
        self.up = nn.Linear(dim, width, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, 0.0, 1.0 / math.sqrt(width))  # unit-scale bottleneck activations
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.up(F.gelu(self.down(h)))


class Adapted(nn.Module):
    """A projection followed by an adapter: y = base(x); y + adapter(y)."""

    def __init__(self, base: nn.Module, dim: int) -> None:
        super().__init__()
        w = base.scales if hasattr(base, "scales") else base.weight  # QuantLinear: train in its scales' dtype
        self.base = base
        self.adapter = Bottleneck(base.out_features, dim, w.device, w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.adapter(y)


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap the projections cfg.placement names in every block (in place); the caller freezes the base."""
    for i, block in enumerate(model.blocks):
        for path in PLACEMENTS[cfg.placement]:
            if path.startswith("mlp.") and not isinstance(block.mlp, MLP):
                raise ConfigError(f"--peft adapter: block {i} has a Mixture-of-Experts layer, not a dense MLP; "
                                  "adapters sit after a dense MLP's output projection")
            parent, attr = path.rsplit(".", 1)
            setattr(block.get_submodule(parent), attr, Adapted(block.get_submodule(path), cfg.dim))
    return model


def is_adapter(model: nn.Module) -> bool:
    return any(isinstance(m, Adapted) for m in model.modules())
