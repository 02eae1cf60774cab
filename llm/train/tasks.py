"""lm-eval task scores during training (--eval-tasks): on rank 0, at every --eval-interval, through our
lm-eval backend (llm/eval/harness.py) on the model being trained. The scores go to metrics.jsonl and wandb
as eval/<task>/<metric>. The training RNG streams are left as they were, so a run with --eval-tasks takes
the same steps as one without."""

from __future__ import annotations

import random

import numpy as np
import torch

from llm.config import ConfigError, TrainConfig
from llm.eval.perplexity import EvalError
from llm.model import Transformer
from llm.tokenizer import Tokenizer


def _harness():
    """llm.eval.harness, imported when asked for: lm-eval is an optional extra."""
    try:
        from llm.eval import harness
    except EvalError as e:
        raise ConfigError(f"--eval-tasks: {e}") from None
    return harness


def task_list(t: TrainConfig) -> list[str]:
    return [x.strip() for x in (t.eval_tasks or "").split(",") if x.strip()]


def check_tasks(t: TrainConfig) -> None:
    """Before any work: the tasks exist and can run (rank 0 alone, so not on FSDP-sharded weights)."""
    if not t.eval_tasks:
        return
    if t.fsdp:
        raise ConfigError("--eval-tasks scores on rank 0 alone and cannot read FSDP-sharded weights: drop --fsdp "
                          "or score checkpoints afterwards with llm eval --tasks")
    if t.eval_limit is not None and t.eval_limit <= 0:
        raise ConfigError(f"--eval-limit must be > 0, got {t.eval_limit}")
    try:
        _harness().resolve_tasks(task_list(t))
    except EvalError as e:
        raise ConfigError(f"--eval-tasks: {e}") from None


@torch.no_grad()
def task_scores(model: Transformer, tok: Tokenizer, t: TrainConfig) -> dict[str, float]:
    """{"eval/<task>/<metric>": value} of the --eval-tasks on `model` (put back in training mode after)."""
    harness = _harness()
    limit = None if t.eval_limit is None else int(t.eval_limit) if t.eval_limit >= 1 else t.eval_limit
    py, npy = random.getstate(), np.random.get_state()
    devices = [model.lm_head.weight.device] if model.lm_head.weight.is_cuda else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            lm = harness.LLMEvalLM(model=model, tokenizer=tok, batch_size=t.batch_size)
            out = harness.run_tasks(lm, task_list(t), limit, seed_rngs=False)
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        model.train()
    return {f"eval/{task}/{metric.split(',')[0]}": float(v) for task, res in out["results"].items()
            for metric, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in metric}
