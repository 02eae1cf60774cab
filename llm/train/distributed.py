"""Data parallelism under torchrun, FSDP2 sharding, activation checkpointing, RNG capture, and the memory planner.

Under `torchrun --nproc_per_node=N [--nnodes=M ...] train.py ...` the environment carries RANK,
WORLD_SIZE and LOCAL_RANK; `setup` joins the process group (NCCL on GPUs, gloo on CPU) and
binds each rank to cuda:LOCAL_RANK. Without them everything here is a no-op for one process.

Data order does not depend on the world size: optimizer step s, micro-batch m of rank r reads
global micro-batch (s * A + m) * W + r (A = accumulation steps, W = world size), so 2 ranks x
1 micro-batch see the same batches as 1 rank x 2 micro-batches, and a run may resume with a
different world size as long as A * W (and the micro-batch) stay the same.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llm.config import ConfigError, ModelConfig
from llm.model import Block
from llm.runtime import pick_device
from llm.train import tp as tp_

# ----------------------------------------------------------------------------- process group


@dataclass
class Dist:
    """This process's place in the job: rank among world_size, local_rank on its node, its device, and its
    place on the (data-parallel x tensor-parallel) mesh: ranks r with the same r // tp form one TP group and
    read the same batches (llm/train/tp.py); without --tp every rank is its own data-parallel rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp: int = 1
    sp: bool = False  # sequence parallelism over the TP ranks (llm/train/tp.py split_sequence)
    tp_group: object = None  # the TP ranks' process group (set by `wrap` under --tp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_world(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto", tp: int = 1, sp: bool = False) -> Dist:
    """Join the torchrun process group when launched by torchrun; pick this rank's device. `tp`: the
    tensor-parallel degree (checked by llm.train.tp.check before any work)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    picked = pick_device(device)  # a ConfigError for CUDA without CUDA
    use_cuda = picked.type == "cuda"
    if world > 1:
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        return Dist(rank, world, local, dev, tp, sp)
    return Dist(0, 1, 0, picked)


def env_rank() -> int | None:
    """RANK when launched by torchrun with more than one process, else None."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `t` over ranks (in place)."""
    if d.enabled:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- wrapping


def wrap(model: nn.Module, d: Dist, fsdp: bool, activation_checkpointing: bool, compile: bool,
         split_head: bool = False) -> nn.Module:
    """The module to call in the training step: TP (d.tp > 1) -> AC on each block -> FSDP2 / DDP -> torch.compile.

    `model` itself stays usable for evaluation and saving (TP and FSDP2 shard it in place; DDP wraps it). With
    TP, FSDP2 shards over the mesh's "dp" dimension (2-D: each TP shard is sharded again across dp); `split_head`:
    TP splits the LM head by vocabulary rows too, loss parallel (llm.train.tp.splits_head).
    """
    mesh = None
    if d.tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(d.device.type, (d.dp_world, d.tp), mesh_dim_names=("dp", "tp"))
        tp_.apply(model, mesh["tp"], d.sp, split_head)
        d.tp_group = mesh["tp"].get_group()
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=lambda m: isinstance(m, Block))
    fwd = model
    if d.enabled and fsdp and d.dp_world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dp = mesh["dp"] if mesh is not None else init_device_mesh(d.device.type, (d.world,))
        for block in model.blocks:
            fully_shard(block, mesh=dp)
        fully_shard(model, mesh=dp)
    elif d.enabled and d.tp == 1:
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return torch.compile(fwd) if compile else fwd


