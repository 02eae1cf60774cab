"""Muon (Jordan et al. 2024, modded-nanogpt): orthogonalised momentum for hidden matrices, AdamW for the rest.

For a hidden weight W (out, in) with gradient G:
    B <- mu * B + G                        momentum buffer
    M  = G + mu * B   (Nesterov)           or B without Nesterov
    O  = NS5(M) ~ U V^T  (M = U S V^T)     five quintic Newton-Schulz iterations
    W <- W - lr_muon * sqrt(max(1, out / in)) * O
so every hidden matrix moves by an update whose singular values are all ~1 (scaled for its shape),
whatever the gradient's spectrum. MoE expert weights (E, F, d) are orthogonalised per expert (NS5
runs batched over the leading dims). Embeddings, the LM head, norms, biases and the MoE router keep
AdamW (decoupled weight decay on matrices only, as llm/train/optim.py), inside the same optimizer so a
checkpoint holds one state dict: Muon's momentum_buffer and AdamW's exp_avg / exp_avg_sq / step.

NS5 (Jordan's coefficients a, b, c = 3.4445, -4.7750, 2.0315) on X = M / ||M||_F:
    A = X X^T;  X <- a X + (b A + c A A) X
maps every singular value sigma >= 2e-3 * ||M||_F into [0.68, 1.21] after 5 steps (measured on widths
16-512; not exactly 1: the coefficients trade exactness for a fast rise of small singular values; ones
far below that threshold stay below the band). It runs in bfloat16 on CUDA
(as modded-nanogpt does) and in fp32 elsewhere, so CPU runs are bit-exact and resumable.

Distributed: under DDP every rank holds the same all-reduced gradient and computes the same update.
Under FSDP2 parameters, gradients and the momentum buffer are DTensors sharded on dim 0; the
momentum is gathered (`full_tensor`, one all-gather per matrix), every rank orthogonalises the full
matrix (redundant compute, exact result), and each keeps its own rows of the update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import distribute_tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_BAND = (0.65, 1.25)  # NS5 output singular values, for input ones >= 2e-3 ||M||_F (tests/test_muon.py)


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of G = U S V^T, batched over leading dims. G (..., m, n) -> same shape and dtype."""
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # ||X||_2 <= ||X||_F = 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def shape_scale(p: Tensor) -> float:
    """sqrt(max(1, out / in)) of each matrix: the update's RMS is then ~1 / sqrt(in) whatever the shape."""
    return math.sqrt(max(1.0, p.size(-2) / p.size(-1)))


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local_rows(update: Tensor, like: Tensor) -> Tensor:
    """`update` (a full tensor) as `like` is laid out: the same DTensor sharding, or itself."""
    if not hasattr(like, "device_mesh"):
        return update
    return distribute_tensor(update, like.device_mesh, like.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """One optimizer over two kinds of groups: {"kind": "muon"} (2-D/3-D hidden weights) and
    {"kind": "adamw"} (the rest). Each group may carry "lr_mult": the trainer sets lr = schedule * lr_mult."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=0.0, kind="adamw", lr_mult=1.0)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group: dict) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            m = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            o = newton_schulz(_full(m), group["ns_steps"])
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(_local_rows(o, p), alpha=-lr * shape_scale(p))

    def _adamw(self, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            if wd:
                p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(p.grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def muon_groups(model: torch.nn.Module, weight_decay: float, muon_lr_mult: float) -> list[dict]:
    """Muon for the 2-D/3-D weights inside the Transformer blocks (attention, MLP, experts) except the MoE
    router; AdamW for the rest (weight decay on its matrices: embeddings, LM head)."""
    blocks = getattr(model, "blocks", None)
    hidden = {id(p) for n, p in blocks.named_parameters() if p.dim() >= 2 and "router" not in n} if blocks else set()
    params = [p for p in model.parameters() if p.requires_grad]
    muon = [p for p in params if id(p) in hidden]
    decay = [p for p in params if id(p) not in hidden and p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": muon, "kind": "muon", "lr_mult": muon_lr_mult},
            {"params": decay, "kind": "adamw", "weight_decay": weight_decay},
            {"params": no_decay, "kind": "adamw", "weight_decay": 0.0}]
