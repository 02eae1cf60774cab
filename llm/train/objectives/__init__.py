"""Training objectives (llm/train/objectives/base.py has the interface): chosen once by `--objective`.

  ce       next-token cross-entropy; on instruction / chat data only the answer tokens count (SFT)
  distill  CE plus a divergence from a frozen teacher's distribution (--teacher; picked by --teacher alone)
  reward   a reward model: a scalar head on the last answer token, Bradley-Terry loss on preference pairs
  dpo      direct preference optimization of the policy against a frozen reference, on preference pairs
  grpo     online RL: sampled answers per prompt, rewards, group-relative advantages, KL to a reference
"""

from __future__ import annotations

from llm.config import ConfigError, DataConfig, TrainConfig
from llm.train.objectives.base import Context, Objective
from llm.train.objectives.distill import Distill
from llm.train.objectives.dpo import DPO
from llm.train.objectives.grpo import GRPO
from llm.train.objectives.reward import Reward

OBJECTIVES: dict[str, type[Objective]] = {
    "ce": Objective,
    "distill": Distill,
    "reward": Reward,
    "dpo": DPO,
    "grpo": GRPO,
}


def make(tcfg: TrainConfig, dcfg: DataConfig) -> Objective:
    """The objective `tcfg.objective` names, its settings checked (one ConfigError before any work)."""
    name = tcfg.objective
    if tcfg.teacher and name == "ce":
        name = "distill"  # --teacher alone asks for distillation
    elif tcfg.teacher and name != "distill":
        raise ConfigError(f"--teacher applies to distillation (--objective ce or distill), not --objective {name}")
    cls = OBJECTIVES.get(name)
    if cls is None:
        raise ConfigError(f"unknown --objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    objective = cls(tcfg, dcfg)
    objective.check()
    return objective


__all__ = ["OBJECTIVES", "Context", "Objective", "make"]
