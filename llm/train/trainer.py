"""The training loop. `train.py` is only its command-line entry point (llm/train/cli.py).

AdamW (fused on CUDA) with decoupled weight decay on matrices only, linear warmup then cosine
decay to min_lr (llm/train/optim.py), gradient accumulation, bf16 autocast (fp16 with a grad scaler),
global-norm clipping (the norm is logged before clipping), periodic validation, and checkpoints that lose
nothing: atomic, keep-last-N plus best-by-validation, resumed exactly (model, optimizer, step,
scaler, every rank's RNG, data position, wandb run id; checks in llm/train/resume.py), and a final one on
SIGTERM / Ctrl-C. A step whose loss or gradient is NaN/Inf is skipped (the optimizer is untouched) and counted;
max_bad_steps in a row stop the run with the last good checkpoint kept.
Under torchrun it trains data-parallel (DDP, or FSDP2 with --fsdp): see llm/train/distributed.py.

`train` reads top to bottom: `_setup` (data, model, plan, resume, optimizer -> a `Run`), `_loop` (the steps),
`_finish` (the final checkpoint and the summary). `Run` holds the run's state; its methods `one_step`,
`evaluate` and `save` are the three things the loop does to it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from llm import checkpoint as ckpt_io
from llm import loading, lora, ops, peft, tp_layout
from llm.config import ConfigError, DataConfig, ModelConfig, TrainConfig, check_configs, describe_config, to_toml
from llm.data.sft import SFTLoader
from llm.data.shards import Loader, fingerprint, load_manifest
from llm.model import Transformer
from llm.quant import refuse_training
from llm.runtime import pick_dtype
from llm.tokenizer import Tokenizer
from llm.train import dcp as dcp_io
from llm.train import distributed as dd
from llm.train import ema as ema_io
from llm.train import finetune, mup, objectives, tasks, tp
from llm.train.distributed import fmt_bytes
from llm.train.health import Health, SpikeDetector, plot_health
from llm.train.metrics import MetricsLogger, Progress, device_name, fmt_duration, mfu, peak_flops, plot_losses
from llm.train.optim import lr_at, make_optimizer, schedule_line
from llm.train.resume import check_resume, restore, rollback

Say = Callable[..., None]


class TrainingDiverged(RuntimeError):
    """max_bad_steps consecutive non-finite steps; the message names the last good checkpoint."""


class _StopFlag:
    """SIGTERM / first Ctrl-C: stop after the current step with a final checkpoint. Second Ctrl-C: abort."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


# ----------------------------------------------------------------------------- the run's state


