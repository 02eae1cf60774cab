"""Checkpoints: a directory per save, written atomically, never unpickled.

  <out_dir>/ckpt-0000200/
    model.safetensors       weights (+ a crc32 per tensor in the metadata)
    config.json             {"format": "llm-checkpoint", "version": 1, "model": {...}, "tokenizer": {...}, ...}
    tokenizer.tiktoken      the BPE ranks (trained tokenizers)
    optimizer.safetensors   AdamW moments (training checkpoints)
    trainer.json            step, RNG states, anything the trainer needs to resume
  <out_dir>/latest          name of the newest complete checkpoint (updated last)
  <out_dir>/best            name of the checkpoint with the lowest validation loss (training)

A save goes to a temporary sibling directory, every file is fsynced, the directory is
renamed into place, then `latest` is replaced; a crash at any point leaves the previous
checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llm.config import ModelConfig, model_config_from_dict
from llm.model import Transformer
from llm.quant import check_scheme, prepare_quantized
from llm.runtime import first_line
from llm.tokenizer import Tokenizer

FORMAT, VERSION = "llm-checkpoint", 1
MODEL_FILE, OPTIM_FILE, CONFIG_FILE, TRAINER_FILE, LATEST, BEST = (
    "model.safetensors", "optimizer.safetensors", "config.json", "trainer.json", "latest", "best")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message is one line."""


# ----------------------------------------------------------------------------- save


def save(out_dir: str | Path, name: str, model: torch.nn.Module, tokenizer: Tokenizer, extra: dict | None = None,
         optimizer: torch.optim.Optimizer | dict | None = None, trainer_state: dict | None = None,
         model_state: dict[str, torch.Tensor] | None = None, pointer: str | None = LATEST) -> Path:
    """Write checkpoint `out_dir/name` atomically and point `out_dir/latest` at it (pointer=None: no pointer,
    for a checkpoint that is its own directory, e.g. a quantized copy).

    `optimizer` may be an optimizer or its (full) state dict, and `model_state` a full state
    dict to write instead of `model.state_dict()` (FSDP gathers both from every rank first).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = model_tensors(model, model_state)
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": FORMAT, "crc32": json.dumps(_crcs(tensors))})
    cfg = {"format": FORMAT, "version": VERSION, "model": model.cfg.__dict__ | {},
           "tokenizer": tokenizer.save(tmp), **(extra or {})}
    _write_json(tmp / CONFIG_FILE, cfg)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / OPTIM_FILE, metadata={"format": FORMAT, "param_groups": json.dumps(opt_meta)})
    if trainer_state is not None:
        _write_json(tmp / TRAINER_FILE, trainer_state)
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(out_dir)
    if pointer is not None:
        set_pointer(out_dir, name, pointer)
    return final


def set_pointer(out_dir: str | Path, name: str, pointer: str = LATEST) -> None:
    """Atomically make the file `out_dir/pointer` (latest, best) name checkpoint `name`."""
    out_dir = Path(out_dir)
    ptr = out_dir / f".{pointer}.tmp{os.getpid()}"
    ptr.write_text(name + "\n")
    _fsync(ptr)
    os.replace(ptr, out_dir / pointer)
    _fsync(out_dir)


def pointed(out_dir: str | Path, pointer: str = LATEST) -> str | None:
    """The checkpoint name a pointer file holds, or None."""
    p = Path(out_dir) / pointer
    return (p.read_text().strip() or None) if p.is_file() else None


def prune(out_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` ckpt-* dirs (never the `latest` or `best` target) and the
    temp dirs of interrupted saves; returns the names removed. keep <= 0 keeps every checkpoint."""
    out_dir = Path(out_dir)
    protect = {pointed(out_dir, LATEST), pointed(out_dir, BEST)}
    ckpts = sorted(p.name for p in out_dir.glob("ckpt-*") if p.is_dir())
    doomed = [n for n in (ckpts[:-keep] if keep > 0 else []) if n not in protect]
    doomed += [p.name for p in out_dir.glob(".ckpt-*.tmp*") if p.is_dir()]  # saves cut short by a crash
    for n in doomed:
        shutil.rmtree(out_dir / n, ignore_errors=True)
    return doomed


