"""Tensor parallelism (`--tp N`): Megatron-style column/row sharding of each block with PyTorch's DTensor.

Under torchrun with W ranks and --tp N the ranks form a 2-D DeviceMesh ("dp", "tp") of shape (W/N, N); rank r is
data-parallel rank r // N and tensor-parallel rank r % N. Within a block (Shoeybi et al. 2019):

    attention:  wqkv column-wise (each TP rank: H/N query heads and Hkv/N key/value heads), wo row-wise
    MLP:        w1 (gate) and w3 (up) column-wise, w2 (down) row-wise

applied with `parallelize_module` (ColwiseParallel / RowwiseParallel). The column-wise outputs come back as local
tensors (`use_local_output`), so attention, RoPE and SwiGLU run our ops on this rank's heads / columns, and each
row-wise layer all-reduces its partial sums into a replicated output. Everything else (embedding, norms, the LM
head and its fused cross-entropy) stays replicated: every TP rank of a data-parallel group reads the same batch
and computes the same replicated activations and gradients. Not built yet: sequence parallelism of the norms and
dropout, a row-wise embedding, a vocabulary-parallel head with loss parallelism.

The fused wqkv (rows [q heads; k heads; v heads], llm/model.py) is regrouped at wrap time by `qkv_order` so a
contiguous 1/N of its rows is [q_r; k_r; v_r], this rank's heads of each, and Attention runs with the local head
counts; checkpoints hold today's layout (`to_saved` undoes the regrouping of a gathered tensor, `to_live` redoes
it on load), so a TP checkpoint loads in one process and resumes at another TP degree.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from llm.config import ConfigError, ModelConfig, TrainConfig

QKV = re.compile(r"(^|\.)blocks\.\d+\.attn\.wqkv\.(weight|bias)$")


def check(mcfg: ModelConfig, tcfg: TrainConfig, world: int) -> None:
    """Raise ConfigError (one line) unless --tp tcfg.tp can run this model on `world` ranks."""
    n = tcfg.tp
    if n == 1:
        return
    rules = [(world > 1 and world % n == 0,
              f"--tp {n} needs a torchrun launch whose world size is a multiple of {n} (world size now {world})"),
             (mcfg.n_head % n == 0 and mcfg.n_kv_head % n == 0,
              f"--tp {n} must divide the query heads ({mcfg.n_head}) and the key/value heads ({mcfg.n_kv_head})"),
             (mcfg.intermediate_size % n == 0, f"--tp {n} must divide the MLP width ({mcfg.intermediate_size})"),
             (not mcfg.n_experts, "--tp does not shard Mixture-of-Experts layers yet: drop --tp (or use a dense "
                                  "model, n_experts 0)"),
             (not mcfg.qk_norm, "--tp with qk_norm is not supported yet (its gains would see only local heads)"),
             (world == n or tcfg.fsdp, f"--tp {n} on {world} ranks ({world // n} data-parallel groups) needs --fsdp "
                                       "over the data-parallel dimension (DDP x TP is not supported)"),
             (tcfg.optimizer == "adamw", "--tp trains with AdamW for now: drop --optimizer muon"),
             (not tcfg.compile, "--tp is not tested with --compile yet: drop one of them"),
             (tcfg.checkpoint_format != "sharded" and not tcfg.async_checkpoint,
              "--tp saves single-file checkpoints (gathered on rank 0, today's layout): drop --checkpoint-format "
              "sharded / --async-checkpoint"),
             (tcfg.lora_rank is None and tcfg.peft is None, "--tp is for full training, not PEFT: drop --tp"),
             (not tcfg.eval_tasks, "--eval-tasks scores on rank 0 alone: drop it with --tp")]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(msg)


def qkv_order(cfg: ModelConfig, tp: int) -> Tensor:
    """Row order (a permutation of range((H + 2 Hkv) D)) that regroups wqkv's rows [q; k; v] into tp contiguous
    groups [q_r; k_r; v_r], r < tp, each with H/tp query heads and Hkv/tp key/value heads (D rows per head).

    GQA stays right locally: query head h reads kv head h // (H / Hkv), and rank r's query heads r H/tp + j read
    r Hkv/tp + j // (H / Hkv), its own kv heads."""
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    rows = torch.arange((H + 2 * Hkv) * D).view(H + 2 * Hkv, D)
    q, k, v = rows.split_with_sizes([H, Hkv, Hkv])
    groups = [torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]) for r in range(tp)]
    return torch.cat(groups).reshape(-1)


def to_live(name: str, t: Tensor, cfg: ModelConfig, tp: int) -> Tensor:
    """A full tensor in checkpoint layout -> the TP run's layout (wqkv rows regrouped); others unchanged."""
    return t[qkv_order(cfg, tp).to(t.device)] if tp > 1 and QKV.search(name) else t


def to_saved(name: str, t: Tensor, cfg: ModelConfig, tp: int) -> Tensor:
    """Inverse of to_live: a gathered full tensor of the TP run -> checkpoint layout."""
    if tp == 1 or not QKV.search(name):
        return t
    out = torch.empty_like(t)
    out[qkv_order(cfg, tp).to(t.device)] = t
    return out


def apply(model: nn.Module, mesh) -> None:
    """Shard every block of `model` (in place, before AC / FSDP2) over the 1-D TP mesh `mesh`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp, cfg = mesh.size(), model.cfg
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.wqkv.weight, block.attn.wqkv.bias):
                if p is not None:
                    p.copy_(to_live("blocks.0.attn.wqkv.weight", p.detach().clone(), cfg, tp))
    plan = {"attn.wqkv": ColwiseParallel(), "attn.wo": RowwiseParallel(), "mlp.w1": ColwiseParallel(),
            "mlp.w2": RowwiseParallel()}
    if cfg.mlp == "swiglu":
        plan["mlp.w3"] = ColwiseParallel()
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.n_head, block.attn.n_kv_head = cfg.n_head // tp, cfg.n_kv_head // tp  # this rank's heads
