"""Tensor parallelism (`--tp N`): Megatron-style column/row sharding of each block with PyTorch's DTensor.

Under torchrun with W ranks and --tp N the ranks form a 2-D DeviceMesh ("dp", "tp") of shape (W/N, N); rank r is
data-parallel rank r // N and tensor-parallel rank r % N. Within a block (Shoeybi et al. 2019):

    attention:  wqkv column-wise (each TP rank: H/N query heads and Hkv/N key/value heads), wo row-wise
    MLP:        w1 (gate) and w3 (up) column-wise, w2 (down) row-wise
    embedding:  row-wise (vocabulary rows) when untied

applied with `parallelize_module` (ColwiseParallel / RowwiseParallel). The column-wise outputs come back as local
tensors (`use_local_output`), so attention, RoPE and SwiGLU run our ops on this rank's heads / columns, and each
row-wise layer all-reduces its partial sums into a replicated output. The LM head is split by vocabulary rows too
(Shard(0), ColwiseParallel for its logits) and the cross-entropy is loss-parallel (llm/vocab_parallel.py: each rank
its V/tp rows' logits chunk by chunk, the per-row max / sum-exp / target logit all-reduced), for the cross-entropy
objective (`splits_head`); the others (distillation, DPO, GRPO, reward) read the head weight whole, so there it
stays replicated. The token embedding is split by vocabulary rows (RowwiseParallel) when untied, or tied to a
split head (the same Shard(0) parameter). The norms stay replicated: every TP rank of a data-parallel group reads
the same batch and computes the same replicated activations and gradients. With --sequence-parallel
(`split_sequence`) the residual stream between the sharded layers holds T/tp rows per rank instead (all-gathered
into the column-wise layers, reduce-scattered out of the row-wise ones), so norms and dropout run on 1/tp of the
tokens; the split head gathers the rows for its vocabulary slice and reduce-scatters their gradient.

The fused wqkv (rows [q heads; k heads; v heads], llm/model.py) is regrouped at wrap time by `qkv_order` so a
contiguous 1/N of its rows is [q_r; k_r; v_r], this rank's heads of each, and Attention runs with the local head
counts; single-file checkpoints hold today's layout (`to_saved` undoes the regrouping of a gathered tensor,
`to_live` redoes it on load), so a TP checkpoint loads in one process and resumes at another TP degree; sharded
ones hold the regrouped rows and say the degree (llm/tp_layout.py, llm/train/dcp.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm.config import ConfigError, ModelConfig, TrainConfig
from llm.tp_layout import to_live
from llm.vocab_parallel import VocabSplit


def check(mcfg: ModelConfig, tcfg: TrainConfig, world: int) -> None:
    """Raise ConfigError (one line) unless --tp tcfg.tp can run this model on `world` ranks."""
    n = tcfg.tp
    if tcfg.sequence_parallel and n == 1:
        raise ConfigError("--sequence-parallel splits the sequence over the TP ranks: it needs --tp N > 1")
    if n == 1:
        return
    rules = [(world > 1 and world % n == 0,
              f"--tp {n} needs a torchrun launch whose world size is a multiple of {n} (world size now {world})"),
             (mcfg.n_head % n == 0 and mcfg.n_kv_head % n == 0,
              f"--tp {n} must divide the query heads ({mcfg.n_head}) and the key/value heads ({mcfg.n_kv_head})"),
             (mcfg.intermediate_size % n == 0, f"--tp {n} must divide the MLP width ({mcfg.intermediate_size})"),
             (mcfg.padded_vocab_size % n == 0,
              f"--tp {n} must divide the padded vocabulary ({mcfg.padded_vocab_size}, split by rows over the TP "
              f"ranks): set --pad-vocab-multiple to a multiple of {n}"),
             (not mcfg.n_experts, "--tp does not shard Mixture-of-Experts layers yet: drop --tp (or use a dense "
                                  "model, n_experts 0)"),
             (not mcfg.qk_norm, "--tp with qk_norm is not supported yet (its gains would see only local heads)"),
             (world == n or tcfg.fsdp, f"--tp {n} on {world} ranks ({world // n} data-parallel groups) needs --fsdp "
                                       "over the data-parallel dimension (DDP x TP is not supported)"),
             (not tcfg.compile, "--tp is not tested with --compile yet: drop one of them"),
             (tcfg.lora_rank is None and tcfg.peft is None, "--tp is for full training, not PEFT: drop --tp"),
             (not tcfg.eval_tasks, "--eval-tasks scores on rank 0 alone: drop it with --tp"),
             (not tcfg.sequence_parallel or mcfg.block_size % n == 0,
              f"--sequence-parallel: --tp {n} must divide the context length ({mcfg.block_size})"),
             (not tcfg.sequence_parallel or tcfg.objective == "ce",
              f"--sequence-parallel computes the cross-entropy objective only (not --objective {tcfg.objective})")]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(msg)


def splits_head(tcfg: TrainConfig) -> bool:
    """Whether --tp splits the LM head by vocabulary rows (loss parallel): for the cross-entropy objective, whose
    loss is the model's own (the other objectives read `lm_head.weight` whole)."""
    return tcfg.tp > 1 and tcfg.objective == "ce" and not tcfg.teacher


