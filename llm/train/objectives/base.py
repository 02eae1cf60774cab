"""The objective interface: what one training step optimizes.

The trainer keeps one loop (llm/train/trainer.py). Everything that differs between next-token pretraining,
SFT, distillation, a reward model, DPO or GRPO lives in an `Objective`: the data it prepares and the batches its
loaders return, the extra models it needs (teacher, reference, reward model), the loss and the metrics. Adding an
objective adds a file here and one line in `OBJECTIVES` (llm/train/objectives/__init__.py), not a branch in the
loop.

The trainer calls, in order:
  check(tcfg, dcfg)                      refuse bad settings before anything is loaded (one ConfigError)
  prepare(dcfg, tok, block_size, say)    the prepared dataset's directory (tokenized, manifest.json)
  open_loader(path, split, B, T, seed)   a loader whose .batch(index, device) gives this objective's batches
  val_split(manifest)                    the split validation (and the best checkpoint) uses: "val" or "dev"
  setup(ctx)                             once the model is built and on its device, before it is wrapped:
                                         load and check extra models (they are frozen, never in the optimizer)
  loss(fwd, batch)                       per micro-batch: (scalar loss to backpropagate, {metric: 0-dim tensor})
  tokens(batch)                          the input ids of a batch (the health probe's forward)
  state_dict() / load_state_dict(d)      JSON-able state saved in trainer.json (resume is exact)
Metrics are averaged over micro-batches and ranks and logged as `<name>` (train) and `val/<name>` (validation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llm.config import DataConfig, TrainConfig
from llm.data.mixture import mixture_metrics
from llm.data.sft import PackedBatch, open_loader
from llm.tokenizer import Tokenizer
from llm.train import finetune

Say = Callable[..., None]


@dataclass
class Context:
    """What `Objective.setup` may use: the run's settings, tokenizer, the (unwrapped) model and its device."""

    tcfg: TrainConfig
    dcfg: DataConfig
    tok: Tokenizer
    model: nn.Module
    device: torch.device
    dtype: torch.dtype   # the run's autocast dtype (float32: none)
    say: Say


class Objective:
    """Base class: next-token cross-entropy on whatever the data gives (pretraining shards or SFT rows, whose
    targets are -100 outside the answers). Subclasses override what differs."""

    name = "ce"
    unit = "nats/token"  # what the loss is measured in (the run's last line says it)

    def __init__(self, tcfg: TrainConfig, dcfg: DataConfig) -> None:
        self.tcfg, self.dcfg = tcfg, dcfg

    def check(self) -> None:
        """Raise ConfigError for settings this objective cannot use (before any data or model is loaded)."""

    def prepare(self, dcfg: DataConfig, tok: Tokenizer | None, block_size: int, say: Say) -> Path:
        return finetune.prepare(dcfg, tok, block_size, say)

    def open_loader(self, path: Path, split: str, batch_size: int, block_size: int, seed: int,
                    fixed: bool = False):
        return open_loader(path, split, batch_size, block_size, seed, fixed, pack=self.dcfg.sft_pack)

    def val_split(self, manifest: dict) -> str:
        """The prepared split the trainer validates on and picks its best checkpoint by."""
        return "val"

    def setup(self, ctx: Context) -> None:
        """Load extra models here (frozen, in eval mode)."""

    def loss(self, fwd: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean loss of the micro-batch, metrics). `fwd` is the model as trained (DDP / FSDP2 / compiled) in
        training, the bare model in validation; call it, not its submodules, so the wrappers' hooks run."""
        x, y = batch
        kw = {"segments": batch.segments} if isinstance(batch, PackedBatch) else {}  # --sft-pack: one mask per example
        _, loss = fwd(x, y, **kw)
        return loss, mixture_metrics(batch, x.device)  # {} unless the data is a weighted mixture

    def tokens(self, batch) -> Tensor:
        return batch[0]

    def next_command(self, out: Path) -> str:
        """The line that ends a finished run: what to do with its checkpoint."""
        return f"sample with: llm sample --checkpoint {out}"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
