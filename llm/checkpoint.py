"""Checkpoints: a directory per save, written atomically, never unpickled.

  <out_dir>/ckpt-0000200/
    model.safetensors       weights (+ a crc32 per tensor in the metadata)
    config.json             {"format": "llm-checkpoint", "version": 1, "model": {...}, "tokenizer": {...}, ...}
    tokenizer.tiktoken      the BPE ranks (trained tokenizers)
    optimizer.safetensors   AdamW moments (training checkpoints)
    trainer.json            step, RNG states, anything the trainer needs to resume
  <out_dir>/latest          name of the newest complete checkpoint (updated last)
  <out_dir>/best            name of the checkpoint with the lowest validation loss (training)

A multi-rank run writes a sharded checkpoint instead (llm/train/dcp.py writes it; this module reads it):

  <out_dir>/ckpt-0000200/
    config.json             as above, plus "sharded": {"world": W, "writer": "torch.distributed.checkpoint",
                            "tp": N} (a TP run's wqkv rows are saved regrouped for N: llm/tp_layout.py)
    tokenizer.tiktoken
    trainer.json            written by rank 0: step, world, schedule, data position, optimizer hyper-parameters
    rank-0000R.json         written by rank R: its RNG state and data position
    shards/shard-0000K-model-0000F-of-0000N.safetensors
                            torch.distributed.checkpoint's safetensors storage: rank K-1's part of the weights
                            ("model.<name>") and optimizer state ("optim.<name>.<key>"), one file F per module and
                            state kind, each tensor's offset in the full tensor in its header, so any world size
                            or sharding reads it back
    checksums.json          crc32 of every file above (written last, before the rename)

No DCP file is a pickle: the safetensors headers are the DCP metadata (HuggingFaceStorageReader rebuilds
it from them). `llm checkpoint consolidate DIR OUT` (python -m llm.checkpoint ...) makes one a single file.
`llm checkpoint soup OUT CKPT CKPT ...` writes the uniform average of several checkpoints' weights (a model soup).

A save goes to a temporary sibling directory, every file is fsynced, the directory is
renamed into place, then `latest` is replaced; a crash at any point leaves the previous
checkpoint and pointer intact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

from llm.config import ModelConfig, model_config_from_dict, run_main
from llm.model import Transformer
from llm.quant import check_scheme, prepare_quantized
from llm.runtime import first_line
from llm.tokenizer import Tokenizer
from llm.tp_layout import to_saved

FORMAT, VERSION = "llm-checkpoint", 1
MODEL_FILE, OPTIM_FILE, CONFIG_FILE, TRAINER_FILE, LATEST, BEST = (
    "model.safetensors", "optimizer.safetensors", "config.json", "trainer.json", "latest", "best")
SHARD_DIR, CHECKSUMS = "shards", "checksums.json"  # a sharded checkpoint's DCP folder and its crc32 list


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message is one line."""


# ----------------------------------------------------------------------------- save


