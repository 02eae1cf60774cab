"""Parameter-efficient fine-tuning: one front for the three methods, their adapter files and their loading.

  lora     llm/lora.py        W = W0 + (alpha / r) B A on chosen projections (mergeable)
  prefix   llm/prefix.py      P learned key/value rows per layer, a pre-filled KV-cache region (not a weight)
  adapter  llm/bottleneck.py  Houlsby / Pfeiffer bottlenecks after the sublayers (a nonlinearity: not mergeable)

Every method freezes the base and, when a chat template added tokens, trains those tokens' embedding and head
rows too (`lora.train_new_rows`). A run's checkpoint holds adapter.safetensors (only the trained tensors, under
their state-dict names; a prefix folded, `prefix.keys` / `prefix.values`, plus its `prefix.reparam.*` for the
resume) and adapter_config.json: the method and its settings, the base's path and architecture. LoRA's config
keeps its format "llm-lora" (older adapters load as they are); the others are format "llm-peft" with a "method".
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch.nn as nn
from torch import Tensor

from llm import bottleneck, lora, prefix
from llm.checkpoint import CheckpointError, read_tensors
from llm.config import ConfigError
from llm.model import Transformer

METHODS = ("lora", "prefix", "adapter")
FORMAT = "llm-peft"
Config = lora.LoRAConfig | prefix.PrefixConfig | bottleneck.AdapterConfig


def method_of(cfg: Config) -> str:
    return {lora.LoRAConfig: "lora", prefix.PrefixConfig: "prefix", bottleneck.AdapterConfig: "adapter"}[type(cfg)]


def tensor_name(name: str) -> str | None:
    """A parameter / buffer / state-dict name -> the name its tensor has in adapter.safetensors, or None (base).
    A head the objective adds (the reward model's scalar head) trains and is saved with the adapter."""
    if name.startswith(("prefix.", "reward_head.")) or ".adapter." in name:
        return name
    return lora.adapter_name(name)


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a run trains (and the prefix's init buffer), under their adapter-file names."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: t for n, t in named.items() if (k := tensor_name(n)) is not None}


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the model's state that no method trains (the frozen base: int8 codes and scales when quantized)."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if tensor_name(k) is None)


def saved_tensors(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """What a checkpoint's adapter.safetensors holds: the trained tensors of `model` (or of a full state dict, e.g.
    gathered from FSDP shards), plus a reparameterized prefix folded into prefix.keys / prefix.values."""
    src = trained_tensors(model) if state is None else {k: v for n, v in state.items()
                                                        if (k := tensor_name(n)) is not None}
    out = {k: v.detach() for k, v in src.items()}
    return out | prefix.fold(out)


def apply(model: Transformer, cfg: Config, new_rows: tuple[int, int] | None = None, vocab: int | None = None,
          seed: int = 0, train: bool = True) -> Transformer:
    """Freeze `model` and add the method's trainable parts (in place). vocab, seed: the tokens a prefix starts from
    (ids below vocab, drawn with seed); train=False builds a prefix in its folded form (for loading)."""
    if isinstance(cfg, lora.LoRAConfig):
        return lora.apply_lora(model, cfg, new_rows)
    lora.freeze(model)
    if isinstance(cfg, prefix.PrefixConfig):
        prefix.apply_prefix(model, cfg, vocab or model.cfg.vocab_size, seed, train)
    else:
        bottleneck.apply_adapters(model, cfg)
    lora.train_new_rows(model, new_rows)
    return model


def config_from(cfg: dict) -> Config:
    """The method's settings recorded in an adapter_config.json."""
    m = cfg["method"]
    if m == "lora":
        return lora.LoRAConfig(cfg["rank"], cfg["alpha"], cfg["dropout"], tuple(cfg["targets"]))
    if m == "prefix":
        return prefix.PrefixConfig(**cfg["prefix"])
    return bottleneck.AdapterConfig(**cfg["adapter"])


def adapter_config(cfg: Config, model: Transformer, base: str | None, base_vocab: int, added: list[str]) -> dict:
    """What adapter_config.json records: the method, its settings, and what the adapter fits."""
    m = method_of(cfg)
    if m == "lora":
        return lora.adapter_config(cfg, model, base, base_vocab, added) | {"method": "lora"}
    return {"format": FORMAT, "version": 1, "method": m, m: asdict(cfg), "base": base, "base_vocab": base_vocab,
            "added_tokens": added,
            "base_model": {k: v for k, v in model.cfg.architecture().items() if k != "vocab_size"}}


def read_config(directory: str | Path) -> dict:
    """adapter_config.json of one of our adapters, with "method" filled in; one CheckpointError otherwise."""
    p = Path(directory) / lora.ADAPTER_CONFIG
    if not p.is_file():
        raise CheckpointError(f"{directory} holds no adapter (no {lora.ADAPTER_CONFIG})")
    cfg = json.loads(p.read_text())
    if cfg.get("format") == lora.FORMAT:
        return cfg | {"method": "lora"}
    if cfg.get("format") == FORMAT and cfg.get("method") in METHODS:
        return cfg
    if cfg.get("format") == FORMAT:
        raise CheckpointError(f"{p}: method {cfg.get('method')!r} is not one this version reads "
                              f"({', '.join(METHODS)})")
    what = f"a Hugging Face PEFT adapter ({cfg['peft_type']})" if "peft_type" in cfg else \
        f"not one of our adapter configs (format {cfg.get('format')!r})"
    raise CheckpointError(f"{p} is {what}: import it with llm import-peft")


def load_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Apply the adapter in `directory` to a base model (frozen; LoRA unmerged, a prefix folded). A base it does not
    fit is one CheckpointError naming what differs; the model's vocab grows for the adapter's added tokens."""
    cfg = read_config(directory)
    lora.check_base(model, cfg, directory)
    n_new = len(cfg.get("added_tokens") or [])
    lora.grow_vocab(model, cfg["base_vocab"] + n_new)
    apply(model, config_from(cfg), (cfg["base_vocab"], n_new) if n_new else None, cfg["base_vocab"], train=False)
    if cfg.get("reward_head"):  # a LoRA reward model: its head is in the adapter file
        model.add_reward_head()
    path = Path(directory) / lora.ADAPTER_FILE
    load_tensors(model, read_tensors(path)[0], path)
    return model


def load_tensors(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """Strict: every trained tensor of `model` present with its shape, nothing else; a prefix reads the form it
    has (folded rows, or the reparameterization when training) and skips the other."""
    own = trained_tensors(model)
    if any(k.startswith("prefix.") for k in own):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("prefix.") or k in own}
    lora.copy_exactly(own, tensors, source, "adapter tensors")


def merge(model: Transformer) -> Transformer:
    """Fold a LoRA adapter into the weights (llm/lora.py); a prefix or bottleneck adapters cannot be: one error."""
    if model.prefix is not None:
        raise ConfigError("a prefix is not a weight: it cannot be merged into the model; load it with its base "
                          "(sample.py --checkpoint BASE --peft DIR, or the run's checkpoint alone)")
    if bottleneck.is_adapter(model):
        raise ConfigError("bottleneck adapters are not mergeable (a nonlinearity sits between their two "
                          "projections); load them with their base (sample.py --checkpoint BASE --peft DIR)")
    return lora.merge(model)
