"""What the preference objectives share (reward.py, dpo.py): preference data, paired batches, a frozen second
model with the same tokenizer, and the per-row log-probabilities of the answer tokens.

A paired batch is x, y (2B, L) from llm/data/preference.py: rows 0..B-1 the chosen conversations, rows B..2B-1
the rejected ones, y = -100 outside the answer tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm import loading
from llm.config import ConfigError, DataConfig
from llm.data import preference
from llm.data.sft import IGNORE
from llm.tokenizer import Tokenizer
from llm.train.objectives.base import Context, Objective, Say

PROBE = "def main():\n    print('hello, world')  # 3.14 <|im_start|>user\n"


class PairObjective(Objective):
    """Preference data in, paired batches out; subclasses define the loss."""

    def check(self) -> None:
        if not preference.is_preference(self.dcfg):
            raise ConfigError(f"--objective {self.name} trains on preference pairs: give --dataset "
                              f"{preference.EMBEDDED} or a .jsonl of {{\"prompt\", \"chosen\", \"rejected\"}} lines "
                              f"(got {self.dcfg.dataset!r})")
        if not self.tcfg.init_from:
            raise ConfigError(f"--objective {self.name} starts from a trained (usually SFT) model: give --init-from")

    def prepare(self, dcfg: DataConfig, tok: Tokenizer | None, block_size: int, say: Say) -> Path:
        return preference.prepare(dcfg, tok, block_size, say)

    def open_loader(self, path: Path, split: str, batch_size: int, block_size: int, seed: int,
                    fixed: bool = False):
        return preference.PreferenceLoader(path, split, batch_size, block_size, seed, fixed=fixed)

    def val_split(self, manifest: dict) -> str:
        """"dev" (carved from the training questions, --pref-dev-fraction) when the data has it: the held-out
        "val" pairs stay a test that no checkpoint was selected on."""
        return "dev" if "dev" in manifest["splits"] else "val"


def check_same_tokenizer(tok: Tokenizer, other: Tokenizer, vocab: int, other_vocab: int, what: str,
                         source: str) -> None:
    """One ConfigError unless `other` (the `what` model from `source`) tokenizes like `tok`: the same ids for a
    probe text (code, digits, a chat token's text), the same number of ids (chat tokens included) and the same
    padded vocabulary."""
    a, b = tok.encode(PROBE), other.encode(PROBE)
    if a != b or vocab != other_vocab or tok.n_vocab != other.n_vocab:
        raise ConfigError(f"the {what} model {source} has another tokenizer than the trained model (probe text: "
                          f"{len(b)} vs {len(a)} tokens; {other.n_vocab} vs {tok.n_vocab} ids, padded vocabulary "
                          f"{other_vocab} vs {vocab}): both must share one tokenizer (chat tokens included)")


def load_frozen(source: str, ctx: Context, what: str) -> nn.Module:
    """A frozen copy of the model at `source` (any checkpoint argument) on the run's device, in eval mode, with
    its tokenizer checked against the run's."""
    model, tok, _ = loading.load_model(source, ctx.device, kernels=ctx.model.cfg.kernels)
    check_same_tokenizer(ctx.tok, tok, ctx.model.cfg.padded_vocab_size, model.cfg.padded_vocab_size, what, source)
    model.eval().requires_grad_(False)
    ctx.say(f"{what} model: {source} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, frozen)")
    return model


def answer_logps(h: Tensor, head: Tensor, y: Tensor, chunk: int = 8) -> tuple[Tensor, Tensor]:
    """(sum of log p(y_t) over each row's answer tokens (R,), answer token count per row (R,)).

    h (R, L, C) final hidden states, head (V, C) the LM head weight, y (R, L) targets, -100 where not scored.
    Logits are formed `chunk` rows at a time (R * L * V floats at once would be the largest tensor of the step).
    """
    sums = []
    for a in range(0, h.shape[0], chunk):
        logits = h[a: a + chunk] @ head.T  # (r, L, V), log-softmax in at least fp32
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        yy = y[a: a + chunk]
        lp = -F.cross_entropy(logits.flatten(0, 1), yy.flatten().clamp_min(0), reduction="none").view(yy.shape)
        sums.append((lp * (yy != IGNORE)).sum(-1))
    return torch.cat(sums), (y != IGNORE).sum(-1)


def last_scored(y: Tensor) -> Tensor:
    """(R,) the index of each row's last scored position: the hidden state there has read the whole answer."""
    scored = (y != IGNORE).long()
    idx = torch.arange(y.shape[1], device=y.device).expand_as(y)
    return (idx * scored).argmax(-1)