def save(out_dir: str | Path, name: str, model: torch.nn.Module, tokenizer: Tokenizer, extra: dict | None = None,
         optimizer: torch.optim.Optimizer | dict | None = None, trainer_state: dict | None = None,
         model_state: dict[str, torch.Tensor] | None = None, weights_file: str = MODEL_FILE,
         json_files: dict[str, dict] | None = None, pointer: str | None = LATEST,
         averaged: tuple[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint `out_dir/name` atomically and point `out_dir/latest` at it (pointer=None: no pointer,
    for a checkpoint that is its own directory, e.g. a quantized copy).

    `optimizer` may be an optimizer or its (full) state dict, and `model_state` a full state
    dict to write instead of `model.state_dict()` (FSDP gathers both from every rank first).
    A LoRA run writes its adapter tensors as `model_state` into weights_file="adapter.safetensors",
    and json_files {name: dict} adds files such as adapter_config.json.
    averaged (subdir, state): a second loadable checkpoint inside this one (same config, tokenizer, weights file and
    json files, no optimizer or trainer state) holding `state`: the trainer's weight average (llm/train/ema.py),
    written before the rename, so the checkpoint appears with it or not at all.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = model_tensors(model, model_state)
    save_file(tensors, tmp / weights_file, metadata={"format": FORMAT, "crc32": json.dumps(_crcs(tensors))})
    write_config(tmp, model.cfg, tokenizer, extra)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / OPTIM_FILE, metadata={"format": FORMAT, "param_groups": json.dumps(opt_meta)})
    if trainer_state is not None:
        _write_json(tmp / TRAINER_FILE, trainer_state)
    for fname, obj in (json_files or {}).items():
        _write_json(tmp / fname, obj)
    for f in tmp.iterdir():
        _fsync(f)
    if averaged is not None:
        save(tmp, averaged[0], model, tokenizer, extra, model_state=averaged[1], weights_file=weights_file,
             json_files=json_files, pointer=None)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(out_dir)
    if pointer is not None:
        set_pointer(out_dir, name, pointer)
    return final


def write_config(folder: Path, cfg: ModelConfig, tokenizer: Tokenizer, extra: dict | None = None) -> None:
    """config.json (format, version, model config, tokenizer info, `extra`) and the tokenizer file into folder."""
    _write_json(folder / CONFIG_FILE, {"format": FORMAT, "version": VERSION, "model": cfg.__dict__ | {},
                                       "tokenizer": tokenizer.save(folder), **(extra or {})})


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


def file_crc(path: Path) -> int:
    """crc32 of a file's bytes, read in 16 MiB pieces (a shard never sits in memory twice)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync(path: Path) -> None:
    """Flush a file or directory to disk."""
    _fsync(path)


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
    tensors = read_sharded(ckpt) if is_sharded(ckpt) else read_tensors(ckpt / MODEL_FILE)[0]
    with torch.device("meta"):
        model = Transformer(mcfg)
    if cfg.get("quantization") is not None:
        prepare_quantized(model, check_scheme(cfg["quantization"], str(ckpt / CONFIG_FILE)))
    load_into(model, tensors, ckpt / (SHARD_DIR if is_sharded(ckpt) else MODEL_FILE))
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


# ----------------------------------------------------------------------------- sharded checkpoints (read side)


def is_sharded(ckpt: Path) -> bool:
    """A torch.distributed.checkpoint checkpoint (every rank wrote its part) rather than a single-file one."""
    return (Path(ckpt) / SHARD_DIR).is_dir()


def verify_sharded(ckpt: Path, rank: int = 0, world: int = 1) -> None:
    """Check a sharded checkpoint: checksums.json present, every file it lists present, every shard's safetensors
    header readable (the DCP metadata), and the crc32 of files rank, rank + world, ... (so `world` ranks check the
    whole set once between them). A problem raises CheckpointError naming the file."""
    ckpt = Path(ckpt)
    try:
        want = json.loads((ckpt / CHECKSUMS).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {CHECKSUMS}: the sharded save did not finish") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / CHECKSUMS} is not valid JSON: {e}") from None
    on_disk = {str(p.relative_to(ckpt)) for p in (ckpt / SHARD_DIR).iterdir()}
    if extra := sorted(on_disk - set(want)):
        raise CheckpointError(f"{ckpt / extra[0]}: a shard that {CHECKSUMS} does not list")
    for i, (name, crc) in enumerate(sorted(want.items())):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"missing file: {path}")
        if name.startswith(SHARD_DIR):
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.metadata()
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors shard ({first_line(e)})") from None
        if i % world == rank and file_crc(path) != crc:
            raise CheckpointError(f"{path} is corrupted (crc32 differs from {CHECKSUMS})")


def read_sharded(ckpt: Path, prefix: str = "model.", verify: bool = True) -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` (prefix stripped) of a sharded checkpoint, in this process alone (no process
    group: every shard is read and placed at its offset)."""
    ckpt = Path(ckpt)
    if verify:
        verify_sharded(ckpt)
    reader = HuggingFaceStorageReader(str(ckpt / SHARD_DIR))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith(prefix)}
    dcp_load(state, reader, no_dist=True)
    cfg = read_config(ckpt)
    tp = cfg.get("sharded", {}).get("tp", 1)  # a TP run's shards hold wqkv's rows regrouped (llm/tp_layout.py)
    mcfg = model_config_from_dict(cfg["model"]) if tp > 1 else None
    return {k[len(prefix):]: to_saved(k[len(prefix):], v, mcfg, tp) for k, v in state.items()}


