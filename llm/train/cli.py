"""train.py's command line: flags from the config dataclasses, settings resolved in order of precedence, exit codes.

Precedence: dataclass defaults < --preset < (the checkpoint's settings with --resume) < --config < flags.
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from llm import checkpoint as ckpt_io
from llm.checkpoint import CheckpointError
from llm.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    HelpFormatter,
    ModelConfig,
    TrainConfig,
    add_dataclass_args,
    build,
    check_configs,
    check_types,
    known_fields,
    load_toml,
    preset,
)
from llm.data.corpus import DataError
from llm.quant import QuantError
from llm.tokenizer import TokenizerError
from llm.train import distributed as dd
from llm.train.trainer import TrainingDiverged, train

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, QuantError)
DEFAULT_PRESET = "tiny"  # the model trained when no --preset is given


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not a usage block
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llm train", formatter_class=HelpFormatter,
        description="Pretrain a decoder-only Transformer. Precedence: defaults < --preset < (the checkpoint's "
                    "settings with --resume) < --config < flags. Under torchrun it trains data-parallel.")
    # "%(default).0s" prints nothing; it only stops the formatter appending "(default: None)".
    p.add_argument("--preset",
                   help=f"named model preset: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})%(default).0s")
    p.add_argument("--config", help="TOML file of settings (keys are flag names with underscores; optional "
                                    "[model] [data] [train] sections)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from the latest checkpoint in --out-dir, or from the given checkpoint dir; its "
                        "settings are the defaults, flags override them")
    add_dataclass_args(p, ModelConfig, "model", base=preset(DEFAULT_PRESET),
                       base_name=f"--preset {DEFAULT_PRESET}")
    add_dataclass_args(p, DataConfig, "data")
    add_dataclass_args(p, TrainConfig, "training", group_of=_training_section)
    return p


# TrainConfig's flags in --help sections: the first section whose names or name prefixes match a field.
TRAINING_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("training: optimizer and schedule", ("max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1",
                                          "beta2", "grad_clip", "optimizer")),
    ("training: Muon", ("muon_",)),
    ("training: µP", ("mup", "mup_")),
    ("training: fine-tuning (LoRA, prefix, adapters)", ("init_from", "lora_", "peft", "prefix_", "adapter_")),
    ("training: objectives (distillation, DPO, GRPO)", ("objective", "teacher", "distill_", "ref", "dpo_", "reward_",
                                                        "reward", "grpo_")),
    ("training: evaluation", ("eval_",)),
    ("training: checkpoints", ("save_interval", "keep_last", "checkpoint_", "async_checkpoint")),
    ("training: health and loss spikes", ("health_", "spike_", "max_bad_steps")),
    ("training: parallelism and memory", ("fsdp", "tp", "sequence_parallel", "global_batch_tokens",
                                          "activation_checkpointing")),
    ("training: logging", ("log_interval", "wandb", "wandb_")),
)


def _training_section(name: str) -> str:
    """The --help section of a TrainConfig field (exact name, or a prefix ending in '_'); else 'training'."""
    for title, keys in TRAINING_SECTIONS:
        if any(name == k or (k.endswith("_") and name.startswith(k)) for k in keys):
            return title
    return "training"


def resolve_configs(argv: list[str] | None) -> tuple[ModelConfig, DataConfig, TrainConfig, argparse.Namespace]:
    """(model, data, train configs, args); args.explicit holds the keys set by --config or flags."""
    args = parser().parse_args(argv)
    base: dict = preset(args.preset or DEFAULT_PRESET)  # model fields only
    values: dict = {}
    if args.config:
        file_vals = load_toml(args.config)
        unknown = set(file_vals) - known_fields() - {"preset"}
        if unknown:
            raise ConfigError(f"unknown keys in {args.config}: {', '.join(sorted(unknown))}")
        check_types(file_vals, args.config)
        if "preset" in file_vals:
            name = file_vals.pop("preset")
            base = base if args.preset else preset(name)
        values.update(file_vals)
    values.update({k: v for k, v in vars(args).items() if k not in ("preset", "config", "resume")})
    if args.resume is not None:  # the checkpoint's own settings sit under --config and flags
        out = Path(values.get("out_dir", TrainConfig.out_dir))
        if args.resume == "" and not (out / ckpt_io.LATEST).is_file():
            raise ConfigError(f"--resume: no checkpoint in {out} (no {out / ckpt_io.LATEST}); drop --resume to start "
                              "a new run")
        src = ckpt_io.resolve(args.resume or out)
        saved = ckpt_io.read_config(src)
        base = {**saved.get("model", {}), **saved.get("data", {}), **saved.get("train", {}),
                "out_dir": str(src.parent)} | ({} if args.preset is None else preset(args.preset))
        base.pop("path", None)
        for k in ("tp", "sequence_parallel"):  # the tensor-parallel layout belongs to the launch, like the world size
            base.pop(k, None)
    args.explicit = set(values)
    merged = base | values
    lr = merged.get("lr", TrainConfig.lr)
    if "min_lr" not in merged and lr < TrainConfig.min_lr:  # the default floor would sit above the peak
        merged["min_lr"] = lr / 10
    mcfg, dcfg, tcfg = build(ModelConfig, merged), build(DataConfig, merged), build(TrainConfig, merged)
    check_configs(dcfg, tcfg)
    return mcfg, dcfg, tcfg, args


def main(argv: list[str] | None = None, callbacks: Sequence[Callable[[int, dict], bool | None]] = ()) -> int:
    """train.py: 0 when done or stopped by SIGTERM, 130 after Ctrl-C, 2 for bad input, 1 when training diverged."""
    tag = f"[rank {dd.env_rank()}] " if dd.env_rank() is not None else ""
    try:
        mcfg, dcfg, tcfg, args = resolve_configs(argv)
        summary = train(mcfg, dcfg, tcfg, args.resume, args.explicit, callbacks)
    except USER_ERRORS as e:
        print(f"error: {tag}{e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {tag}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {tag}interrupted (Ctrl-C); checkpoints already written are intact", file=sys.stderr)
        return 130
    finally:
        dd.cleanup()
    return 130 if summary["signal"] == signal.SIGINT else 0
