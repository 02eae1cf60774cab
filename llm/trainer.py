"""The training loop. `train.py` is only its command-line entry point.

AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay to
min_lr, gradient accumulation, global-norm clipping (the norm is logged before
clipping), periodic validation, atomic checkpoints, and a final checkpoint on
SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llm import checkpoint as ckpt_io
from llm.checkpoint import CheckpointError
from llm.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    add_dataclass_args,
    build,
    known_fields,
    load_toml,
    preset,
)
from llm.data import DataError, Loader, load_manifest, prepare
from llm.metrics import MetricsLogger, peak_flops, plot_losses
from llm.model import Transformer
from llm.tokenizer import Tokenizer, TokenizerError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pretrain a decoder-only Transformer. Precedence: defaults < --preset < --config < flags.")
    p.add_argument("--preset", help="named model preset: tiny (default), small, 1b, gpt2")
    p.add_argument("--config", help="TOML file of settings (keys are flag names with underscores)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from the latest checkpoint in --out-dir, or from the given checkpoint dir")
    add_dataclass_args(p, ModelConfig, "model")
    add_dataclass_args(p, DataConfig, "data")
    add_dataclass_args(p, TrainConfig, "training")
    return p


def resolve_configs(argv: list[str] | None) -> tuple[ModelConfig, DataConfig, TrainConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    base: dict = preset(args.preset or "tiny")  # model fields only
    values: dict = {}
    if args.config:
        file_vals = load_toml(args.config)
        unknown = set(file_vals) - known_fields() - {"preset"}
        if unknown:
            raise ConfigError(f"unknown keys in {args.config}: {', '.join(sorted(unknown))}")
        if "preset" in file_vals:
            name = file_vals.pop("preset")
            base = base if args.preset else preset(name)
        values.update(file_vals)
    values.update({k: v for k, v in vars(args).items() if k not in ("preset", "config", "resume")})
    return build(ModelConfig, base | values), build(DataConfig, values), build(TrainConfig, values), args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
def evaluate(model: Transformer, loader: Loader, iters: int, device, autocast) -> float:
    model.eval()
    total = 0.0
    for i in range(iters):
        x, y = loader.batch(i, device)
        with autocast():
            _, loss = model(x, y)
        total += loss.item()
    model.train()
    return total / iters


class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps and writes a final checkpoint."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signal = signum


def train(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig, resume: str | None = None) -> dict:
    device = pick_device(tcfg.device)
    dtype = pick_dtype(tcfg.dtype, device)
    torch.manual_seed(tcfg.seed)
    data_path = prepare(dcfg)
    manifest = load_manifest(data_path)
    tok = Tokenizer.load(data_path, manifest["tokenizer"])
    mcfg = ModelConfig(**{**asdict(mcfg), "vocab_size": tok.n_vocab})
    train_loader = Loader(data_path, "train", tcfg.batch_size, mcfg.block_size, tcfg.seed)
    val_loader = Loader(data_path, "val", tcfg.batch_size, mcfg.block_size, tcfg.seed)

    out = Path(tcfg.out_dir)
    start_step, run_id = 0, None
    model = Transformer(mcfg).to(device)
    optimizer = make_optimizer(model, tcfg, device)
    if resume is not None:
        src = ckpt_io.resolve(resume or out)
        state = ckpt_io.read_trainer_state(src)
        saved = ckpt_io.read_config(src)
        if saved["model"] != asdict(mcfg):
            raise ConfigError(f"--resume: the model config differs from the checkpoint's ({src})")
        for key in ("batch_size", "grad_accum"):
            if state["train"][key] != getattr(tcfg, key):
                raise ConfigError(f"--resume: {key} changed from {state['train'][key]} to {getattr(tcfg, key)}; "
                                  "the data order would not continue exactly (keep it, or start a new run)")
        tensors, _ = ckpt_io.read_tensors(src / ckpt_io.MODEL_FILE, device=str(device))
        ckpt_io.load_into(model, tensors, src / ckpt_io.MODEL_FILE)
        ckpt_io.load_optimizer(src, optimizer)
        start_step, run_id = state["step"], state.get("wandb_run_id")
        torch.set_rng_state(torch.tensor(state["rng_cpu"], dtype=torch.uint8))
        print(f"resumed from {src} at step {start_step}")
    model.train()
    fwd = torch.compile(model) if tcfg.compile else model

    use_amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if use_amp else contextlib.nullcontext()

    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * mcfg.block_size
    flops_per_step = model.flops_per_token() * tokens_per_step
    peak = peak_flops(device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(True) / 1e6:.2f}M non-embedding), "
          f"{mcfg.n_layer} layers, width {mcfg.n_embd}, heads {mcfg.n_head}/{mcfg.n_kv_head} (q/kv), "
          f"context {mcfg.block_size}, vocab {mcfg.vocab_size}")
    print(f"data: {data_path} ({manifest['splits']['train']['tokens']:,} train tokens); "
          f"{tokens_per_step:,} tokens/step; device {device}, {str(dtype).replace('torch.', '')}, "
          f"kernels={mcfg.kernels}")
    logger = MetricsLogger(out, tcfg.wandb, tcfg.wandb_project, {"model": asdict(mcfg), "train": asdict(tcfg)}, run_id)
    extra = {"train": asdict(tcfg), "data": asdict(dcfg) | {"path": str(data_path)}}

    def save(step: int) -> Path:
        state = {"step": step, "train": asdict(tcfg), "rng_cpu": torch.get_rng_state().tolist(),
                 "wandb_run_id": logger.run_id}
        return ckpt_io.save(out, f"ckpt-{step:07d}", model, tok, extra, optimizer, state)

    stop = _StopFlag()
    old_handler = signal.signal(signal.SIGTERM, stop)
    from tqdm import tqdm

    bar = tqdm(total=tcfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout,
               mininterval=1.0, disable=None)
    step, last, val_loss, loss_val, interrupted = start_step, None, None, float("nan"), False
    t0 = time.perf_counter()
    try:
        while step < tcfg.max_steps:
            if stop.signal is not None:
                interrupted = True
                break
            lr = lr_at(step, tcfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(tcfg.grad_accum):
                x, y = train_loader.batch(step * tcfg.grad_accum + micro, device)
                with autocast():
                    _, loss = fwd(x, y)
                scaler.scale(loss / tcfg.grad_accum).backward()
                loss_sum += loss.item()
            scaler.unscale_(optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf")).item()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_val = loss_sum / tcfg.grad_accum
            now = time.perf_counter()
            dt, last = now - (last or t0), now
            tok_s = tokens_per_step / dt
            mfu = flops_per_step / dt / peak if peak else None
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            bar.update(1)
            if step % tcfg.log_interval == 0 or step == tcfg.max_steps:
                logger.log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tok_s,
                            "mfu": mfu})
            if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
                val_loss = evaluate(model, val_loader, tcfg.eval_iters, device, autocast)
                logger.log({"step": step, "val_loss": val_loss})
                bar.write(f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}")
            if step % tcfg.save_interval == 0 and step < tcfg.max_steps:
                save(step)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old_handler)
    path = save(step)
    elapsed = time.perf_counter() - t0
    logger.close()
    png = plot_losses(logger.path, out / "loss.png")
    summary = {"step": step, "train_loss": loss_val, "val_loss": val_loss, "checkpoint": str(path),
               "unigram_entropy": manifest.get("unigram_entropy"), "seconds": elapsed, "interrupted": interrupted}
    if interrupted:
        print(f"interrupted at step {step}: saved {path}; continue with --resume")
    else:
        msg = f"done: {step} steps in {elapsed:.0f}s, val loss {val_loss:.4f} nats/token"
        if manifest.get("unigram_entropy"):
            msg += f" (unigram entropy of the corpus: {manifest['unigram_entropy']:.4f})"
        print(msg)
        print(f"checkpoint: {path}" + (f"; loss curve: {png}" if png else ""))
        print(f"sample with: python sample.py --checkpoint {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        mcfg, dcfg, tcfg, args = resolve_configs(argv)
        summary = train(mcfg, dcfg, tcfg, args.resume)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if summary["interrupted"] and summary.get("signal") == signal.SIGINT else 0