def dcp_load(state: dict[str, torch.Tensor], reader: HuggingFaceStorageReader, no_dist: bool) -> None:
    """dcp.load of `state` in place from a sharded checkpoint's reader (without a process group when no_dist:
    torch's "loading in a single process" warning is what we mean, so it is not shown)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=no_dist)


def consolidate(src: str | Path, out: str | Path) -> Path:
    """Write sharded checkpoint `src` (or an out-dir whose `latest` is one) as a single-file checkpoint `out`:
    model.safetensors, config.json and the tokenizer, which every loader takes (no optimizer: resume the
    sharded one, at any world size)."""
    ckpt, out = resolve(src), Path(out)
    if not is_sharded(ckpt):
        raise CheckpointError(f"{ckpt} is not a sharded checkpoint (no {SHARD_DIR}/): nothing to consolidate")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new one")
    cfg = read_config(ckpt)
    mcfg = model_config_from_dict(cfg["model"])
    tensors = read_sharded(ckpt)
    with torch.device("meta"):
        model = Transformer(mcfg)
    load_into(model, tensors, ckpt / SHARD_DIR)  # the strict check: names and shapes
    extra = {k: v for k, v in cfg.items() if k not in ("format", "version", "model", "tokenizer", "sharded")}
    return save(out.parent, out.name, model, Tokenizer.load(ckpt, cfg["tokenizer"]), extra | {"consolidated_from":
                str(ckpt)}, model_state=tensors, pointer=None)


def average(sources: list[str | Path]) -> tuple[dict[str, torch.Tensor], Path]:
    """(the uniform mean of several single-file checkpoints' weights, the first checkpoint's dir): a "model soup"
    (Wortsman et al. 2022), meaningful for runs fine-tuned from one init. Every floating-point tensor is averaged in
    float64 and stored in its dtype; the model configs and tokenizers must be equal, other tensors too."""
    ckpts = [resolve(s) for s in sources]
    cfgs = [read_config(c) for c in ckpts]
    for c, cfg in zip(ckpts, cfgs):
        if is_sharded(c):
            raise CheckpointError(f"{c} is sharded: make it one file first (llm checkpoint consolidate)")
        if cfg.get("quantization") is not None:
            raise CheckpointError(f"{c} is quantized: average full-precision checkpoints")
        if not (c / MODEL_FILE).is_file():
            raise CheckpointError(f"{c} holds no {MODEL_FILE} (an adapter?): average whole models")
        if cfg["model"] != cfgs[0]["model"] or cfg["tokenizer"] != cfgs[0]["tokenizer"]:
            raise CheckpointError(f"{c} and {ckpts[0]} differ in model config or tokenizer: a soup averages one "
                                  "architecture")
    states = [read_tensors(c / MODEL_FILE)[0] for c in ckpts]
    for c, s in zip(ckpts, states):
        if s.keys() != states[0].keys():
            raise CheckpointError(f"{c} and {ckpts[0]} hold different tensors (the names)")
    avg = {}
    for k, v in states[0].items():
        for c, s in zip(ckpts, states):
            if s[k].shape != v.shape or s[k].dtype != v.dtype:
                raise CheckpointError(f"{c} and {ckpts[0]} hold different tensors ({k!r})")
        if v.is_floating_point():
            avg[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
        elif any(not torch.equal(s[k], v) for s in states):
            raise CheckpointError(f"{k!r} is not a float tensor and differs between the checkpoints")
        else:
            avg[k] = v
    return avg, ckpts[0]


def soup(sources: list[str | Path], out: str | Path) -> Path:
    """Write the checkpoint `out` (a new or empty dir) holding `average(sources)`, the first's config and
    tokenizer, and `soup_of` (the sources) in its config."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new one")
    tensors, first = average(sources)
    cfg = read_config(first)
    with torch.device("meta"):
        model = Transformer(model_config_from_dict(cfg["model"]))
    load_into(model, tensors, first / MODEL_FILE)
    extra = {k: v for k, v in cfg.items() if k not in ("format", "version", "model", "tokenizer")}
    return save(out.parent, out.name, model, Tokenizer.load(first, cfg["tokenizer"]),
                extra | {"soup_of": [str(resolve(s)) for s in sources]}, model_state=tensors, pointer=None)


def main(argv: list[str] | None = None) -> int:
    """`llm checkpoint consolidate DIR OUT` and `llm checkpoint soup OUT CKPT CKPT ...` (python -m llm.checkpoint)."""
    p = argparse.ArgumentParser(prog="llm checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="a sharded (multi-rank) checkpoint -> a single-file checkpoint",
                       description="Gather a sharded checkpoint's weights into one model.safetensors checkpoint "
                                   "(what sample.py, the server, quantize, HF export and --init-from take).")
    c.add_argument("src", metavar="DIR", help="a sharded checkpoint dir, or a training out-dir (its latest)")
    c.add_argument("out", metavar="OUT", help="the single-file checkpoint directory to write (new or empty)")
    s = sub.add_parser("soup", help="average several checkpoints' weights into one (a model soup)",
                       description="Write one checkpoint whose every weight is the uniform mean of the given "
                                   "checkpoints' (Wortsman et al. 2022's uniform soup): for runs fine-tuned from one "
                                   "init, e.g. reward models from one SFT model with different seeds. Same "
                                   "architecture and tokenizer; single-file, full-precision checkpoints.")
    s.add_argument("out", metavar="OUT", help="the checkpoint directory to write (new or empty)")
    s.add_argument("src", metavar="CKPT", nargs="+", help="checkpoints or training out-dirs (their latest)")
    args = p.parse_args(argv)
    try:
        path = consolidate(args.src, args.out) if args.cmd == "consolidate" else soup(args.src, args.out)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in read_tensors(path / MODEL_FILE, verify=False)[0].values())
    print(f"wrote {path} ({n / 1e6:.2f}M parameters in {MODEL_FILE})")
    return 0


if __name__ == "__main__":
    run_main(main)
