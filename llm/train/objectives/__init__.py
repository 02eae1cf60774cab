"""Training objectives (llm/train/objectives/base.py has the interface): chosen once by `--objective`.

  ce    next-token cross-entropy; on instruction / chat data only the answer tokens count (SFT)
"""

from __future__ import annotations

from llm.config import ConfigError, DataConfig, TrainConfig
from llm.train.objectives.base import Context, Objective

OBJECTIVES: dict[str, type[Objective]] = {
    "ce": Objective,
}


def make(tcfg: TrainConfig, dcfg: DataConfig) -> Objective:
    """The objective `tcfg.objective` names, its settings checked (one ConfigError before any work)."""
    cls = OBJECTIVES.get(tcfg.objective)
    if cls is None:
        raise ConfigError(f"unknown --objective {tcfg.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    objective = cls(tcfg, dcfg)
    objective.check()
    return objective


__all__ = ["OBJECTIVES", "Context", "Objective", "make"]