def model_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict (or `state`) with shared (tied) tensors stored once, contiguous, on CPU."""
    out, seen = {}, set()
    for k, v in (model.state_dict() if state is None else state).items():
        if v.data_ptr() in seen and v.numel():
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous().cpu()
    return out


def optimizer_tensors(opt: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _crcs(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: zlib.crc32(_bytes(v)) for k, v in tensors.items()}


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- load


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a training out_dir (follows `latest`)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file() and p.name in (LATEST, BEST):  # a pointer file: follow it
        p = p.parent / p.read_text().strip()
        if not p.is_dir():
            raise CheckpointError(f"{path} points at {p.name!r}, which does not exist")
    if p.is_file():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory (holding {MODEL_FILE} and {CONFIG_FILE})")
    if (p / LATEST).is_file() and not (p / CONFIG_FILE).is_file():
        name = (p / LATEST).read_text().strip()
        p = p / name
        if not p.is_dir():
            raise CheckpointError(f"{path}/{LATEST} points at {name!r}, which does not exist")
    if not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"{p} is not a checkpoint directory (no {CONFIG_FILE})")
    return p


def read_config(ckpt: Path) -> dict:
    try:
        cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE} is not valid JSON: {e}") from None
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / CONFIG_FILE} is not an llm checkpoint config (format {cfg.get('format')!r})")
    return cfg


def read_tensors(path: Path, verify: bool = True, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a safetensors file plus its metadata; a bad file raises CheckpointError (one line)."""
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if verify and "crc32" in meta:
        want = json.loads(meta["crc32"])
        for k, t in tensors.items():
            if k in want and zlib.crc32(_bytes(t.cpu())) != want[k]:
                raise CheckpointError(f"{path}: tensor {k!r} is corrupted (checksum mismatch)")
    return tensors, meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    **overrides) -> tuple[Transformer, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config dict) from one of our checkpoint dirs or a training out_dir.

    `llm.loading.load_model` takes Hugging Face directories too; overrides replace config fields.
    A quantized checkpoint (config "quantization", llm.quant) loads into quantized modules.
    """
    ckpt = resolve(path)
    cfg = read_config(ckpt)
    mcfg: ModelConfig = model_config_from_dict({**cfg["model"], **overrides})
    tok = Tokenizer.load(ckpt, cfg["tokenizer"])
    tensors, _ = read_tensors(ckpt / MODEL_FILE)
    with torch.device("meta"):
        model = Transformer(mcfg)
    if cfg.get("quantization") is not None:
        prepare_quantized(model, check_scheme(cfg["quantization"], str(ckpt / CONFIG_FILE)))
    load_into(model, tensors, ckpt / MODEL_FILE)
    model.init_buffers("cpu")  # off the meta device before moving
    model.to(device=device, dtype=dtype)
    model.init_buffers(device)  # RoPE tables stay fp32 whatever the weights' dtype
    return model.eval(), tok, cfg


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load; the error lists missing, unexpected and wrongly shaped tensors."""
    expected = model.state_dict()
    tied = {k for k in expected if k == "lm_head.weight" and getattr(model.cfg, "tie_embeddings", False)}
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                    if k in tensors and tensors[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = [listing("missing", missing), listing("unexpected", unexpected), listing("wrong shape", shapes)]
        raise CheckpointError(f"{source} does not match the model config: " + " | ".join(p for p in parts if p))
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.tok_emb.weight


def listing(what: str, items: list[str]) -> str:
    """"what: a, b, ..." (at most 8 names) for a mismatch message; "" when there are none."""
    return f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}" if items else ""


def read_optimizer_state(ckpt: Path) -> dict:
    """The optimizer state dict ({"state": {id: {...}}, "param_groups": [...]}) of a checkpoint."""
    tensors, meta = read_tensors(ckpt / OPTIM_FILE)
    groups = json.loads(meta["param_groups"])
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": groups}


def read_trainer_state(ckpt: Path) -> dict:
    p = ckpt / TRAINER_FILE
    if not p.is_file():
        raise CheckpointError(f"{ckpt} has no {TRAINER_FILE}: it is a model-only checkpoint and cannot be resumed")
    return json.loads(p.read_text())
