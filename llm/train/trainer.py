"""The training loop. `train.py` is only its command-line entry point.

AdamW (fused on CUDA) with decoupled weight decay on matrices only, linear warmup then cosine
decay to min_lr, gradient accumulation, bf16 autocast (fp16 with a grad scaler), global-norm
clipping (the norm is logged before clipping), periodic validation, and checkpoints that lose
nothing: atomic, keep-last-N plus best-by-validation, resumed exactly (model, optimizer, step,
scaler, every rank's RNG, data position, wandb run id), and a final one on SIGTERM / Ctrl-C.
A step whose loss or gradient is NaN/Inf is skipped (the optimizer is untouched) and counted;
max_bad_steps in a row stop the run with the last good checkpoint kept.
Under torchrun it trains data-parallel (DDP, or FSDP2 with --fsdp): see llm/distributed.py.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from llm import checkpoint as ckpt_io
from llm import loading, ops
from llm.checkpoint import CheckpointError
from llm.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    _base_type,
    add_dataclass_args,
    build,
    known_fields,
    load_toml,
    preset,
)
from llm.data.corpus import DataError
from llm.data.shards import Loader, fingerprint, load_manifest, prepare
from llm.model import Transformer
from llm.quant import QuantError, refuse_training
from llm.runtime import pick_dtype
from llm.tokenizer import Tokenizer, TokenizerError
from llm.train import distributed as dd
from llm.train.distributed import fmt_bytes
from llm.train.metrics import MetricsLogger, Progress, device_name, fmt_duration, mfu, peak_flops, plot_losses

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, QuantError)
DEFAULT_PRESET = "tiny"  # the model trained when no --preset is given


class TrainingDiverged(RuntimeError):
    """max_bad_steps consecutive non-finite steps; the message names the last good checkpoint."""


# ----------------------------------------------------------------------------- configuration


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not a usage block
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pretrain a decoder-only Transformer. Precedence: defaults < --preset < (the checkpoint's "
                    "settings with --resume) < --config < flags. Under torchrun it trains data-parallel.")
    # "%(default).0s" prints nothing; it only stops the formatter appending "(default: None)".
    p.add_argument("--preset",
                   help=f"named model preset: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})%(default).0s")
    p.add_argument("--config", help="TOML file of settings (keys are flag names with underscores; optional "
                                    "[model] [data] [train] sections)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from the latest checkpoint in --out-dir, or from the given checkpoint dir; its "
                        "settings are the defaults, flags override them")
    add_dataclass_args(p, ModelConfig, "model", base=preset(DEFAULT_PRESET),
                       base_name=f"--preset {DEFAULT_PRESET}")
    add_dataclass_args(p, DataConfig, "data")
    add_dataclass_args(p, TrainConfig, "training")
    return p


def _check_types(values: dict, source: str) -> None:
    """TOML values must have their field's type (ints where ints are due, ...)."""
    for cls in (ModelConfig, DataConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in values:
                continue
            tp, optional = _base_type(hints[f.name])
            v = values[f.name]
            ok = (v is None and optional) or (isinstance(v, tp) and not (tp is int and isinstance(v, bool))) or (
                tp is float and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise ConfigError(f"{source}: {f.name} must be {tp.__name__}, got {v!r}")


def resolve_configs(argv: list[str] | None) -> tuple[ModelConfig, DataConfig, TrainConfig, argparse.Namespace]:
    """(model, data, train configs, args); args.explicit holds the keys set by --config or flags."""
    args = parser().parse_args(argv)
    base: dict = preset(args.preset or DEFAULT_PRESET)  # model fields only
    values: dict = {}
    if args.config:
        file_vals = load_toml(args.config)
        unknown = set(file_vals) - known_fields() - {"preset"}
        if unknown:
            raise ConfigError(f"unknown keys in {args.config}: {', '.join(sorted(unknown))}")
        _check_types(file_vals, args.config)
        if "preset" in file_vals:
            name = file_vals.pop("preset")
            base = base if args.preset else preset(name)
        values.update(file_vals)
    values.update({k: v for k, v in vars(args).items() if k not in ("preset", "config", "resume")})
    if args.resume is not None:  # the checkpoint's own settings sit under --config and flags
        out = Path(values.get("out_dir", TrainConfig.out_dir))
        if args.resume == "" and not (out / ckpt_io.LATEST).is_file():
            raise ConfigError(f"--resume: no checkpoint in {out} (no {out / ckpt_io.LATEST}); drop --resume to start "
                              "a new run")
        src = ckpt_io.resolve(args.resume or out)
        saved = ckpt_io.read_config(src)
        base = {**saved.get("model", {}), **saved.get("data", {}), **saved.get("train", {}),
                "out_dir": str(src.parent)} | ({} if args.preset is None else preset(args.preset))
        base.pop("path", None)
    args.explicit = set(values)
    merged = base | values
    mcfg, dcfg, tcfg = build(ModelConfig, merged), build(DataConfig, merged), build(TrainConfig, merged)
    check_configs(dcfg, tcfg)
    return mcfg, dcfg, tcfg, args


def check_configs(d: DataConfig, t: TrainConfig) -> None:
    """One clear ConfigError for an out-of-range data or training setting."""
    rules = [(t.max_steps >= 1, "max_steps must be >= 1"), (t.batch_size >= 1, "batch_size must be >= 1"),
             (t.grad_accum >= 1, "grad_accum must be >= 1"), (t.lr > 0, "lr must be > 0"),
             (0 <= t.min_lr <= t.lr, "min_lr must be in [0, lr]"), (t.warmup_steps >= 0, "warmup_steps must be >= 0"),
             (t.grad_clip >= 0, "grad_clip must be >= 0"), (t.eval_iters >= 1, "eval_iters must be >= 1"),
             (min(t.eval_interval, t.save_interval, t.log_interval) >= 1, "eval/save/log intervals must be >= 1"),
             (t.keep_last >= 0, "keep_last must be >= 0"), (t.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
             (t.global_batch_tokens is None or t.global_batch_tokens >= 1, "global_batch_tokens must be >= 1"),
             (0 <= d.val_fraction < 1, "val_fraction must be in [0, 1)"), (d.prep_workers >= 1, "prep_workers >= 1"),
             (d.max_tokens is None or d.max_tokens >= 1, "max_tokens must be >= 1")]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(msg)


def describe_config(*cfgs) -> str:
    """The resolved settings, one `section: key=value ...` line per config."""
    lines = []
    for name, cfg in zip(("model", "data", "train"), cfgs):
        lines.append(f"{name}: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                            if not (name == "model" and k == "vocab_size")))  # from the tokenizer
    return "\n".join(lines)


def to_toml(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig) -> str:
    """The resolved settings as a --config file (vocab_size of the model comes from the tokenizer)."""
    def val(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items() if x is not None) + "}"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v) if isinstance(v, (int, float)) else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = []
    for name, cfg in (("model", mcfg), ("data", dcfg), ("train", tcfg)):
        out.append(f"[{name}]")
        out += [f"{k} = {val(v)}" for k, v in asdict(cfg).items()
                if v is not None and not (name == "model" and k == "vocab_size")]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- pieces


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Loader, iters: int, d: dd.Dist, autocast) -> float:
    """Mean loss of val batches 0..iters-1, spread over ranks (every rank runs the same number of forwards)."""
    model.eval()
    losses = torch.zeros(iters, device=d.device)
    for j in range(-(-iters // d.world)):
        i = j * d.world + d.rank
        x, y = loader.batch(min(i, iters - 1), d.device)
        with autocast():
            _, loss = model(x, y)
        if i < iters:
            losses[i] = loss.float()
    dd.all_reduce(losses, d)
    model.train()
    return losses.sum().item() / iters


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


# ----------------------------------------------------------------------------- the loop


def train(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig, resume: str | None = None,
          explicit: set[str] | frozenset = frozenset(),
          callbacks: Sequence[Callable[[int, dict], bool | None]] = ()) -> dict:
    """Train; returns a summary dict. `callbacks(step, record)` run after every step; True stops the run."""
    check_configs(dcfg, tcfg)
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    d = dd.setup(tcfg.device)
    device, W = d.device, d.world
    dtype = pick_dtype(tcfg.dtype, device)
    say = print if d.main else (lambda *a, **k: None)
    out = Path(tcfg.out_dir)
    src = state = None
    if resume is not None:
        src = ckpt_io.resolve(resume or out)
        refuse_training(ckpt_io.read_config(src), "--resume")
        state = ckpt_io.read_trainer_state(src)
    init_tok = None
    if tcfg.init_from and src is None:
        init_model, init_tok, init_cfg = loading.load_model(tcfg.init_from, "cpu", torch.float32, kernels=mcfg.kernels,
                                                            dropout=mcfg.dropout)
        refuse_training(init_cfg, "--init-from")
        mcfg = init_model.cfg
    say(describe_config(mcfg, dcfg, tcfg))

    if d.local_rank == 0:
        data_path = prepare(dcfg, say, tokenizer=init_tok)
    dd.barrier(d)
    data_path = prepare(dcfg, say, tokenizer=init_tok)
    manifest = load_manifest(data_path)
    tok = init_tok or Tokenizer.load(data_path, manifest["tokenizer"])
    if init_tok is None:
        mcfg = ModelConfig(**{**asdict(mcfg), "vocab_size": tok.n_vocab})
    elif tok.n_vocab > mcfg.padded_vocab_size:
        raise ConfigError(f"--init-from: the tokenizer has {tok.n_vocab} ids, more than the model's vocab")

    torch.manual_seed(tcfg.seed)
    model = (init_model if init_tok is not None else Transformer(mcfg)).to(device)
    n_params = model.num_params()
    kernel_path = ops.resolve(mcfg.kernels, device)
    plan = dd.plan_batch(mcfg, n_params, tcfg.batch_size, tcfg.grad_accum, W, tcfg.global_batch_tokens,
                         "batch_size" in explicit, dd.memory_budget(device), amp=dtype != torch.float32,
                         flash=kernel_path, fused_ce=kernel_path, act_ckpt=tcfg.activation_checkpointing,
                         fsdp=tcfg.fsdp)
    tcfg = replace(tcfg, batch_size=plan.batch_size, grad_accum=plan.grad_accum)
    A, T = tcfg.grad_accum, mcfg.block_size
    data_id = fingerprint(manifest)

    if src is not None:
        was_model = ckpt_io.read_config(src)["model"]
        diff = sorted(k for k, v in mcfg.architecture().items() if was_model.get(k) != v)
        if diff:
            raise ConfigError(f"--resume: the model config differs from the checkpoint's ({src}): {', '.join(diff)}")
        was, was_world = state["train"], state.get("world", 1)
        if was["batch_size"] != tcfg.batch_size or was["grad_accum"] * was_world != A * W:
            raise ConfigError(
                f"--resume: the batch changed (checkpoint: micro-batch {was['batch_size']} x {was['grad_accum']} "
                f"accumulation x {was_world} rank(s); now {tcfg.batch_size} x {A} x {W}); the data order "
                "would not continue exactly: keep the micro-batch and accumulation x world size, or start a new run")
        if state.get("data", {}).get("fingerprint") not in (None, data_id):
            raise ConfigError(f"--resume: the dataset differs from the checkpoint's ({state['data'].get('path')}); "
                              "resume with the same --dataset, or start a new run")
        if was_world != W:
            extra = "; ranks beyond the saved ones get fresh RNG streams" if W > was_world else ""
            say(f"resume: remapped from {was_world} to {W} rank(s) with grad_accum {was['grad_accum']} -> "
                f"{A}: same global batch and data order{extra}")

    if src is not None:
        tensors, _ = ckpt_io.read_tensors(src / ckpt_io.MODEL_FILE, device=str(device))
        ckpt_io.load_into(model, tensors, src / ckpt_io.MODEL_FILE)
    model.train()
    flops_per_token = model.flops_per_token()
    fwd = dd.wrap(model, d, tcfg.fsdp, tcfg.activation_checkpointing, tcfg.compile)
    optimizer = make_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, run_id, best_val, skipped = 0, None, math.inf, 0
    if src is not None:
        dd.load_optimizer_state(model, optimizer, ckpt_io.read_optimizer_state(src), tcfg.fsdp)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if d.rank < len(rngs):
            dd.set_rng_state(rngs[d.rank], device)
        else:
            torch.manual_seed(tcfg.seed + d.rank)
        start_step, run_id = state["step"], state.get("wandb_run_id")
        best_val, skipped = state.get("best_val") or math.inf, state.get("skipped", 0)
        say(f"resumed from {src} at step {start_step}")
    else:
        torch.manual_seed(tcfg.seed + d.rank)  # dropout streams differ per rank

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    train_loader = Loader(data_path, "train", tcfg.batch_size, T, tcfg.seed)
    val_loader = Loader(data_path, "val", tcfg.batch_size, T, tcfg.seed)
    peak = peak_flops(device, dtype)
    say(f"model: {n_params / 1e6:.2f}M parameters ({model.num_params(True) / 1e6:.2f}M non-embedding), "
        f"{mcfg.n_layer} layers, width {mcfg.n_embd}, heads {mcfg.n_head}/{mcfg.n_kv_head} (q/kv), context {T}, "
        f"vocab {mcfg.vocab_size}" + (f"; initialised from {tcfg.init_from}" if init_tok is not None else ""))
    say(f"data: {data_path} ({manifest['splits']['train']['tokens']:,} train tokens)")
    say(f"plan: {plan.describe()}")
    say(f"device: {device_name(device)} x {W}, {str(dtype).replace('torch.', '')}, kernels={mcfg.kernels}"
        f"{', FSDP2' if tcfg.fsdp and W > 1 else ', DDP' if W > 1 else ''}"
        f"{', compiled' if tcfg.compile else ''}{', activation checkpointing' if tcfg.activation_checkpointing else ''}"
        f"; MFU against {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown peak (not reported)'}")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(mcfg, dcfg, tcfg))
        if src is None and ckpt_io.pointed(out):
            say(f"note: {out} already holds a run (latest {ckpt_io.pointed(out)}); starting a new one there")
    extra = {"train": asdict(tcfg), "data": asdict(dcfg) | {"path": str(data_path)}}
    logger = MetricsLogger(out, tcfg.wandb, tcfg.wandb_project, {"model": asdict(mcfg), **extra}, run_id,
                           enabled=d.main, resume_step=start_step if src is not None else None)
    saved_name = src.name if src is not None and src.parent.resolve() == out.resolve() else None

    def save(step: int, best: bool = False) -> Path:
        nonlocal saved_name
        msd, osd = dd.full_state(model, optimizer, tcfg.fsdp)
        rngs = dd.all_gather_objects(dd.rng_state(device), d)
        name = f"ckpt-{step:07d}"
        if d.main:
            st = {"step": step, "world": W, "train": asdict(tcfg), "rng": rngs, "scaler": scaler.state_dict(),
                  "wandb_run_id": logger.run_id, "best_val": None if math.isinf(best_val) else best_val,
                  "skipped": skipped, "data": {"path": str(data_path), "fingerprint": data_id,
                                               "micro_batches": step * A * W}}
            if name != saved_name:
                ckpt_io.save(out, name, model, tok, extra, osd, st, msd)
                saved_name = name
            if best:
                ckpt_io.set_pointer(out, name, ckpt_io.BEST)
            ckpt_io.prune(out, tcfg.keep_last)
        dd.barrier(d)
        return out / name

    def one_step(step: int, lr: float) -> tuple[float, float, bool]:
        """Accumulate A micro-batches, all-reduce, clip, and step unless non-finite: (loss, grad norm, bad)."""
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for m in range(A):
            x, y = train_loader.batch((step * A + m) * W + d.rank, device)  # global micro-batch index
            with dd.grad_sync(fwd, model, m == A - 1, d, tcfg.fsdp):
                with autocast():
                    _, loss = fwd(x, y)
                scaler.scale(loss / A).backward()
            loss_sum += loss.detach().float()
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)  # pre-clip norm
        loss_val = dd.all_reduce(loss_sum, d).item() / (A * W)
        gnorm_val = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        bad = not math.isfinite(loss_val) or (not math.isfinite(gnorm_val) and not scaler.is_enabled())
        if not bad:
            scaler.step(optimizer)  # an fp16 overflow (inf grads, finite loss) is skipped by the scaler itself
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not bad and math.isfinite(gnorm_val):
            model.after_step()
        return loss_val, gnorm_val, bad

    stop = _StopFlag()
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    progress = Progress(tcfg.max_steps, start_step, tcfg.log_interval, enabled=d.main)
    step, val_loss, loss_val, streak, dt_avg = start_step, None, float("nan"), 0, None
    tokens_per_step = plan.tokens
    t0 = last = time.perf_counter()
    flag = torch.zeros(1, device=device)
    try:
        while step < tcfg.max_steps:
            flag.fill_(1.0 if stop.signal is not None else 0.0)
            if dd.all_reduce(flag, d).item() > 0:
                break
            lr = lr_at(step, tcfg)
            try:
                loss_val, gnorm_val, bad = one_step(step, lr)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if step != start_step or not _is_oom(e):
                    raise
                raise ConfigError(
                    f"out of memory in the first step with micro-batch {tcfg.batch_size} x {T} tokens (planner "
                    f"estimate {fmt_bytes(plan.total_bytes)}): use a smaller --batch-size with a larger --grad-accum, "
                    "--global-batch-tokens N to let the planner choose, or --activation-checkpointing") from None
            step += 1
            streak = streak + 1 if bad else 0
            skipped += bad
            now = time.perf_counter()
            dt, last = now - last, now
            if step > start_step + 1:  # the first step carries start-up and compilation
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            tok_s = tokens_per_step / dt
            rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm_val, "tokens_per_s": tok_s,
                   "mfu": mfu(flops_per_token, tok_s, peak, W), "skipped": skipped, "tokens": step * tokens_per_step}
            rec.update(model.moe_stats())
            if step % tcfg.log_interval == 0 or step == tcfg.max_steps or bad:
                logger.log(rec)
            progress.update(rec, None if dt_avg is None else dt_avg * (tcfg.max_steps - step))
            if bad:
                progress.write(f"step {step}: non-finite loss {loss_val} / grad norm {gnorm_val}: step skipped "
                               f"({streak} in a row, {skipped} in total)")
                if streak >= tcfg.max_bad_steps:
                    good = ckpt_io.pointed(out)
                    raise TrainingDiverged(
                        f"stopped at step {step} after {streak} consecutive non-finite steps; last good checkpoint: "
                        f"{out / good if good else 'none yet'} (resume it with a lower --lr, or check the data)")
            if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
                val_loss = evaluate(model, val_loader, tcfg.eval_iters, d, autocast)
                logger.log({"step": step, "val_loss": val_loss})
                progress.write(f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}")
                if val_loss < best_val:
                    best_val = val_loss
                    save(step, best=True)
            if step % tcfg.save_interval == 0 and step < tcfg.max_steps and not streak:
                save(step)  # never during a run of bad steps: the last good checkpoint stays the newest
            if any([cb(step, rec) for cb in callbacks]):
                stop.signal = stop.signal or -1
    except BaseException:
        logger.close()
        raise
    finally:
        progress.close()
        for s, h in old.items():
            signal.signal(s, h)
    interrupted = step < tcfg.max_steps
    path = save(step)
    elapsed = time.perf_counter() - t0
    logger.close()
    png = plot_losses(logger.path, out / "loss.png") if d.main else None
    summary = {"step": step, "train_loss": loss_val, "val_loss": val_loss, "checkpoint": str(path),
               "unigram_entropy": manifest.get("unigram_entropy"), "seconds": elapsed, "interrupted": interrupted,
               "signal": stop.signal, "skipped": skipped, "plan": plan}
    if interrupted:
        say(f"interrupted at step {step}: saved {path}; continue with --resume")
    else:
        msg = f"done: {step - start_step} steps in {fmt_duration(elapsed)}"
        msg += f", val loss {val_loss:.4f} nats/token" if val_loss is not None else f" (already at step {step})"
        if manifest.get("unigram_entropy") and val_loss is not None:
            msg += f" (unigram entropy of the corpus: {manifest['unigram_entropy']:.4f})"
        say(msg)
        best = ckpt_io.pointed(out, ckpt_io.BEST)
        say(f"checkpoint: {path}" + (f"; best (val {best_val:.4f}): {out / best}" if best else "")
            + (f"; loss curve: {png}" if png else ""))
        say(f"sample with: python sample.py --checkpoint {out}")
    return summary


def main(argv: list[str] | None = None, callbacks: Sequence[Callable[[int, dict], bool | None]] = ()) -> int:
    """train.py: 0 when done or stopped by SIGTERM, 130 after Ctrl-C, 2 for bad input, 1 when training diverged."""
    tag = f"[rank {dd.env_rank()}] " if dd.env_rank() is not None else ""
    try:
        mcfg, dcfg, tcfg, args = resolve_configs(argv)
        summary = train(mcfg, dcfg, tcfg, args.resume, args.explicit, callbacks)
    except USER_ERRORS as e:
        print(f"error: {tag}{e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {tag}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {tag}interrupted (Ctrl-C); checkpoints already written are intact", file=sys.stderr)
        return 130
    finally:
        dd.cleanup()
    return 130 if summary["signal"] == signal.SIGINT else 0
