"""`llm plan` (= python -m llm.train.plan): does a model train on a given cluster? The trainer's own memory
estimate (the `plan:` line, llm/train/distributed.py `memory_estimate`) for GPUs and model sizes this machine
cannot run.

    llm plan --preset 8b --gpus 8 --gpu-mem 80 [--nodes 2] [--fsdp] [--tp 2]
                             [--batch-size 1] [--block-size 8192] [--activation-checkpointing] [--config FILE.toml]

It prints the estimate for the layout asked for and whether it fits in 90% of --gpu-mem (the trainer's budget
on a GPU), then every layout of the same cluster side by side: DDP or FSDP2 over the data-parallel ranks x TP
degree (dividing a node's GPUs and n_kv_head) x activation checkpointing. The model runs bf16 autocast with the
Triton kernels (flash attention, fused linear cross-entropy) and AdamW, as on a GPU. Exit code: 0 when the
layout asked for fits, 1 when it does not, 2 for bad input.

Tensor parallelism is estimated as the trainer builds it (`llm train --tp N`, llm/train/tp.py, pretraining: the
cross-entropy objective): the block matrices, the embedding and the LM head (split by vocabulary rows, the loss
parallel) and the activations inside attention and the MLP / tp; the norms and the residual stream replicated,
or with --sequence-parallel the residual stream's activations split too. Layouts the
trainer refuses are refused here too: DDP x TP (more than one data-parallel group needs FSDP2), TP of a
Mixture-of-Experts model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch

from llm.config import PRESETS, ConfigError, ModelConfig, build, check_types, load_toml, preset, run_main
from llm.model import Transformer
from llm.train.distributed import fmt_bytes, memory_estimate

USABLE = 0.9  # the trainer's GPU budget: 90% of the free memory (llm/train/distributed.py memory_budget)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Estimate per-GPU training memory for a model and cluster.")
    p.add_argument("--preset", default="8b", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--config", help="TOML file of model settings (as llm train --config); over the preset")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per data-parallel rank")
    p.add_argument("--block-size", type=int, help="sequence length (default: the model's context)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                   help="shard weights, gradients and optimizer state over the data-parallel ranks (FSDP2)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (llm train --tp: see the module doc)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with TP: the residual stream, norms and head on 1/tp of the tokens too (llm train "
                        "--sequence-parallel); applies to the TP rows of the table as well")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block's activations in the backward")
    return p


def model_config(args: argparse.Namespace) -> ModelConfig:
    values = preset(args.preset)
    if args.config:
        file_vals = load_toml(args.config)
        check_types(file_vals, args.config)
        values |= {k: v for k, v in file_vals.items() if k in asdict(ModelConfig())}
    if args.block_size:
        values["block_size"] = args.block_size
    return build(ModelConfig, values)


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the model, built on the meta device (no memory)."""
    with torch.device("meta"):
        return Transformer(cfg).num_params()


def estimate(cfg: ModelConfig, n: int, batch: int, dp: int, fsdp: bool, tp: int, ckpt: bool,
             sp: bool = False) -> tuple[float, float]:
    """(fixed, activation) bytes per GPU: bf16 autocast, flash attention and the fused cross-entropy."""
    return memory_estimate(cfg, n, batch, amp=True, flash=True, fused_ce=True, act_ckpt=ckpt, world=dp,
                           fsdp=fsdp, tp=tp, sp=sp and tp > 1, split_head=True)


def check_tp(cfg: ModelConfig, tp: int, gpus: int) -> str | None:
    """Why `tp` cannot split this model on nodes of `gpus` GPUs, or None."""
    if tp < 1 or gpus % tp:
        return f"--tp {tp} must divide the {gpus} GPUs of a node (TP stays inside a node)"
    if cfg.n_kv_head % tp or cfg.n_head % tp:
        return f"--tp {tp} must divide n_kv_head {cfg.n_kv_head} and n_head {cfg.n_head} (whole heads per rank)"
    if cfg.padded_vocab_size % tp:
        return f"--tp {tp} must divide the padded vocabulary {cfg.padded_vocab_size} (split by rows over the TP ranks)"
    if tp > 1 and cfg.n_experts:
        return "--tp does not shard Mixture-of-Experts layers yet (the trainer refuses it too)"
    return None


def describe(fixed: float, act: float, budget: float) -> str:
    fits = "fits" if fixed + act <= budget else "does NOT fit"
    return (f"per GPU {fmt_bytes(fixed + act)} (weights+grads+AdamW+bf16 copies {fmt_bytes(fixed)}, activations "
            f"{fmt_bytes(act)}) of {fmt_bytes(budget)} usable: {fits}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = model_config(args)
        if min(args.gpus, args.nodes, args.batch_size) < 1 or args.gpu_mem <= 0:
            raise ConfigError("--gpus, --nodes and --batch-size must be >= 1 and --gpu-mem > 0")
        if why := check_tp(cfg, args.tp, args.gpus):
            raise ConfigError(why)
        if args.tp > 1 and not args.fsdp and args.gpus * args.nodes > args.tp:
            raise ConfigError(f"--tp {args.tp} with more than one data-parallel group needs FSDP2 (the trainer "
                              "refuses DDP x TP): drop --no-fsdp")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n, world, budget = count_params(cfg), args.gpus * args.nodes, args.gpu_mem * 2**30 * USABLE
    T, b = cfg.block_size, args.batch_size
    print(f"model: {n / 1e9:.2f}B parameters, {cfg.n_layer} layers, width {cfg.n_embd}, heads {cfg.n_head}/"
          f"{cfg.n_kv_head} (q/kv), MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}, context {T}")
    print(f"cluster: {args.nodes} node(s) x {args.gpus} GPU(s) of {args.gpu_mem:g} GiB = {world} GPU(s)")
    dp = world // args.tp
    fixed, act = estimate(cfg, n, b, dp, args.fsdp, args.tp, args.activation_checkpointing, args.sequence_parallel)
    sp = ", sequence parallel" if args.sequence_parallel and args.tp > 1 else ""
    print(f"plan: {'FSDP2' if args.fsdp else 'DDP'} over {dp} data-parallel rank(s) x TP {args.tp}{sp}, micro-batch "
          f"{b} x {T} tokens, activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
          + describe(fixed, act, budget))
    print(f"\nevery layout of {world} GPU(s), micro-batch {b} x {T} tokens per data-parallel rank:")
    print(f"  {'data parallel':<16}{'TP':>4}  {'act. ckpt':<10}{'per GPU':>12}  fits")
    for fsdp in (False, True):
        for tp in (t for t in (1, 2, 4, 8) if check_tp(cfg, t, args.gpus) is None):
            if tp > 1 and not fsdp and world > tp:
                continue  # DDP x TP: the trainer refuses it
            for ckpt in (False, True):
                f, a = estimate(cfg, n, b, world // tp, fsdp, tp, ckpt, args.sequence_parallel)
                name = f"{'FSDP2' if fsdp else 'DDP'} x {world // tp}"
                print(f"  {name:<16}{tp:>4}  {'on' if ckpt else 'off':<10}{fmt_bytes(f + a):>12}  "
                      f"{'yes' if f + a <= budget else 'no'}")
    print("note: TP as llm train --tp builds it: attention and MLP weights and activations, embedding and LM head "
          "(vocabulary rows, loss parallel) split; norms and the residual stream replicated unless --sequence-parallel")
    return 0 if fixed + act <= budget else 1


if __name__ == "__main__":
    run_main(main)
