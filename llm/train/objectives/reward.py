"""A reward model (Ouyang et al. 2022, step 2 of RLHF): a scalar head on the final hidden state of the last
answer token, trained on preference pairs with the Bradley-Terry loss

    loss = -log sigmoid(r(chosen) - r(rejected))

or with --reward-smoothing eps (label smoothing: each pair counts as right with probability 1 - eps, the
"conservative" loss of cDPO / TRL's label_smoothing, here on the reward margin d = r(chosen) - r(rejected))

    loss = -(1 - eps) log sigmoid(d) - eps log sigmoid(-d)

whose minimum is at d = log((1 - eps) / eps), so a pair already ranked by that margin stops pulling the weights.

The --init-from model (usually the SFT model) gets a zero-initialised head (Transformer.add_reward_head), so
every score starts at 0 and the loss at log 2. Its LM head is frozen (the score does not read it; under DDP a
trainable weight without a gradient would stall the reducer). The checkpoint is the whole model with the
head (config `reward_head: true`), or with --lora-rank (any --peft) the adapter with the head beside it in
adapter.safetensors (adapter_config.json `reward_head: true`; the base stays frozen): `score` reads either back
(a LoRA one on its recorded base), and --objective grpo can use either as its reward (--reward-model).
Metrics: reward/acc (pairs ranked right), reward/margin, reward/chosen, reward/rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.chat import encode_chat
from llm.config import ConfigError
from llm.tokenizer import Tokenizer
from llm.train.objectives.base import Context
from llm.train.objectives.pairs import PairObjective, last_scored


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean over the pairs (B,) of -(1 - eps) log sigmoid(d) - eps log sigmoid(-d), d = r_c - r_r, eps = smoothing
    (0: the plain Bradley-Terry loss)."""
    d = r_chosen - r_rejected
    loss = -F.logsigmoid(d)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * F.logsigmoid(-d)
    return loss.mean()


def scores(fwd: nn.Module, head: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(R,) the reward of each row: the head on the hidden state of its last scored position."""
    h, _ = fwd(x, hidden=True)  # (R, L, C)
    last = h[torch.arange(x.shape[0], device=x.device), last_scored(y)]  # (R, C)
    return head(last).squeeze(-1).float()


class Reward(PairObjective):
    name = "reward"
    unit = "nats/pair"

    def next_command(self, out) -> str:
        return f"score with: llm score --checkpoint {out} --prompt QUESTION --answer ANSWER [--answer ANSWER ...]"

    def check(self) -> None:
        super().check()
        if not 0 <= self.tcfg.reward_smoothing < 0.5:
            raise ConfigError(f"--reward-smoothing must be in [0, 0.5) (got {self.tcfg.reward_smoothing:g}): the share "
                              "of each pair's loss that counts it as ranked the other way")

    def setup(self, ctx: Context) -> None:
        model = ctx.model
        model.add_reward_head()
        if not model.cfg.tie_embeddings:
            model.lm_head.requires_grad_(False)  # its chat-token rows too, when a PEFT run added them
        self.head = model.reward_head
        ctx.say("reward model: a scalar head on the last answer token's hidden state (Bradley-Terry loss)")

    def loss(self, fwd, batch):
        x, y = batch
        r = scores(fwd, self.head, x, y)
        rc, rr = r.chunk(2)
        margin = (rc - rr).detach()
        loss = bradley_terry(rc, rr, self.tcfg.reward_smoothing)
        return loss, {"reward/acc": (margin > 0).float().mean(), "reward/margin": margin.mean(),
                      "reward/chosen": rc.detach().mean(), "reward/rejected": rr.detach().mean()}


@torch.inference_mode()
def score(model: nn.Module, tok: Tokenizer, messages: list[dict]) -> float:
    """The reward model's score of one conversation that ends with an assistant answer."""
    ids, scored = encode_chat(tok, messages)
    return score_ids(model, ids)


@torch.inference_mode()
def score_ids(model: nn.Module, ids: list[int]) -> float:
    """The score of a rendered conversation's ids (ending with the answer's end-of-turn token): the head on the
    hidden state that predicts the last id, as in training (`last_scored`)."""
    if getattr(model, "reward_head", None) is None:
        raise ConfigError("this checkpoint has no reward head: train one with --objective reward")
    x = torch.tensor([ids[:-1]], device=model.lm_head.weight.device)
    h, _ = model(x, hidden=True)
    return model.reward_head(h[:, -1]).float().item()
