"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A dropout(x), W frozen, A (r, in), B (out, r), B = 0 at start.

Targets name the projections of every block: q, k, v (row slices of the fused `attn.wqkv`, each with its own
A and B writing only its rows), o (`attn.wo`), gate / up / down (`mlp.w1` / `mlp.w3` / `mlp.w2`). A
`LoRALinear` *is* the nn.Linear it wraps (the same weight and bias, same state-dict names) plus `lora_A.<t>`
and `lora_B.<t>` per target. When fine-tuning added tokens to the vocabulary (chat templates), their rows of
the embedding and the head are trainable too, as a parametrization of those weights (`NewRows`).

Adapter files (`save_adapter` / `load_adapter`): adapter.safetensors (the LoRA tensors and any new rows,
megabytes) and adapter_config.json (rank, alpha, dropout, targets, the base's architecture and vocab).
`merge` folds an adapter into the weights, leaving a plain Transformer.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from torch.nn.utils import parametrize

from llm.checkpoint import CheckpointError, read_tensors
from llm.config import ConfigError
from llm.layers import MLP
from llm.model import Transformer
from llm.quant import QuantLinear

ADAPTER_FILE, ADAPTER_CONFIG, FORMAT = "adapter.safetensors", "adapter_config.json", "llm-lora"
TARGETS = {"q": "attn.wqkv", "k": "attn.wqkv", "v": "attn.wqkv", "o": "attn.wo", "gate": "mlp.w1", "up": "mlp.w3",
           "down": "mlp.w2"}
ROW_KEYS = {"tok_emb": "tok_emb.new_rows", "lm_head": "lm_head.new_rows"}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if self.rank <= 0:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"q,v" -> ("q", "v"); an unknown name is a ConfigError naming the known ones."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ConfigError(f"--lora-targets: {', '.join(bad) or 'none given'} is not a LoRA target; choose from "
                          f"{','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)  # canonical order


class LoRAMixin:
    """The adapters of one projection: `lora_A.<t>` (r, in), `lora_B.<t>` (rows of t, r) per target row slice t."""

    def init_adapters(self, parts: dict[str, tuple[int, int]], cfg: LoRAConfig, device, dtype) -> None:
        self.parts, self.scale = dict(sorted(parts.items(), key=lambda kv: kv[1])), cfg.scale
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(cfg.rank, self.in_features, device=device,
                                                                    dtype=dtype)) for n in self.parts})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(b - a, cfg.rank, device=device, dtype=dtype))
                                        for n, (a, b) in self.parts.items()})
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's and the paper's init; B = 0 keeps step 0 exact
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def add_lora(self, x: Tensor, y: Tensor) -> Tensor:
        """y (..., out) = the frozen projection of x (..., in), plus scale * B_t A_t dropout(x) on each target's
        rows."""
        xd = self.lora_dropout(x)
        out, at = [], 0
        for n, (a, b) in self.parts.items():
            if a > at:
                out.append(y[..., at:a])
            out.append(y[..., a:b] + F.linear(F.linear(xd, self.lora_A[n]), self.lora_B[n]) * self.scale)
            at = b
        if at < self.out_features:
            out.append(y[..., at:])
        return out[0] if len(out) == 1 else torch.cat(out, -1)

    def delta(self) -> Tensor:
        """The update the adapter adds to the weight, (out, in)."""
        A = next(iter(self.lora_A.values()))
        d = torch.zeros(self.out_features, self.in_features, device=A.device, dtype=A.dtype)
        for n, (a, b) in self.parts.items():
            d[a:b] = self.lora_B[n] @ self.lora_A[n] * self.scale
        return d