@dataclass
class Run:
    """One training run: the pieces `_setup` builds (fixed) and the counters the loop advances.

    `step` counts the optimizer steps done; step s trains on global micro-batches (s * A + m) * W + rank,
    m < A (A = grad_accum, W = world size), so the data order depends only on the global batch A * W.
    """

    d: dd.Dist
    tcfg: TrainConfig                # batch_size and grad_accum as the planner settled them
    dtype: torch.dtype               # autocast dtype; float32 = no autocast
    model: Transformer               # the bare model: weights, stats, checkpoints
    n_params: int                    # counted before the model was wrapped
    fwd: torch.nn.Module             # the model as trained: DDP / FSDP2 / compiled, or the model itself
    objective: objectives.Objective  # what a step optimizes: batches, extra models, loss, metrics
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # enabled for float16 only
    train_loader: Loader | SFTLoader
    val_loader: Loader | SFTLoader
    plan: dd.Plan
    flops_per_token: float
    peak: float | None               # the device's peak FLOP/s for MFU (None: unknown)
    say: Say                         # print on the main rank, nothing on the others
    out: Path
    tok: Tokenizer
    extra: dict                      # the train and data settings saved with every checkpoint
    data_path: Path
    data_id: str                     # the dataset's fingerprint (resume checks it)
    manifest: dict
    start_step: int = 0
    step: int = 0
    best_val: float = math.inf
    skipped: int = 0                 # non-finite steps skipped so far
    loss: float = float("nan")       # the last step's train loss
    val_loss: float | None = None    # the last validation loss
    saved_name: str | None = None    # the checkpoint last written to (or resumed from) out
    adapter: dict | None = None      # LoRA: the adapter config; checkpoints then hold the adapter, not the model
    sharded: dcp_io.ShardedWriter | None = None  # the checkpoint writer: sharded (DCP), or None: single-file
    logger: MetricsLogger = field(init=False)  # opened by _setup after the run is announced (wandb prints)
    health: Health = field(init=False)         # telemetry every health_interval steps (llm/train/health.py)
    spikes: SpikeDetector = field(init=False)  # loss-spike detector (its window is checkpointed)
    data_skip: int = 0               # optimizer steps of data skipped by rollbacks: step s reads step s + data_skip's
    rollbacks: int = 0
    spike_z: float | None = None     # the last step's loss z-score (None: not measured or non-finite)
    health_rec: dict = field(default_factory=dict)  # the gradient / update statistics of the last health step
    metrics: dict = field(default_factory=dict)     # the objective's metrics of the last step
    ema: ema_io.EMA | None = None    # --ema-decay: the moving average of the trained weights

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=self.dtype)

    def one_step(self, lr: float) -> tuple[float, float, bool]:
        """Optimizer step `self.step` at `lr`: accumulate A micro-batches (gradients synced on the last),
        all-reduce the loss, clip, and step unless non-finite. Returns (mean loss, pre-clip grad norm, bad)."""
        A, W, d, device = self.tcfg.grad_accum, self.d.world, self.d, self.d.device
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)  # Muon's matrices (and µP's groups) scale the one schedule
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for m in range(A):
            batch = self.train_loader.batch(((self.step + self.data_skip) * A + m) * d.dp_world + d.dp_rank,  # global
                                             device)
            with dd.grad_sync(self.fwd, self.model, m == A - 1, d, self.tcfg.fsdp):
                with self.autocast():
                    loss, metrics = self.objective.loss(self.fwd, batch)
                self.scaler.scale(loss / A).backward()
            loss_sum += loss.detach().float()
            _accumulate(metric_sums, metrics)
        if d.tp > 1:
            tp.reshard_grads(self.model)
        if d.sp:  # the embedding, norms and head saw only this rank's tokens
            tp.sync_replicated_grads(self.model, d.tp_group)
        self.scaler.unscale_(self.optimizer)
        snap = self.health.before_update() if self.health.due(self.step + 1) else None
        if d.tp > 1:  # DTensor shards next to replicated plain tensors: torch's clip does not mix them
            gnorm = dd.clip_grad_norm(self.model.parameters(), self.tcfg.grad_clip or math.inf)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip or math.inf)  # pre-clip
        # TP ranks hold equal losses (the mean over all ranks is the same), or under SP parts that sum to it
        loss_val = dd.all_reduce(loss_sum, d).item() / (A * (d.dp_world if d.sp else W))
        self.metrics = _reduce(metric_sums, A * W, d)
        gnorm_val = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        bad = not math.isfinite(loss_val) or (not math.isfinite(gnorm_val) and not self.scaler.is_enabled())
        spike, self.spike_z = self.spikes.check(loss_val) if not bad else (False, None)
        bad = bad or spike
        if not bad:
            self.scaler.step(self.optimizer)  # an fp16 overflow (inf grads, finite loss) is skipped by the scaler
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not bad and math.isfinite(gnorm_val):
            self.model.after_step()
            if self.ema is not None:
                self.ema.update()
        if snap is not None:
            self.health_rec = self.health.after_update(snap)
        return loss_val, gnorm_val, bad

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, float]]:
        """(mean loss, mean objective metrics) of val batches 0..eval_iters-1, spread over ranks (every rank runs
        the same number of forwards)."""
        d, iters = self.d, self.tcfg.eval_iters
        self.model.eval()
        losses = torch.zeros(iters, device=d.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for j in range(-(-iters // d.dp_world)):  # a TP group reads one batch together; its rank 0 records it
            i = j * d.dp_world + d.dp_rank
            batch = self.val_loader.batch(min(i, iters - 1), d.device)
            with self.autocast():
                loss, metrics = self.objective.loss(self.model, batch)
            if i < iters and (d.tp_rank == 0 or d.sp):  # under SP each TP rank holds its part of the loss
                losses[i] = loss.float()
            _accumulate(metric_sums, metrics, float(i < iters and d.tp_rank == 0))  # every rank reduces the same keys
        dd.all_reduce(losses, d)
        self.model.train()
        return losses.sum().item() / iters, _reduce(metric_sums, iters, d)

    def save(self, best: bool = False, final: bool = False) -> Path:
        """Checkpoint `self.step` into out (every rank takes part); `best` also points BEST at it. The writer was
        chosen once in _setup: sharded (llm/train/dcp.py; `final` waits for an async save) or single-file.

        A name already on disk from this run (the resumed checkpoint, the same step again) is not rewritten.
        """
        d, A = self.d, self.tcfg.grad_accum
        name = f"ckpt-{self.step:07d}"
        st = {"step": self.step, "world": d.dp_world, "tp": d.tp, "train": asdict(self.tcfg),
              "scaler": self.scaler.state_dict(), "wandb_run_id": self.logger.run_id,
              "best_val": None if math.isinf(self.best_val) else self.best_val, "skipped": self.skipped,
              "spikes": self.spikes.state_dict(), "rollbacks": self.rollbacks,
              "objective": {"name": self.objective.name, **self.objective.state_dict()},
              "data": {"path": str(self.data_path), "fingerprint": self.data_id,
                       "micro_batches": (self.step + self.data_skip) * A * d.dp_world, "skip_steps": self.data_skip}}
        if self.sharded is not None:
            if name != self.saved_name:
                rank = {"rank": d.rank, "world": d.world, "rng": dd.rng_state(d.device),
                        "next_micro_batch": ((self.step + self.data_skip) * A) * d.world + d.rank}
                self.sharded.save(name, self.model, self.optimizer, self.tok, self.extra,
                                  st | {"optimizer_groups": dcp_io.optimizer_groups(self.optimizer)}, rank, best,
                                  self.tcfg.keep_last, wait=final)
                self.saved_name = name
            else:
                self.sharded.commit()
                if best and d.main:
                    ckpt_io.set_pointer(self.out, name, ckpt_io.BEST)
                dd.barrier(d)
            if final:
                self.sharded.close()
            return self.out / name
        to_saved = partial(tp_layout.to_saved, cfg=self.model.cfg, tp=d.tp) if d.tp > 1 else None
        msd, osd = dd.full_state(self.model, self.optimizer, self.tcfg.fsdp or d.tp > 1, to_saved)
        rngs = dd.all_gather_objects(dd.rng_state(d.device), d)
        if d.main:
            st["rng"] = rngs
            averaged = None if self.ema is None else (ema_io.DIR, self.ema.saved_state(self.adapter is not None))
            if name != self.saved_name and self.adapter is not None:
                ckpt_io.save(self.out, name, self.model, self.tok, self.extra, osd, st,
                             peft.saved_tensors(self.model, msd),
                             weights_file=lora.ADAPTER_FILE,
                             json_files={lora.ADAPTER_CONFIG: self.adapter}, averaged=averaged)
                self.saved_name = name
            elif name != self.saved_name:
                ckpt_io.save(self.out, name, self.model, self.tok, self.extra, osd, st, msd, averaged=averaged)
                self.saved_name = name
            if best:
                ckpt_io.set_pointer(self.out, name, ckpt_io.BEST)
            ckpt_io.prune(self.out, self.tcfg.keep_last)
        dd.barrier(d)
        return self.out / name


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor], weight: float = 1.0) -> None:
    """Add one micro-batch's objective metrics (0-dim tensors) into `sums`."""
    for k, v in metrics.items():
        v = v.detach().float() * weight
        sums[k] = sums[k] + v if k in sums else v


def _reduce(sums: dict[str, torch.Tensor], count: int, d: dd.Dist) -> dict[str, float]:
    """Means over `count` micro-batches of every rank: one all-reduce of the stacked sums (keys sorted, so every
    rank stacks the same order)."""
    if not sums:
        return {}
    keys = sorted(sums)
    total = dd.all_reduce(torch.stack([sums[k] for k in keys]), d)
    return {k: v / count for k, v in zip(keys, total.tolist())}


# ----------------------------------------------------------------------------- setup


def _model_and_data(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig, d: dd.Dist, say: Say, init: bool,
                    objective: objectives.Objective, explicit: set[str] | frozenset = frozenset()
                    ) -> tuple[ModelConfig, Transformer, Tokenizer, Path, dict, dict | None]:
    """The dataset prepared (local rank 0 first) and the model, seeded and built, or loaded with its tokenizer
    from --init-from when `init` (fine-tuning: chat tokens added, LoRA applied, llm/train/finetune.py):
    (model config, model on d.device, tokenizer, data path, manifest, adapter config or None)."""
    init_model = init_tok = None
    added: list[str] = []
    if init:
        init_model, init_tok, init_cfg = loading.load_model(tcfg.init_from, "cpu", torch.float32,
                                                            kernels=mcfg.kernels, dropout=mcfg.dropout)
        finetune.check_base(init_cfg, tcfg)
        base_vocab = init_tok.n_vocab
        init_tok, added = finetune.tokenizer(init_tok, dcfg)
        init_model.cfg = mcfg = finetune.base_config(init_model.cfg, mcfg, explicit, init_tok.eot_id, tcfg,
                                                                   say)
    say(describe_config(mcfg, dcfg, tcfg))
    T = finetune.token_block(mcfg.block_size, tcfg)  # a prefix takes some of the positions
    if d.local_rank == 0:
        objective.prepare(dcfg, init_tok, T, say)
    dd.barrier(d)
    data_path = objective.prepare(dcfg, init_tok, T, say)
    manifest = load_manifest(data_path)
    tok = init_tok or Tokenizer.load(data_path, manifest["tokenizer"])
    if init_tok is None:
        mcfg = ModelConfig(**{**asdict(mcfg), "vocab_size": tok.n_vocab,
                              **({"eot_id": tok.eot_id} if mcfg.doc_mask else {})})
    elif tok.n_vocab - len(added) > mcfg.padded_vocab_size:
        raise ConfigError(f"--init-from: the tokenizer has {tok.n_vocab} ids, more than the model's vocab")
    torch.manual_seed(tcfg.seed)
    model = (init_model if init_tok is not None else Transformer(mcfg)).to(d.device)
    adapter = finetune.adapt(model, tcfg, base_vocab, added, say) if init else None
    return model.cfg, model, tok, data_path, manifest, adapter


def _plan(mcfg: ModelConfig, n_params: int, tcfg: TrainConfig, d: dd.Dist, dtype: torch.dtype,
          explicit: set[str] | frozenset) -> dd.Plan:
    """The planner's micro-batch and accumulation for this model, world size and device memory."""
    kernel_path = ops.resolve(mcfg.kernels, d.device)
    return dd.plan_batch(mcfg, n_params, tcfg.batch_size, tcfg.grad_accum, d.dp_world,
                         tcfg.global_batch_tokens, "batch_size" in explicit, dd.memory_budget(d.device),
                         amp=dtype != torch.float32, flash=kernel_path, fused_ce=kernel_path,
                         act_ckpt=tcfg.activation_checkpointing, fsdp=tcfg.fsdp, tp=d.tp, sp=d.sp,
                         split_head=tp.splits_head(tcfg))


def _announce(run: Run, mcfg: ModelConfig, dcfg: DataConfig, init: bool, resumed: bool) -> None:
    """The model / data / plan / device lines, and config.toml written into out (main rank)."""
    say, tcfg, model, device, W = run.say, run.tcfg, run.model, run.d.device, run.d.world
    say(f"model: {run.n_params / 1e6:.2f}M parameters ({model.num_params(True) / 1e6:.2f}M non-embedding), "
        f"{mcfg.n_layer} layers, width {mcfg.n_embd}, heads {mcfg.n_head}/{mcfg.n_kv_head} (q/kv), context "
        f"{mcfg.block_size}, vocab {mcfg.vocab_size}" + (f"; initialised from {tcfg.init_from}" if init else ""))
    say(f"data: {run.data_path} ({run.manifest['splits']['train']['tokens']:,} train tokens"
        + (f"; validating on the {run.val_loader.split} split" if run.val_loader.split != "val" else "") + ")")
    say(f"plan: {run.plan.describe()}")
    say(schedule_line(tcfg))
    say(f"device: {device_name(device)} x {W}, {str(run.dtype).replace('torch.', '')}, kernels={mcfg.kernels}"
        f"{', FSDP2' if tcfg.fsdp and run.d.dp_world > 1 else ', DDP' if run.d.dp_world > 1 else ''}"
        f"{f', tensor parallel {run.d.tp} x {run.d.dp_world} data-parallel' if run.d.tp > 1 else ''}"
        f"{', sequence parallel' if run.d.sp else ''}{', loss parallel' if tp.splits_head(tcfg) else ''}"
        f"{', compiled' if tcfg.compile else ''}{', activation checkpointing' if tcfg.activation_checkpointing else ''}"
        f"{', ' + ('async ' if tcfg.async_checkpoint else '') + 'sharded checkpoints' if run.sharded else ''}"
        f"; MFU against {f'{run.peak / 1e12:.0f} TFLOP/s' if run.peak else 'unknown peak (not reported)'}")
    if run.d.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.toml").write_text(to_toml(mcfg, dcfg, tcfg))
        if not resumed and ckpt_io.pointed(run.out):
            say(f"note: {run.out} already holds a run (latest {ckpt_io.pointed(run.out)}); starting a new one there")


def _setup(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig, resume: str | None,
           explicit: set[str] | frozenset) -> Run:
    """Everything before the first step, in an order that fixes the RNG calls: data, model (seeded), plan,
    resume checks and weights, wrapper, optimizer, restored or fresh per-rank RNG, loaders, logger."""
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    d = dd.setup(tcfg.device, tcfg.tp, tcfg.sequence_parallel)
    tp.check(mcfg, tcfg, d.world)
    device = d.device
    dtype = pick_dtype(tcfg.dtype, device)
    say = print if d.main else (lambda *a, **k: None)
    out = Path(tcfg.out_dir)
    src = state = None
    if resume is not None:
        src = ckpt_io.resolve(resume or out)
        refuse_training(ckpt_io.read_config(src), "--resume")
        state = ckpt_io.read_trainer_state(src)
    finetune.check(dcfg, tcfg)
    tasks.check_tasks(tcfg)
    objective = objectives.make(tcfg, dcfg)
    init = bool(tcfg.init_from) and (src is None or finetune.is_finetune(dcfg, tcfg))  # a fine-tune reloads its base
    mcfg, model, tok, data_path, manifest, adapter = _model_and_data(mup.configure(mcfg, tcfg), dcfg, tcfg, d, say,
                                                                     init, objective, explicit)
    if src is None and not init:
        mup.scale_init(model, mcfg, tcfg)  # µP's init (nothing without --mup)
    objective.setup(objectives.Context(tcfg, dcfg, tok, model, device, dtype, say))  # may add a head: before resume
    if adapter is not None and getattr(model, "reward_head", None) is not None:
        adapter["reward_head"] = True  # the head trains and is saved with the adapter (peft.tensor_name)
    mcfg = model.cfg
    tp.check(mcfg, tcfg, d.world)  # again: --init-from brings its own heads and widths
    n_params = model.num_params()
    plan = _plan(mcfg, n_params, tcfg, d, dtype, explicit)
    tcfg = replace(tcfg, batch_size=plan.batch_size, grad_accum=plan.grad_accum)
    data_id = fingerprint(manifest)
    if src is not None:
        check_resume(src, state, mcfg, tcfg, d.dp_world, data_id, say)
        if not ckpt_io.is_sharded(src):  # a sharded one is read after wrapping, resharded (resume.restore)
            finetune.load_weights(model, src, adapter, device)
    model.train()
    flops_per_token = model.flops_per_token()
    fwd = dd.wrap(model, d, tcfg.fsdp, tcfg.activation_checkpointing, tcfg.compile, tp.splits_head(tcfg))
    optimizer = make_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, run_id, best_val, skipped = 0, None, math.inf, 0
    if src is not None:
        start_step, run_id, best_val, skipped = restore(src, state, model, optimizer, scaler, d, tcfg)
        say(f"resumed from {src} at step {start_step}")
    else:
        torch.manual_seed(tcfg.seed + d.dp_rank)  # dropout streams differ per data-parallel rank (equal across TP)
    T = finetune.token_block(mcfg.block_size, tcfg)
    run = Run(d=d, tcfg=tcfg, dtype=dtype, model=model, n_params=n_params, fwd=fwd, objective=objective,
              optimizer=optimizer, scaler=scaler,
              train_loader=objective.open_loader(data_path, "train", tcfg.batch_size, T, tcfg.seed, tcfg.compile),
              val_loader=objective.open_loader(data_path, objective.val_split(manifest), tcfg.batch_size, T,
                                               tcfg.seed), plan=plan,
              adapter=adapter,
              flops_per_token=flops_per_token, peak=peak_flops(device, dtype), say=say, out=out, tok=tok,
              extra={"train": asdict(tcfg), "data": asdict(dcfg) | {"path": str(data_path)}},
              data_path=data_path, data_id=data_id, manifest=manifest, start_step=start_step, step=start_step,
              best_val=best_val, skipped=skipped,
              saved_name=src.name if src is not None and src.parent.resolve() == out.resolve() else None)
    run.sharded = dcp_io.writer_for(tcfg, d, adapter is not None, out)
    if tcfg.ema_decay is not None:
        if run.sharded is not None:
            raise ConfigError("--ema-decay saves its average as a single-file checkpoint: add --checkpoint-format "
                              "single (under torchrun the default is sharded)")
        run.ema = ema_io.EMA(model, tcfg.ema_decay)  # the weights the run starts (or resumes) from
        if src is not None and not run.ema.load(src, adapter, device):
            say(f"note: {src} holds no weight average; the average starts from its weights")
    run.health = Health(model, tcfg.health_interval, d, sharded=tcfg.fsdp and d.enabled)
    run.spikes = SpikeDetector(tcfg.spike_window, tcfg.spike_zscore)
    if state is not None:
        run.spikes.load_state_dict(state.get("spikes", []))
        objective.load_state_dict(state.get("objective", {}))
        run.data_skip, run.rollbacks = state.get("data", {}).get("skip_steps", 0), state.get("rollbacks", 0)
    _announce(run, mcfg, dcfg, init, resumed=src is not None)
    run.logger = MetricsLogger(out, tcfg.wandb, tcfg.wandb_project, {"model": asdict(mcfg), **run.extra}, run_id,
                               enabled=d.main, resume_step=start_step if src is not None else None)
    return run


# ----------------------------------------------------------------------------- the loop


def _oom_error(run: Run) -> ConfigError:
    return ConfigError(
        f"out of memory in the first step with micro-batch {run.tcfg.batch_size} x {run.model.cfg.block_size} "
        f"tokens (planner estimate {fmt_bytes(run.plan.total_bytes)}): use a smaller --batch-size with a larger "
        "--grad-accum, --global-batch-tokens N to let the planner choose, or --activation-checkpointing")


def _record(run: Run, lr: float, gnorm: float, dt: float) -> dict:
    """The metrics of the step just done (`run.step`), as logged to metrics.jsonl and shown by the progress bar."""
    tokens_per_step = run.plan.tokens
    tok_s = tokens_per_step / dt
    rec = {"step": run.step, "loss": run.loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tok_s,
           "mfu": mfu(run.flops_per_token, tok_s, run.peak, run.d.world), "skipped": run.skipped,
           "tokens": run.step * tokens_per_step}
    rec.update(run.metrics)
    rec.update(run.model.moe_stats())
    return rec


def _loop(run: Run, stop: _StopFlag, callbacks: Sequence[Callable[[int, dict], bool | None]]) -> None:
    """Step until max_steps or a stop (a signal or a callback, on any rank); raise TrainingDiverged after
    max_bad_steps non-finite steps in a row. Checkpoints on validation improvement and every save_interval."""
    tcfg, d = run.tcfg, run.d
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    progress = Progress(tcfg.max_steps, run.start_step, tcfg.log_interval, enabled=d.main)
    streak, dt_avg = 0, None
    last = time.perf_counter()
    flag = torch.zeros(1, device=d.device)
    try:
        while run.step < tcfg.max_steps:
            flag.fill_(1.0 if stop.signal is not None else 0.0)
            if dd.all_reduce(flag, d).item() > 0:
                break
            lr = lr_at(run.step, tcfg)
            try:
                run.loss, gnorm, bad = run.one_step(lr)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if run.step != run.start_step or not _is_oom(e):
                    raise
                raise _oom_error(run) from None
            run.step += 1
            step = run.step
            streak = streak + 1 if bad else 0
            run.skipped += bad
            now = time.perf_counter()
            dt, last = now - last, now
            if step > run.start_step + 1:  # the first step carries start-up and compilation
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            rec = _record(run, lr, gnorm, dt)
            health = run.health.due(step)
            if health:  # the update statistics from one_step, then the probe forward (activations, attention)
                probe = run.objective.tokens(run.val_loader.batch(0, d.device))[:2]
                rec.update(run.health_rec, **run.health.probe(run.model, probe))
            if step % tcfg.log_interval == 0 or step == tcfg.max_steps or bad or health:
                run.logger.log(rec)
            progress.update(rec, None if dt_avg is None else dt_avg * (tcfg.max_steps - step), run.metrics)
            if bad and _on_bad_step(run, progress, streak, gnorm):
                continue  # rolled back: run.step is the checkpoint's
            if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
                run.val_loss, val_metrics = run.evaluate()
                selected = run.val_loss
                run.logger.log({"step": step, "val_loss": run.val_loss,
                                **{f"val/{k}": v for k, v in val_metrics.items()}})
                progress.write(f"step {step}: train loss {run.loss:.4f}, val loss {run.val_loss:.4f}"
                               + "".join(f", val {k} {v:.4g}" for k, v in val_metrics.items()))
                if run.ema is not None:  # the average is what a run with --ema-decay deploys: it picks the best
                    with run.ema.swapped():
                        selected, ema_metrics = run.evaluate()
                    run.logger.log({"step": step, "val/ema_loss": selected,
                                    **{f"val/ema/{k}": v for k, v in ema_metrics.items()}})
                    progress.write(f"step {step}: EMA val loss {selected:.4f}"
                                   + "".join(f", EMA val {k} {v:.4g}" for k, v in ema_metrics.items()))
                if tcfg.eval_tasks and d.main:
                    scores = tasks.task_scores(run.model, run.tok, tcfg)
                    run.logger.log({"step": step, **scores})
                    progress.write(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items()))
                if selected < run.best_val:
                    run.best_val = selected
                    run.save(best=True)
            if step % tcfg.save_interval == 0 and step < tcfg.max_steps and not streak:
                run.save()  # never during a run of bad steps: the last good checkpoint stays the newest
            if any([cb(step, rec) for cb in callbacks]):
                stop.signal = stop.signal or -1
    except BaseException:
        run.logger.close()
        raise
    finally:
        progress.close()
        for s, h in old.items():
            signal.signal(s, h)


