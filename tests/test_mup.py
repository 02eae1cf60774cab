"""µP (llm/train/mup.py): the coordinate check, the parametrisation's pieces, and --mup through train.py."""

import json

import pytest
import torch
from conftest import tiny_config, train_argv, write_code_corpus

from llm.config import TrainConfig
from llm.model import Transformer
from llm.train import mup
from llm.train.cli import main
from llm.train.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_rms(width: int, use_mup: bool, steps: int = 4, lr: float = 1e-2) -> dict[str, float]:
    """Per-layer activation RMS after `steps` AdamW steps on one fixed batch, at `width` (base width 64)."""
    tcfg = TrainConfig(mup=use_mup, mup_base_width=64, lr=lr, weight_decay=0.0)
    mcfg = mup.configure(tiny_config(n_embd=width, block_size=32), tcfg)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    mup.scale_init(model, mcfg, tcfg)
    opt = make_optimizer(model, tcfg, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    x = torch.randint(0, 101, (4, 33), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return mup.activation_rms(model, x[:, :-1])


def test_coordinate_check_is_flat_under_mup_and_grows_without_it():
    """Width x8 (64 -> 512): under µP every layer's activation RMS (attention, MLP, block outputs, logits) stays
    <= 1.5x (and does not vanish, >= 0.5x); in the standard parametrisation the hidden layers' grow far more."""
    mup_ratio = {k: b / a for (k, a), b in zip(_trained_rms(64, True).items(), _trained_rms(512, True).values())}
    sp_ratio = {k: b / a for (k, a), b in zip(_trained_rms(64, False).items(), _trained_rms(512, False).values())}
    assert len(mup_ratio) == 3 * 2 + 1
    assert all(0.5 <= r <= 1.5 for r in mup_ratio.values()), mup_ratio  # (measured 0.64-1.09)
    assert all(sp_ratio[f"{kind}/{i}"] > 4 for kind in ("attn", "mlp", "block") for i in range(2)), sp_ratio


def test_mup_is_the_standard_parametrisation_at_the_base_width():
    tcfg = TrainConfig(mup=True, mup_base_width=32)
    mcfg = mup.configure(tiny_config(), tcfg)
    assert (mcfg.attn_mult, mcfg.output_mult) == (1.0, 1.0)
    wide = mup.configure(tiny_config(n_embd=128), tcfg)
    assert wide.output_mult == 0.25 and wide.attn_mult == 0.5  # head_dim 8 -> 32: 1/d attention
    groups = make_optimizer(Transformer(wide), tcfg, torch.device("cpu")).param_groups
    assert groups[0]["lr_mult"] == 0.25 and "lr_mult" not in groups[1]
    names = {n for n, p in Transformer(wide).named_parameters() if p.dim() >= 2 and n.startswith("blocks")}
    assert len(groups[0]["params"]) == len(names)


def test_mup_flag_trains_and_saves_the_multipliers(tmp_path):
    write_code_corpus(tmp_path)
    assert main(train_argv(tmp_path, "mup", n_embd=64, mup_base_width=32) + ["--mup"]) == 0
    cfg = json.loads((tmp_path / "mup" / "ckpt-0000006" / "config.json").read_text())["model"]
    assert cfg["output_mult"] == 0.5 and cfg["attn_mult"] == pytest.approx(2 ** -0.5)