class LoRALinear(LoRAMixin, nn.Linear):
    """The wrapped nn.Linear (its own weight and bias) plus a low-rank update per target row slice."""

    def __init__(self, base: nn.Linear, parts: dict[str, tuple[int, int]], cfg: LoRAConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.init_adapters(parts, cfg, base.weight.device, base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out): W x + b, plus the adapters."""
        return self.add_lora(x, F.linear(x, self.weight, self.bias))


class QuantLoRALinear(LoRAMixin, QuantLinear):
    """QLoRA-style: the wrapped QuantLinear (its own int8 / int4 codes and scales, frozen, dequantized in the
    matmul; same state-dict names) plus the adapters, which train in the scales' dtype (the model's)."""

    def __init__(self, base: QuantLinear, parts: dict[str, tuple[int, int]], cfg: LoRAConfig) -> None:
        nn.Module.__init__(self)
        for k in ("in_features", "out_features", "mode", "kernels", "group_size", "_cache"):
            setattr(self, k, getattr(base, k))
        for k in ("qweight", "scales", "zeros", "bias"):
            self.register_buffer(k, getattr(base, k))
        self.init_adapters(parts, cfg, base.scales.device, base.scales.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.add_lora(x, QuantLinear.forward(self, x))


LORA_LAYERS = (LoRALinear, QuantLoRALinear)


class NewRows(nn.Module):
    """A weight parametrization: rows [start, start + n) replaced by the trainable `rows` (added tokens)."""

    def __init__(self, rows: Tensor, start: int) -> None:
        super().__init__()
        self.rows, self.start = nn.Parameter(rows.detach().clone()), start

    def forward(self, w: Tensor) -> Tensor:
        s, e = self.start, self.start + self.rows.shape[0]
        return torch.cat([w[:s], self.rows.to(w.dtype), w[e:]], 0)


def grow_vocab(model: Transformer, n_vocab: int) -> None:
    """Make room for ids up to n_vocab: the embedding and head grow to the padded size if needed; the rows of
    the ids added (old vocab_size .. n_vocab) start at the mean of the existing rows, the padding rows at 0."""
    cfg, old = model.cfg, model.cfg.vocab_size
    if n_vocab <= old:
        return
    cfg.vocab_size = n_vocab
    V, C = cfg.padded_vocab_size, cfg.n_embd
    with torch.no_grad():
        for name in ("tok_emb", "lm_head"):
            w = getattr(model, name).weight
            new = torch.zeros(max(V, w.shape[0]), C, dtype=w.dtype, device=w.device)
            new[: w.shape[0]] = w
            new[old:n_vocab] = w[:old].mean(0)
            if name == "tok_emb":
                model.tok_emb = nn.Embedding(new.shape[0], C, _weight=new, device=w.device, dtype=w.dtype)
                if cfg.tie_embeddings:
                    break
            else:
                model.lm_head = nn.Linear(C, new.shape[0], bias=False, device=w.device, dtype=w.dtype)
                model.lm_head.weight = nn.Parameter(new)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def _target_parts(model: Transformer, target: str) -> dict[str, tuple[int, int]]:
    c = model.cfg
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    return {"q": {"q": (0, q)}, "k": {"k": (q, q + kv)}, "v": {"v": (q + kv, q + 2 * kv)}}.get(target, {})


def apply_lora(model: Transformer, cfg: LoRAConfig, new_rows: tuple[int, int] | None = None) -> Transformer:
    """Freeze `model` and add LoRA on cfg.targets in every block (in place); new_rows (start, n): those rows of the
    embedding and the head become trainable. Unknown or unfit targets are a ConfigError."""
    freeze(model)
    for i, block in enumerate(model.blocks):
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for t in cfg.targets:
            path = TARGETS[t]
            if path.startswith("mlp.") and not isinstance(block.mlp, MLP):
                raise ConfigError(f"--lora-targets {t}: block {i} has a Mixture-of-Experts layer, not a dense MLP; "
                                  "target q,k,v,o there")
            if t == "up" and model.cfg.mlp != "swiglu":
                raise ConfigError("--lora-targets up: a GELU MLP has no up projection (use gate for c_fc, down)")
            lin = block.get_submodule(path)
            groups.setdefault(path, {}).update(_target_parts(model, t) or {t: (0, lin.out_features)})
        for path, parts in groups.items():
            parent, attr = path.rsplit(".", 1)
            lin = block.get_submodule(path)
            layer = QuantLoRALinear if isinstance(lin, QuantLinear) else LoRALinear
            setattr(block.get_submodule(parent), attr, layer(lin, parts, cfg))
    train_new_rows(model, new_rows)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block every LoRA projection computes its frozen base alone (scale 0): the base model, with no
    second copy in memory (DPO's reference with a LoRA policy). New token rows stay as trained."""
    layers = [m for m in model.modules() if isinstance(m, LoRAMixin)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def train_new_rows(model: Transformer, new_rows: tuple[int, int] | None) -> None:
    """new_rows (start, n): those rows of the embedding and the head become trainable (`NewRows`), the rest
    frozen; None: nothing. Every parameter-efficient method does this for the tokens a chat template added."""
    if new_rows is None:
        return
    start, n = new_rows
    rows = NewRows(model.tok_emb.weight[start: start + n], start)
    parametrize.register_parametrization(model.tok_emb, "weight", rows)
    head = rows if model.cfg.tie_embeddings else NewRows(model.lm_head.weight[start: start + n], start)
    parametrize.register_parametrization(model.lm_head, "weight", head)  # tied: the same rows


def adapter_name(name: str) -> str | None:
    """A parameter or state-dict name -> its adapter name (LoRA A/B as they are, new rows by ROW_KEYS), or None."""
    if ".lora_" in name:
        return name
    if name.endswith("parametrizations.weight.0.rows"):
        return ROW_KEYS[name.split(".")[0]]
    return None


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors of a LoRA model under their adapter names (LoRA A/B and any new rows)."""
    return {k: p for n, p in model.named_parameters() if (k := adapter_name(n)) is not None}


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors of a full state dict (e.g. gathered from FSDP shards) under their adapter names."""
    return {k: v for n, v in state.items() if (k := adapter_name(n)) is not None}


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the model's state that is not adapter (the frozen base: int8 codes and scales when quantized)."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if adapter_name(k) is None)


def merge(model: Transformer) -> Transformer:
    """Fold every adapter into the weights and drop the LoRA modules: a plain Transformer (in place)."""
    with torch.no_grad():
        for block in model.blocks:
            for path in sorted(set(TARGETS.values())):
                parent, attr = path.rsplit(".", 1)
                lin = block.get_submodule(parent)._modules.get(attr)
                if isinstance(lin, QuantLoRALinear):
                    raise ConfigError("this adapter sits on a quantized base: merge it into the unquantized checkpoint "
                                      "the base was quantized from (its weights plus the adapter, in full precision)")
                if isinstance(lin, LoRALinear):
                    plain = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
                    plain.weight = nn.Parameter(lin.weight + lin.delta())
                    plain.bias = lin.bias
                    setattr(block.get_submodule(parent), attr, plain)
    for m in (model.tok_emb, model.lm_head):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- adapter files


def adapter_config(cfg: LoRAConfig, model: Transformer, base: str | None, base_vocab: int,
                   added: list[str]) -> dict:
    """What adapter_config.json records: the LoRA settings and what the adapter fits."""
    return {"format": FORMAT, "version": 1, **asdict(cfg), "targets": list(cfg.targets), "base": base,
            "base_vocab": base_vocab, "added_tokens": added,
            "base_model": {k: v for k, v in model.cfg.architecture().items() if k != "vocab_size"}}


def save_adapter(directory: str | Path, model: nn.Module, config: dict) -> None:
    """adapter.safetensors + adapter_config.json into `directory` (which exists)."""
    d = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors(model).items()}
    save_file(tensors, d / ADAPTER_FILE, metadata={"format": FORMAT})
    (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def read_adapter_config(directory: str | Path) -> dict:
    p = Path(directory) / ADAPTER_CONFIG
    if not p.is_file():
        raise CheckpointError(f"{directory} holds no LoRA adapter (no {ADAPTER_CONFIG})")
    cfg = json.loads(p.read_text())
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an llm LoRA adapter config (format {cfg.get('format')!r}); a PEFT adapter "
                              "is imported with llm import-peft")
    return cfg