def _on_bad_step(run: Run, progress: Progress, streak: int, gnorm: float) -> bool:
    """Log a skipped step; raise TrainingDiverged after max_bad_steps in a row; at spike_rollback in a row, roll
    back to the last checkpoint with the data moved past the bad batches (True when it did)."""
    tcfg, step = run.tcfg, run.step
    spike = math.isfinite(run.loss) and run.spike_z is not None
    why = (f"loss spike {run.loss:.4f} (z-score {run.spike_z:.1f} over the last {tcfg.spike_window} losses)" if spike
           else f"non-finite loss {run.loss} / grad norm {gnorm}")
    progress.write(f"step {step}: {why}: step skipped ({streak} in a row, {run.skipped} in total)")
    run.logger.log({"step": step, "event": "skip", "reason": "spike" if spike else "non-finite", "z": run.spike_z})
    if run.sharded is not None:
        run.sharded.commit()  # an async save still in flight (made before this streak) becomes `latest` first
    good = ckpt_io.pointed(run.out)
    if streak >= tcfg.max_bad_steps:
        raise TrainingDiverged(
            f"stopped at step {step} after {streak} consecutive {'bad' if spike else 'non-finite'} steps; last good "
            f"checkpoint: {run.out / good if good else 'none yet'} (resume it with a lower --lr, or check the data)")
    if not tcfg.spike_rollback or streak != tcfg.spike_rollback:
        return False
    if good is None:
        progress.write(f"step {step}: {streak} bad steps in a row but no checkpoint yet to roll back to")
        return False
    to = rollback(run.out / good, run.model, run.optimizer, run.scaler, run.d, tcfg)
    if run.ema is not None:
        run.ema.load(run.out / good, run.adapter, run.d.device)
    run.data_skip += step - to  # the next step reads the data after the bad batches
    run.step, run.saved_name, run.rollbacks = to, good, run.rollbacks + 1
    run.logger.rewind(to)
    run.logger.log({"step": to, "event": "rollback", "from_step": step, "checkpoint": good,
                    "data_skip_steps": run.data_skip})
    progress.write(f"step {step}: {streak} bad steps in a row: rolled back to {run.out / good} (step {to}); the data "
                   f"moves on {run.data_skip} step(s) past the checkpoint's position")
    return True


