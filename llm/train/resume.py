"""Continuing a run from its checkpoint: every compatibility check in one place, then the restore.

A resumed run must continue the saved one exactly: the same architecture (run-time fields such as
kernels and dropout may change), the same global batch and data order (the micro-batch is kept; grad_accum
x world size may be remapped across a different number of ranks), and the same dataset (by fingerprint).
What is restored here comes from trainer.json (written by `trainer.Run.save`) and optimizer.safetensors;
the weights are loaded by the trainer before the model is wrapped. `rollback` is the same restore in the middle
of a run (the loss-spike rollback of llm/train/health.py's detector), into the live, wrapped model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch
from torch.distributed.tensor import distribute_tensor

from llm import checkpoint as ckpt_io
from llm import lora, peft, tp_layout
from llm.config import ConfigError, ModelConfig, TrainConfig
from llm.train import dcp as dcp_io
from llm.train import distributed as dd


def check_resume(src: Path, state: dict, mcfg: ModelConfig, tcfg: TrainConfig, world: int, data_id: str,
                 say: Callable[[str], None]) -> None:
    """Raise ConfigError unless the run configured now continues checkpoint `src` (its trainer `state`) exactly."""
    was_model = ckpt_io.read_config(src)["model"]
    default = {f.name: f.default for f in fields(ModelConfig)}  # fields added since the checkpoint was written
    diff = sorted(k for k, v in mcfg.architecture().items() if was_model.get(k, default[k]) != v)
    if diff:
        raise ConfigError(f"--resume: the model config differs from the checkpoint's ({src}): {', '.join(diff)}")
    was, was_world = state["train"], state.get("world", 1)
    A, W = tcfg.grad_accum, world
    if was["batch_size"] != tcfg.batch_size or was["grad_accum"] * was_world != A * W:
        raise ConfigError(
            f"--resume: the batch changed (checkpoint: micro-batch {was['batch_size']} x {was['grad_accum']} "
            f"accumulation x {was_world} rank(s); now {tcfg.batch_size} x {A} x {W}); the data order "
            "would not continue exactly: keep the micro-batch and accumulation x world size, or start a new run")
    if state.get("data", {}).get("fingerprint") not in (None, data_id):
        raise ConfigError(f"--resume: the dataset differs from the checkpoint's ({state['data'].get('path')}); "
                          "resume with the same --dataset, or start a new run")
    if ckpt_io.is_sharded(src):
        kind = lambda w, fsdp: "1 process" if w == 1 else f"{w} ranks {'FSDP2' if fsdp else 'DDP'}"  # noqa: E731
        was_kind, now_kind = kind(was_world, was.get("fsdp")), kind(W, tcfg.fsdp)
        if was_kind != now_kind:
            say(f"resume: sharded checkpoint written by {was_kind}, read resharded by torch.distributed.checkpoint "
                f"for {now_kind}")
    if state.get("tp", 1) != tcfg.tp:
        say(f"resume: tensor parallel {state.get('tp', 1)} -> {tcfg.tp} " + (
            "(sharded: wqkv's rows regrouped on the way in)" if ckpt_io.is_sharded(src) else
            "(the checkpoint holds full tensors in the one-process layout)"))
    if was_world != W:
        extra = "; ranks beyond the saved ones get fresh RNG streams" if W > was_world else ""
        say(f"resume: remapped from {was_world} to {W} rank(s) with grad_accum {was['grad_accum']} -> "
            f"{A}: same global batch and data order{extra}")


def restore(src: Path, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, d: dd.Dist, tcfg: TrainConfig) -> tuple[int, str | None, float, int]:
    """Load the optimizer, scaler and this rank's RNG state; (step, wandb run id, best val loss, skipped steps).

    A rank the checkpoint has no RNG state for (the world grew) seeds a fresh stream, seed + rank.
    """
    if ckpt_io.is_sharded(src):  # the weights too: every rank reads its part of every saved shard (resharding)
        dcp_io.load_live(src, model, optimizer, d, state.get("optimizer_groups", []))
        first = d.dp_rank * state.get("tp", 1)  # the first saved rank of this data-parallel rank's TP group
        rng = (dcp_io.read_rank_state(src, first) or {}).get("rng")
    else:
        to_live = partial(tp_layout.to_live, cfg=model.cfg, tp=d.tp) if d.tp > 1 else None
        dd.load_optimizer_state(model, optimizer, ckpt_io.read_optimizer_state(src), tcfg.fsdp or d.tp > 1, to_live)
        rngs = state.get("rng") or []  # one per saved rank; the ranks of a saved TP group hold the same state
        first = d.dp_rank * state.get("tp", 1)  # the first saved rank of this data-parallel rank's group
        rng = rngs[first] if d.dp_rank < state.get("world", 1) and first < len(rngs) else None
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if rng is not None:
        dd.set_rng_state(rng, d.device)
    else:
        torch.manual_seed(tcfg.seed + d.dp_rank)
    return state["step"], state.get("wandb_run_id"), state.get("best_val") or math.inf, state.get("skipped", 0)


def rollback(src: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             d: dd.Dist, tcfg: TrainConfig) -> int:
    """Put the live model, optimizer, scaler and RNG back to checkpoint `src` in place (the wrapped model and the
    optimizer keep their parameter objects); returns its step. Every rank reads the full tensors; FSDP2 shards keep
    their own rows. A PEFT run's checkpoint holds only the adapter (its frozen base never changed): that is read.
    A sharded checkpoint is read by `restore` (DCP, each rank its own part)."""
    if ckpt_io.is_sharded(src):
        return restore(src, ckpt_io.read_trainer_state(src), model, optimizer, scaler, d, tcfg)[0]
    full = (src / ckpt_io.MODEL_FILE).is_file()
    weights = src / (ckpt_io.MODEL_FILE if full else lora.ADAPTER_FILE)
    tensors, _ = ckpt_io.read_tensors(weights, device=str(d.device))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            name = k if full else peft.tensor_name(k)  # state-dict name -> the name it was saved under
            if name in tensors:
                t = tp_layout.to_live(name, tensors[name], model.cfg, d.tp).to(v.dtype)
                v.copy_(distribute_tensor(t, v.device_mesh, v.placements, src_data_rank=None)
                        if hasattr(v, "device_mesh") else t)
    state = ckpt_io.read_trainer_state(src)
    step, _, _, _ = restore(src, state, model, optimizer, scaler, d, tcfg)
    return step