def load_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Apply the adapter in `directory` to a base model (frozen, unmerged). A base it does not fit is one clear
    CheckpointError naming what differs. The model's vocab must already hold the adapter's added tokens."""
    cfg = read_adapter_config(directory)
    check_base(model, cfg, directory)
    lcfg = LoRAConfig(cfg["rank"], cfg["alpha"], cfg["dropout"], tuple(cfg["targets"]))
    n_new = len(cfg.get("added_tokens") or [])
    grow_vocab(model, cfg["base_vocab"] + n_new)
    apply_lora(model, lcfg, (cfg["base_vocab"], n_new) if n_new else None)
    load_adapter_tensors(model, read_tensors(Path(directory) / ADAPTER_FILE)[0], Path(directory) / ADAPTER_FILE)
    return model


def check_base(model: Transformer, cfg: dict, directory: str | Path) -> None:
    """One CheckpointError naming what differs when an adapter's recorded base_model is not `model`'s."""
    arch = {k: v for k, v in model.cfg.architecture().items() if k != "vocab_size"}
    diff = sorted(k for k, v in cfg["base_model"].items() if arch.get(k) != v)
    if diff:
        raise CheckpointError(f"the adapter in {directory} was trained on another base: "
                              + ", ".join(f"{k} {cfg['base_model'][k]} vs base {arch.get(k)}" for k in diff[:6]))


def copy_exactly(own: dict[str, Tensor], tensors: dict[str, Tensor], source: Path | str, what: str) -> None:
    """Copy tensors[k] into own[k] for every k, strictly: the same names and shapes, nothing missing or extra
    (else one CheckpointError naming up to six differences and `what` the model's tensors are)."""
    bad = sorted(set(own) ^ set(tensors)) + sorted(
        f"{k} {tuple(tensors[k].shape)} vs {tuple(p.shape)}" for k, p in own.items()
        if k in tensors and tensors[k].shape != p.shape)
    if bad:
        raise CheckpointError(f"{source} does not fit the model's {what}: {', '.join(bad[:6])}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


def load_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """Strict: every adapter tensor present with its shape, nothing else."""
    copy_exactly(adapter_tensors(model), tensors, source, "LoRA layers")
