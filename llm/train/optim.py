"""The optimizer and its learning-rate schedule.

--optimizer muon: Muon for the hidden matrices and AdamW for the rest, in one optimizer (llm/train/muon.py).
--optimizer adamw (the default):
AdamW (fused on CUDA) with decoupled weight decay on matrices only (embeddings and linear weights; norms
and biases are not decayed), and a linear warmup then cosine decay of the learning rate to min_lr.
"""

from __future__ import annotations

import math

import torch

from llm.config import TrainConfig
from llm.train import mup
from llm.train.muon import Muon, muon_groups


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps.

    lr(s) = lr * (s + 1) / warmup                                  for s < warmup
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = min(1, (s - warmup) / (max_steps - warmup))
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def schedule_line(t: TrainConfig) -> str:
    """One console line saying what lr_at will do, so a flat schedule (min_lr == lr) is never a surprise."""
    warm = f"warmup {t.warmup_steps} steps to lr {t.lr:.2e}, " if t.warmup_steps else f"lr {t.lr:.2e}, "
    if t.min_lr == t.lr:
        return (f"schedule: {warm}then constant (--min-lr {t.min_lr:.2e} equals --lr: pass a lower --min-lr "
                "for a cosine decay)")
    return f"schedule: {warm}cosine decay to {t.min_lr:.2e} at step {t.max_steps}"


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: weight_decay on those with >= 2 dims, none on the rest; or Muon.

    Groups may carry "lr_mult" (Muon's matrices: muon_lr / lr): the trainer sets each group's lr to
    lr_at(step) * lr_mult, so every group follows the one warmup + cosine schedule.
    """
    if t.optimizer == "muon":
        groups = muon_groups(model, t.weight_decay, t.muon_lr / t.lr)
        return Muon(groups, lr=t.lr, momentum=t.muon_momentum, ns_steps=t.muon_ns_steps, betas=(t.beta1, t.beta2))
    if t.mup:  # µP: the hidden matrices at lr / width multiplier
        return torch.optim.AdamW(mup.lr_groups(model, model.cfg, t), lr=t.lr, betas=(t.beta1, t.beta2),
                                 fused=device.type == "cuda")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")
