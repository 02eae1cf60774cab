"""Config validation: one clear error before any work."""

import pytest

from llm.config import PRESETS, ConfigError, ModelConfig, preset


@pytest.mark.parametrize("kw,msg", [
    (dict(n_embd=100, n_head=3), r"n_embd \(100\) must be divisible by n_head \(3\)"),
    (dict(n_head=6, n_kv_head=4, n_embd=96), r"n_head \(6\) must be divisible by n_kv_head \(4\)"),
    (dict(n_layer=0), "n_layer must be >= 1"),
    (dict(n_embd=15, n_head=5), "RoPE needs an even head_dim, got 3"),
    (dict(n_experts=4, top_k=5), r"top_k \(5\) must be between 1 and n_experts \(4\)"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(dropout=1.5), "dropout must be in"),
], ids=["embd-heads", "kv-heads", "layers", "odd-head-dim", "topk", "norm", "dropout"])
def test_invalid_model_config_gives_one_clear_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**kw)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: tiny, small, 1b, gpt2"):
        preset("huge")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name):
    cfg = ModelConfig(**preset(name))
    assert cfg.n_head % cfg.n_kv_head == 0


def test_derived_fields():
    cfg = ModelConfig(n_embd=256, n_head=8)
    assert cfg.head_dim == 32 and cfg.n_kv_head == 8 and cfg.intermediate_size == 704
    assert ModelConfig(mlp="gelu", n_embd=64, n_head=2).intermediate_size == 256
    assert ModelConfig(vocab_size=2049).padded_vocab_size == 2112


def test_train_help_shows_the_defaults_that_actually_apply():
    # With no --preset the tiny preset's values are used, so --help must show those, not the bare
    # dataclass defaults; and it must name every preset.
    from llm.config import PRESETS, preset
    from llm.train.cli import parser

    text = " ".join(parser().format_help().split())
    tiny = preset("tiny")
    assert f"--block-size INT context length in tokens (default: {tiny['block_size']}, from --preset tiny)" in text
    assert f"(default: {tiny['n_embd']}, from --preset tiny)" in text
    preset_help = text.split("--preset PRESET named", 1)[1].split("--config", 1)[0]
    for name in PRESETS:
        assert name in preset_help, name
    assert "(default: tiny)" in preset_help and "(default: None)" not in preset_help


@pytest.mark.parametrize("flags,want", [([], 3e-4), (["--lr", "1e-4"], 1e-5), (["--lr", "1e-4", "--min-lr", "0"], 0.0),
                                        (["--lr", "1e-3"], 3e-4)])
def test_min_lr_default_follows_a_peak_below_it(flags, want):
    """--lr under the default floor (3e-4) without --min-lr decays to lr / 10 instead of failing the check."""
    from llm.train.cli import resolve_configs

    _, _, tcfg, _ = resolve_configs(flags)
    assert tcfg.min_lr == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("flags,want", [
    ([], "warmup 50 steps to lr 3.00e-03, cosine decay to 3.00e-04 at step 600"),
    (["--lr", "3e-4"], "then constant (--min-lr 3.00e-04 equals --lr"),
    (["--lr", "1e-4", "--warmup-steps", "0"], "lr 1.00e-04, cosine decay to 1.00e-05")])
def test_the_schedule_line_says_when_the_learning_rate_stays_flat(flags, want):
    """The trainer's `schedule:` line: at --lr 3e-4 the default floor equals the peak, so it says nothing decays."""
    from llm.train.cli import resolve_configs
    from llm.train.optim import schedule_line

    _, _, tcfg, _ = resolve_configs(flags)
    assert want in schedule_line(tcfg)