def grad_sync(fwd: nn.Module, model: nn.Module, sync: bool, d: Dist, fsdp: bool):
    """Context for one micro-batch's backward: gradient all-reduce only on the last micro-batch."""
    import contextlib

    if d.enabled and fsdp and d.dp_world > 1:
        model.set_requires_gradient_sync(sync)
    elif d.enabled and d.tp == 1 and not sync:
        ddp = getattr(fwd, "_orig_mod", fwd)
        return ddp.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for parameters that mix DTensors (TP shards, possibly on several meshes) and plain
    replicated tensors: the global L2 norm sqrt(sum over groups |g|^2), each DTensor group's norm reduced by
    DTensor itself (full_tensor), then every gradient scaled by min(1, max_norm / (norm + 1e-6)). Returns the
    pre-clip norm (a 0-dim fp32 tensor, equal on every rank)."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    sq = 0.0
    for gs in groups.values():
        n = torch.nn.utils.get_total_norm(gs)
        sq += float(n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    norm = sq ** 0.5
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return torch.tensor(norm, dtype=torch.float32)


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _param_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """FQN -> the integer id torch's Optimizer.state_dict() gives that parameter."""
    ids = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {_clean(n): ids[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


Layout = Callable[[str, torch.Tensor], torch.Tensor]  # (state-dict name, full tensor) -> the same in another layout


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool,
               to_saved: Layout | None = None) -> tuple[dict | None, dict]:
    """(full model state dict or None = use the module, optimizer state dict with integer ids).

    Under FSDP or TP (`fsdp` True: the parameters are DTensors) every rank must call this (it gathers shards); the
    full dicts land on rank 0, each full tensor passed through `to_saved` (TP: wqkv rows back in checkpoint order).
    """
    if not fsdp or not dist.is_initialized():
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not osd:  # ranks > 0 receive empty dicts
        return msd, {"state": {}, "param_groups": []}
    if to_saved is not None:
        msd = {k: to_saved(k, v) for k, v in msd.items()}
        osd = {**osd, "state": {k: {n: to_saved(k, v) if torch.is_tensor(v) and v.dim() else v for n, v in st.items()}
                                for k, st in osd["state"].items()}}
    index = _param_index(model, optimizer)
    state = {index[k]: v for k, v in osd["state"].items()}
    groups = [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]]
    return msd, {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict, fsdp: bool,
                         to_live: Layout | None = None) -> None:
    """Load a full optimizer state dict (integer ids, as saved) into a plain or FSDP / TP-sharded (`fsdp` True)
    optimizer; `to_live` maps each saved full tensor into the run's layout first (TP: wqkv rows regrouped)."""
    if not fsdp or not dist.is_initialized():
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name = {i: k for k, i in _param_index(model, optimizer).items()}
    fix = to_live or (lambda k, v: v)
    full = {"state": {name[int(i)]: {n: fix(name[int(i)], v) if torch.is_tensor(v) and v.dim() else v
                                     for n, v in st.items()} for i, st in osd["state"].items()},
            "param_groups": [{**g, "params": [name[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict:
    """This rank's torch RNG states (CPU, and CUDA when used) as base64 strings."""
    st = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(st["cpu"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(tensor(st["cuda"]), device)


# ----------------------------------------------------------------------------- memory planner


@dataclass
class Plan:
    """Per-rank micro-batch and accumulation for a global batch, with the memory estimate behind it."""

    batch_size: int
    grad_accum: int
    world: int
    block_size: int
    fixed_bytes: float  # parameters + gradients + optimizer (+ autocast weight copies)
    act_bytes: float  # activations of one micro-batch
    budget_bytes: float | None

    @property
    def tokens(self) -> int:
        return self.batch_size * self.grad_accum * self.world * self.block_size

    @property
    def total_bytes(self) -> float:
        return self.fixed_bytes + self.act_bytes

    def describe(self) -> str:
        budget = f" of {fmt_bytes(self.budget_bytes)} available" if self.budget_bytes else ""
        return (f"global batch {self.tokens:,} tokens = {self.world} rank(s) x {self.grad_accum} accumulation x "
                f"{self.batch_size} seqs x {self.block_size} tokens; est. memory per rank {fmt_bytes(self.total_bytes)}"
                f" (weights+grads+AdamW {fmt_bytes(self.fixed_bytes)}, activations {fmt_bytes(self.act_bytes)})"
                f"{budget}")


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_estimate(cfg: ModelConfig, n_params: int, batch: int, amp: bool, flash: bool, fused_ce: bool,
                    act_ckpt: bool, world: int = 1, fsdp: bool = False, tp: int = 1,
                    sp: bool = False, split_head: bool = False) -> tuple[float, float]:
    """(fixed bytes, activation bytes) per rank of one training micro-batch of `batch` sequences.

    fixed = N * (4 weights + 4 grads + 8 AdamW moments) [/ W under FSDP] + 2N autocast copies.
    `world` counts the data-parallel ranks. Tensor parallelism (tp > 1, llm/train/tp.py as built) divides the
    block matrices and an untied token embedding (N_tp = N less the head and norm weights) and the activations
    inside attention and the MLP by tp; the norms, head and the residual stream stay replicated, unless sequence
    parallelism (`sp`) splits those activations too: then every activation below is / tp. `split_head` (TP of the
    cross-entropy objective, llm.train.tp.splits_head): the head and a tied embedding are split by vocabulary rows
    too (only the norms replicated) and the loss's logits are V/tp wide; under SP the loss gathers the rows, so
    its part stays whole.
    Activations per token per layer (s = 2 under autocast, else 4): fp32 residual stream,
    norm outputs 16C; s * 2C linear inputs (replicated under TP); s * (Cq + 2Ckv qkv + Cq + Ckv after RoPE + Cq
    attention output + 3I MLP) (split by TP); attention without a fused kernel adds fp32 q/k/v and 2 * H * T
    scores (split). Activation checkpointing keeps only the 4C block input per layer plus one layer's worth.
    The LM head holds (4 + 4 + s) * V per token unless the fused linear cross-entropy runs.
    """
    s = 2 if amp else 4
    C, H, T, L = cfg.n_embd, cfg.n_head, cfg.block_size, cfg.n_layer
    Cq, Ckv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    inner = cfg.expert_hidden * (cfg.top_k + cfg.n_shared_experts) if cfg.n_experts else cfg.intermediate_size
    mlp = (3 if cfg.mlp == "swiglu" else 2) * inner
    split = s * (2 * Cq + 2 * Ckv + Cq + Ckv + Cq + mlp)
    if not flash:
        split += 4 * (Cq + 2 * Ckv) + 8 * H * T
    rep = 16 * C + s * 2 * C  # replicated by TP without SP
    layer = (rep + split) / tp if sp else rep + split / tp
    split_head = split_head and tp > 1
    vocab = cfg.padded_vocab_size / (tp if split_head else 1)  # the loss's logits columns per rank
    kept, norm, loss = 4 * C * L, 8 * C, 4 * C if fused_ce else (8 + s) * vocab
    if sp:  # the residual stream, norms (and a replicated head's loss) hold 1/tp of the tokens too
        kept, norm, loss = kept / tp, norm / tp, loss if split_head else loss / tp
    per_token = (kept + layer if act_ckpt else layer * L) + norm + loss
    tables = 0 if split_head else 1  # the embedding is split (untied), the head replicated (a tied one whole)
    replicated = (n_params if tp == 1 else
                  min(n_params, cfg.padded_vocab_size * C * tables + (2 * L + 1) * C
                      + (cfg.block_size * C if cfg.pos_emb == "learned" else 0)))
    per_rank = replicated + (n_params - replicated) / tp
    fixed = per_rank * 16 / (world if fsdp else 1) + (2 * per_rank if amp else 0)
    return float(fixed), float(per_token * batch * T)


def memory_budget(device: torch.device) -> float | None:
    """Bytes this rank may use: 90% of the free GPU memory, or 80% of the available RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * 0.9
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024 * 0.8
    except (OSError, StopIteration, ValueError):
        return None


def plan_batch(cfg: ModelConfig, n_params: int, batch_size: int, grad_accum: int, world: int,
               global_tokens: int | None, explicit_batch: bool, budget: float | None, **est) -> Plan:
    """Pick (micro-batch, accumulation) per rank.

    Without global_tokens: the given batch_size x grad_accum per rank. With it: sequences per
    rank = global_tokens / (block_size * world) must be whole; the micro-batch is batch_size when
    given explicitly (it must divide them), else the largest divisor whose estimate fits `budget`.
    `est` are memory_estimate's keyword arguments (amp, flash, fused_ce, act_ckpt, fsdp, tp, sp, split_head).
    """
    T = cfg.block_size

    def plan(b: int, a: int) -> Plan:
        fixed, act = memory_estimate(cfg, n_params, b, world=world, **est)
        return Plan(b, a, world, T, fixed, act, budget)

    if global_tokens is None:
        return plan(batch_size, grad_accum)
    unit = T * world
    if global_tokens < unit or global_tokens % unit:
        lo, hi = max(unit, global_tokens // unit * unit), (global_tokens // unit + 1) * unit
        raise ConfigError(f"--global-batch-tokens {global_tokens:,} must be a multiple of block_size x world size "
                          f"= {T} x {world} = {unit:,} (e.g. {lo:,} or {hi:,})")
    seqs = global_tokens // unit
    if explicit_batch:
        if seqs % batch_size:
            raise ConfigError(f"--batch-size {batch_size} does not divide the {seqs} sequences per rank of "
                              f"--global-batch-tokens {global_tokens:,}; pick a divisor of {seqs}")
        return plan(batch_size, seqs // batch_size)
    divisors = [b for b in range(seqs, 0, -1) if seqs % b == 0]
    for b in divisors:
        p = plan(b, seqs // b)
        if budget is None or p.total_bytes <= budget:
            return p
    return plan(1, seqs)