def _finish(run: Run, stop: _StopFlag, t0: float) -> dict:
    """The final checkpoint, the loss plot and the summary (printed, and returned as a dict)."""
    step, out, say, manifest, val_loss = run.step, run.out, run.say, run.manifest, run.val_loss
    interrupted = step < run.tcfg.max_steps
    path = run.save(final=True)
    elapsed = time.perf_counter() - t0
    run.logger.close()
    png = plot_losses(run.logger.path, out / "loss.png") if run.d.main else None
    if run.d.main:
        plot_health(run.logger.path, out / "health.png")
    summary = {"step": step, "train_loss": run.loss, "val_loss": val_loss, "checkpoint": str(path),
               "unigram_entropy": manifest.get("unigram_entropy"), "seconds": elapsed, "interrupted": interrupted,
               "signal": stop.signal, "skipped": run.skipped, "plan": run.plan}
    if interrupted:
        say(f"interrupted at step {step}: saved {path}; continue with --resume")
    else:
        msg = f"done: {step - run.start_step} steps in {fmt_duration(elapsed)}"
        msg += (f", val loss {val_loss:.4f} {run.objective.unit}" if val_loss is not None
                else f" (already at step {step})")
        if manifest.get("unigram_entropy") and val_loss is not None:
            msg += f" (unigram entropy of the corpus: {manifest['unigram_entropy']:.4f})"
        say(msg)
        best = ckpt_io.pointed(out, ckpt_io.BEST)
        say(f"checkpoint: {path}" + (f"; best ({'EMA ' if run.ema else ''}val {run.best_val:.4f}): {out / best}"
                                     if best else "") + (f"; loss curve: {png}" if png else ""))
        if run.ema is not None:
            say(f"weight average (EMA, decay {run.tcfg.ema_decay:g}): {path / ema_io.DIR}"
                + (f"; best: {out / best / ema_io.DIR}" if best else ""))
        say(run.objective.next_command(out))
    return summary


def train(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig, resume: str | None = None,
          explicit: set[str] | frozenset = frozenset(),
          callbacks: Sequence[Callable[[int, dict], bool | None]] = ()) -> dict:
    """Train; returns a summary dict. `callbacks(step, record)` run after every step; True stops the run."""
    check_configs(dcfg, tcfg)
    run = _setup(mcfg, dcfg, tcfg, resume, explicit)
    stop = _StopFlag()
    t0 = time.perf_counter()
    _loop(run, stop, callbacks)
    return _finish(run, stop, t0)