def apply(model: nn.Module, mesh, sp: bool = False, head: bool = False) -> None:
    """Shard every block of `model` (in place, before AC / FSDP2) over the 1-D TP mesh `mesh`; `sp`: sequence
    parallelism too (`split_sequence`); `head`: the LM head (and a tied embedding) by vocabulary rows, the loss
    parallel (`splits_head`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    tp, cfg = mesh.size(), model.cfg
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.wqkv.weight, block.attn.wqkv.bias):
                if p is not None:
                    p.copy_(to_live("blocks.0.attn.wqkv.weight", p.detach().clone(), cfg, tp))
    seq = Shard(1) if sp else Replicate()  # the layout of the residual stream between the sharded layers
    plan = {"attn.wqkv": ColwiseParallel(input_layouts=seq), "attn.wo": RowwiseParallel(output_layouts=seq),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),  # gather once
            "mlp.w1": ColwiseParallel(), "mlp.w2": RowwiseParallel(output_layouts=seq)}
    if cfg.mlp == "swiglu":
        plan["mlp.w3"] = ColwiseParallel()
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.n_head, block.attn.n_kv_head = cfg.n_head // tp, cfg.n_kv_head // tp  # this rank's heads
    if shards_embedding(cfg, tp, head):  # rows (vocabulary) split; its output all-reduced, or reduce-scattered (SP)
        parallelize_module(model.tok_emb, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=seq))
    if head:  # rows (vocabulary) split: Shard(0); the logits path (no targets) gathers the logits' columns
        parallelize_module(model.lm_head, mesh, ColwiseParallel(input_layouts=seq, output_layouts=Replicate()))
        if cfg.tie_embeddings:  # one parameter again: the embedding's Shard(0) rows are the head's
            model.lm_head.weight = model.tok_emb.weight
        model.vocab_split = VocabSplit(mesh.get_group(), gather_rows=sp)
    if sp:
        split_sequence(model, mesh)


def shards_embedding(cfg: ModelConfig, tp: int, head: bool = True) -> bool:
    """Whether the token embedding is split by vocabulary rows: an untied one, or a tied one when the head is split
    (`head`; a tied embedding is the head, which the other objectives read whole)."""
    return tp > 1 and (not cfg.tie_embeddings or head)


def split_sequence(model: nn.Module, mesh) -> None:
    """Sequence parallelism (Korthikanti et al. 2022) around the sharded blocks: rank r of the TP mesh keeps rows
    [r T/tp, (r+1) T/tp) of the residual stream (B, T/tp, C) from the embedding on, so norms, dropout and the
    residual adds run on 1/tp of the tokens; the column-wise layers all-gather it (Shard(1) -> Replicate), the
    row-wise ones reduce-scatter back. The head and cross-entropy run on the rank's own tokens (its slice of the
    targets; a split head gathers the group's rows for its vocabulary slice, llm/vocab_parallel.py), and the loss
    is scaled by (its counted tokens) / (the group's), so the group's losses sum to the mean over all tokens; the
    replicated weights' gradients are partial sums, added up by `sync_replicated_grads`.
    Under SP the logits path (no targets) of a split head gathers the rows: it returns the whole sequence's logits
    (B, T, V) on every rank (not used in training: SP trains the cross-entropy objective only).
    """
    from torch.distributed.tensor import DTensor

    tp, r = mesh.size(), mesh.get_local_rank()

    def local_rows(module, args, out: Tensor) -> Tensor:  # (..., T, C) -> (..., T/tp, C)
        return out.chunk(tp, dim=-2)[r].contiguous()

    def local_targets(module, args, kwargs):
        targets = kwargs.get("targets", args[1] if len(args) > 1 else None)
        if targets is None:
            return None
        assert len(args) <= 2, "sequence parallelism: pass the model's arguments after targets by keyword"
        local = targets.chunk(tp, dim=1)[r].contiguous()
        n = torch.stack([(local != -100).sum(), (targets != -100).sum()]).float()
        module._sp_scale = n[0] / n[1].clamp_min(1)  # targets are the same on every TP rank: no collective needed
        kwargs["targets"] = local
        return args[:1], kwargs

    def scale_loss(module, args, kwargs, out):
        logits, loss = out
        return (logits, loss * module._sp_scale) if loss is not None else out

    if not isinstance(model.tok_emb.weight, DTensor):  # a row-wise embedding already returns this rank's rows
        model.tok_emb.register_forward_hook(local_rows)
    if model.pos_emb is not None:
        model.pos_emb.register_forward_hook(local_rows)
    model.register_forward_pre_hook(local_targets, with_kwargs=True)
    model.register_forward_hook(scale_loss, with_kwargs=True)


def reshard_grads(model: nn.Module) -> None:
    """Lay every DTensor gradient out as its parameter (a local slice, no communication): DTensor's embedding
    backward returns the row-wise embedding's gradient replicated, V x C on every rank; kept so, it would hold
    tp x the memory of the shard and reach the optimizer, the clip and the health records in another layout."""
    for p in model.parameters():
        g = p.grad
        if g is not None and hasattr(g, "placements") and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def sync_replicated_grads(model: nn.Module, group) -> None:
    """Sequence parallelism: sum over the TP group the gradients of the weights TP does not shard (embedding,
    norms, head: each rank saw only its tokens). FSDP2's dp-sharded ones are summed shard by shard."""
    import torch.distributed as dist

    for p in model.parameters():
        g = p.grad
        if g is None or "tp" in (getattr(getattr(g, "device_mesh", None), "mesh_dim_names", None) or ()):
            continue  # a TP-sharded weight: its gradient is complete
        dist.all_reduce(g.to_local() if hasattr(g, "to_local") else g, group=group)
