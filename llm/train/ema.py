"""Weight averaging for every objective: an exponential moving average (EMA) of the trained weights.

    ema_0 = w_0 (the weights the run starts from),  ema_t = d * ema_{t-1} + (1 - d) * w_t

after every optimizer step that updated the weights (a skipped non-finite step does not count), over the
parameters the optimizer trains (the whole model, or a PEFT run's adapter, a reward head included); frozen
tensors are the model's own. With decay d the average weighs the last ~1 / (1 - d) steps: a late-training
average of the noisy iterates that usually generalises better than the last one (Polyak averaging; Izmailov et
al. 2018's SWA is the uniform-window variant). Chosen over averaging saved checkpoints because it needs no extra
checkpoints kept on disk, works at any save interval, and is one fp32 copy of the trained tensors.

The trainer (`--ema-decay D`) validates the average beside the raw weights (`val/ema_loss`, `val/ema/<metric>`),
picks the best checkpoint by the average's validation loss, and saves it in every checkpoint as a complete,
loadable checkpoint `<ckpt>/ema` (`llm sample|score|eval --checkpoint out/ckpt-0000800/ema`; a PEFT run's as an
adapter on the same base). A resume reads it back into the average, bitwise: the run continues exactly as if it
had not stopped. Single-file checkpoints only (no --fsdp / --tp / sharded format): the average is whole tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llm import checkpoint as ckpt_io
from llm import peft
from llm.train import finetune

DIR = "ema"  # the average's checkpoint inside each checkpoint


class EMA:
    """An fp32 moving average of `model`'s trainable parameters (by name); `decay` in (0, 1)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """ema <- d * ema + (1 - d) * w, for every trained parameter (after an optimizer step)."""
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the average (evaluate it, save it); the raw weights come back after,
        exactly (copied out and in, not recomputed)."""
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(raw[n])

    def saved_state(self, adapter: bool) -> dict[str, torch.Tensor]:
        """What `<ckpt>/ema` holds: the model's state (or a PEFT run's adapter tensors) with the average in place of
        the trained weights, copied (the live model is untouched)."""
        with self.swapped():
            state = peft.saved_tensors(self.model) if adapter else ckpt_io.model_tensors(self.model)
            return {k: v.detach().clone() for k, v in state.items()}

    def load(self, ckpt: Path, adapter: dict | None, device: torch.device) -> bool:
        """The average saved in checkpoint `ckpt` back into `shadow`, bitwise (False: that checkpoint has none).
        Read by name into the average only: the live model's parameters are not touched (nor replaced)."""
        path = ckpt / DIR / finetune.weights_file(adapter)
        if not path.is_file():
            return False
        tensors, _ = ckpt_io.read_tensors(path, device=str(device))
        with torch.no_grad():
            for n, t in self.shadow.items():
                k = n if adapter is None else peft.tensor_name(n)
                if k not in tensors or tensors[k].shape != t.shape:
                    raise ckpt_io.CheckpointError(f"{path} does not hold the average of {n} {tuple(t.shape)}")
                t.copy_(tensors[k])
        return True
