"""Direct preference optimization (Rafailov et al. 2023): the policy is trained on preference pairs against a
frozen reference policy pi_ref, with no reward model and no sampling:

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))))

log pi(y|x) sums the log-probabilities of the answer tokens only (the chat template's answer mask, as SFT).
The reference log-probs are computed on the fly for every micro-batch, under inference mode (a forward of the
frozen model, no graph), not precomputed: nothing to cache or invalidate, and resume stays exact because the
reference is deterministic. The reference is --ref, or by default a frozen copy of the starting policy (the --init-from
model); with LoRA it is the same model with the adapters switched off (lora.disabled), so no second copy is
held (start from an SFT model: chat-token rows a run adds are trained with the adapters and stay on).
--dpo-nll alpha adds alpha * the chosen answers' per-token NLL (RPO; TRL's rpo_alpha), which keeps the chosen
answers' likelihood from falling while the margin grows.
Metrics: dpo/acc (implicit reward ranks chosen first), dpo/margin (beta * the log-ratio difference),
dpo/chosen_logp and dpo/rejected_logp (the policy's, summed over the answer), pref/acc (the policy's own
log-prob ranks chosen first), dpo/chosen_nll (per-token NLL of the chosen answers: SFT quality kept?).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from llm import lora
from llm.config import ConfigError
from llm.train.objectives.base import Context
from llm.train.objectives.pairs import PairObjective, answer_logps, load_frozen


def dpo_loss(pi_c: Tensor, pi_r: Tensor, ref_c: Tensor, ref_r: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(mean DPO loss, per-pair implicit reward margin beta * (pi-ref log-ratio of chosen - of rejected)), all
    inputs (B,) summed answer log-probs."""
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return -F.logsigmoid(margin).mean(), margin


class DPO(PairObjective):
    name = "dpo"
    unit = "nats/pair"

    def check(self) -> None:
        super().check()
        if self.tcfg.dpo_nll < 0:
            raise ConfigError(f"--dpo-nll must be >= 0 (got {self.tcfg.dpo_nll:g}): it weighs the chosen answers' NLL")
        if not self.tcfg.dpo_beta > 0:
            raise ConfigError(f"--dpo-beta must be > 0 (got {self.tcfg.dpo_beta:g}): it scales the log-ratios; 0 "
                              "would make every pair's loss log 2 with no gradient")

    def setup(self, ctx: Context) -> None:
        self.model, self.ref = ctx.model, None
        self.use_lora = self.tcfg.ref is None and self.tcfg.lora_rank is not None
        if self.use_lora:
            ctx.say("DPO reference: the base model (the LoRA adapters switched off), no second copy")
        elif self.tcfg.ref:
            self.ref = load_frozen(self.tcfg.ref, ctx, "DPO reference")
        else:  # the policy as it starts (the --init-from model, any added chat-token rows included), frozen
            self.ref = copy.deepcopy(ctx.model).eval().requires_grad_(False)
            ctx.say(f"DPO reference: a frozen copy of the starting policy ({self.tcfg.init_from})")

    def reference_logps(self, x: Tensor, y: Tensor) -> Tensor:
        off = lora.disabled(self.model) if self.use_lora else contextlib.nullcontext()
        ref = self.model if self.use_lora else self.ref
        was = ref.training
        ref.eval()  # dropout off for the reference, as in the frozen copy
        with torch.inference_mode(), off:
            h, _ = ref(x, hidden=True)
            logps, _ = answer_logps(h, ref.lm_head.weight, y)
        ref.train(was)
        return logps.clone()  # out of inference mode: usable in the autograd graph as a constant

    def loss(self, fwd, batch):
        x, y = batch
        ref_logps = self.reference_logps(x, y)
        h, _ = fwd(x, hidden=True)
        logps, counts = answer_logps(h, self.model.lm_head.weight, y)
        pi_c, pi_r = logps.chunk(2)
        ref_c, ref_r = ref_logps.chunk(2)
        loss, margin = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.tcfg.dpo_beta)
        n_c = counts.chunk(2)[0]
        if self.tcfg.dpo_nll:  # RPO: + alpha * the chosen answers' per-token NLL
            loss = loss + self.tcfg.dpo_nll * (-pi_c.sum() / n_c.sum())
        margin, pi_c, pi_r = margin.detach(), pi_c.detach(), pi_r.detach()
        return loss, {"dpo/acc": (margin > 0).float().mean(), "dpo/margin": margin.mean(),
                      "dpo/chosen_logp": pi_c.mean(), "dpo/rejected_logp": pi_r.mean(),
                      "pref/acc": (pi_c > pi_r).float().mean(), "dpo/chosen_nll": -pi_c.sum() / n_c.sum()}
