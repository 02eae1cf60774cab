"""Online RL with group-relative advantages (GRPO, Shao et al. 2024, DeepSeekMath): no value model.

Per micro-batch of B prompts (llm/data/prompts.py), the policy samples G answers each with our KV-cached sampler
(llm.generate.stream_tokens: batched, every row seeded from the batch index, so a run and its resume sample the
same answers), each answer gets a reward r (a Python function, --reward, or a reward model, --reward-model), and
its advantage is the reward standardised within its group: A_i = (r_i - mean_G(r)) / (std_G(r) + 1e-4).
The loss, averaged over each answer's tokens and then over the answers, is

    L = -(1/|o|) sum_t [ A * pi(o_t) / stopgrad(pi(o_t)) - beta * KL_t ],
    KL_t = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1   (the unbiased k3 estimator, >= 0)

One policy update per sample (on-policy), so the PPO ratio is 1 with the gradient of log pi and no clipping
happens. The reference is --ref, a frozen copy of the starting policy, or with LoRA the base (adapters off).
Metrics: grpo/reward (mean), grpo/reward_std (within groups), grpo/kl, grpo/answer_len, grpo/solved (share of
groups with a positive reward at all).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import Tensor

from llm import lora
from llm.config import ConfigError, DataConfig
from llm.data import prompts as prompt_data
from llm.data.sft import IGNORE
from llm.generate import SamplingParams, stream_tokens
from llm.tokenizer import Tokenizer
from llm.train import rewards
from llm.train.objectives.base import Context, Objective, Say
from llm.train.objectives.pairs import load_frozen
from llm.train.objectives.reward import score_ids


def token_logps(h: Tensor, head: Tensor, y: Tensor) -> Tensor:
    """(R, L) log p(y_t) at every position (0 where y is -100). h (R, L, C), head (V, C), y (R, L)."""
    logits = h @ head.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    return lp * (y != IGNORE)


def group_advantages(r: Tensor, group: int) -> Tensor:
    """(N,) rewards of N = B * G answers, G consecutive per prompt -> advantages standardised per group."""
    g = r.view(-1, group)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + 1e-4)).flatten()


def grpo_loss(logp: Tensor, ref_logp: Tensor, adv: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(loss, mean KL per token). logp, ref_logp, mask (N, L); adv (N,)."""
    ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of log pi
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_token = -(adv[:, None] * ratio - beta * kl) * mask
    n = mask.sum(1).clamp_min(1)
    return (per_token.sum(1) / n).mean(), ((kl * mask).sum(1) / n).mean().detach()


class GRPO(Objective):
    name = "grpo"
    unit = "(policy-gradient loss; the reward is grpo/reward)"

    def check(self) -> None:
        t = self.tcfg
        if not t.init_from:
            raise ConfigError("--objective grpo starts from a trained (usually SFT) model: give --init-from")
        if (t.reward is None) == (t.reward_model is None):
            raise ConfigError("--objective grpo needs one reward: --reward NAME|module:function or --reward-model "
                              "CKPT (a checkpoint trained with --objective reward)")
        if t.grpo_group < 2:
            raise ConfigError(f"--grpo-group must be >= 2 (got {t.grpo_group}): advantages are relative to the group")
        if t.grpo_beta < 0 or t.grpo_max_new < 1 or not t.grpo_temperature > 0:
            raise ConfigError("--grpo-beta must be >= 0, --grpo-max-new >= 1 and --grpo-temperature > 0")
        self.reward_fn = rewards.load(t.reward) if t.reward else None

    def prepare(self, dcfg: DataConfig, tok: Tokenizer | None, block_size: int, say: Say) -> Path:
        if block_size - self.tcfg.grpo_max_new < 1:
            raise ConfigError(f"--grpo-max-new {self.tcfg.grpo_max_new} leaves no room for a prompt in the context "
                              f"of {block_size} tokens")
        return prompt_data.prepare(dcfg, tok, block_size - self.tcfg.grpo_max_new, say)

    def open_loader(self, path: Path, split: str, batch_size: int, block_size: int, seed: int,
                    fixed: bool = False):
        return prompt_data.PromptLoader(path, split, batch_size, block_size, seed)

    def tokens(self, batch) -> Tensor:
        ids = batch[0][0]
        return torch.tensor([ids], device=self.model.lm_head.weight.device)

    def setup(self, ctx: Context) -> None:
        t = self.tcfg
        self.model, self.tok = ctx.model, ctx.tok
        self.use_lora = t.ref is None and t.lora_rank is not None
        if self.use_lora:
            self.ref = None
            ctx.say("GRPO reference: the base model (the LoRA adapters switched off)")
        elif t.ref:
            self.ref = load_frozen(t.ref, ctx, "GRPO reference")
        else:
            self.ref = copy.deepcopy(ctx.model).eval().requires_grad_(False)
            ctx.say(f"GRPO reference: a frozen copy of the starting policy ({t.init_from})")
        # --reward-model A,B,...: an ensemble, the mean of the models' scores (Coste et al. 2023)
        self.reward_models = [load_frozen(c, ctx, "reward") for c in t.reward_model.split(",")] if t.reward_model \
            else []
        ctx.say(f"GRPO: {t.grpo_group} answers per prompt, up to {t.grpo_max_new} tokens at temperature "
                f"{t.grpo_temperature:g}, KL weight {t.grpo_beta:g}, reward "
                f"{t.reward or 'model ' + str(t.reward_model)}")

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """G answers per prompt (ids, the end-of-turn token kept when emitted), seeded rows."""
        t, G = self.tcfg, self.tcfg.grpo_group
        rows = [p for p in prompts for _ in range(G)]
        new: list[list[int]] = [[] for _ in rows]
        was = self.model.training
        self.model.eval()
        params = SamplingParams(temperature=t.grpo_temperature)
        # Under FSDP2 every forward is a collective (the weights are gathered), so every rank must make the same
        # number of calls: one prefill pass and all grpo_max_new steps, each row cut after its end-of-turn token
        # afterwards (the same ids as stopping there: rows are seeded one by one and computed independently).
        lockstep = t.fsdp
        eot = self.tok.eot_id
        for step in stream_tokens(self.model, rows, t.grpo_max_new, params, seed=seed,
                                  eos_ids=[] if lockstep else [eot], vocab_limit=self.tok.n_vocab,
                                  prefill_chunk=0 if lockstep else None, training=True):
            for b, i in enumerate(step):
                if i is not None:
                    new[b].append(i)
        self.model.train(was)
        if lockstep:
            new = [ids[: ids.index(eot) + 1] if eot in ids else ids for ids in new]
        return new

    def rewards(self, prompts: list[list[int]], answers: list[str], new: list[list[int]]) -> Tensor:
        G, eot = self.tcfg.grpo_group, self.tok.eot_id
        out = []
        for b, ids in enumerate(new):
            p = b // G
            text = self.tok.decode([i for i in ids if i != eot])
            if self.reward_fn is not None:
                out.append(float(self.reward_fn(self.tok.decode(prompts[p]), text, answers[p])))
            else:
                rs = [score_ids(m, prompts[p] + ids) for m in self.reward_models]
                out.append(sum(rs) / len(rs))
        return torch.tensor(out, dtype=torch.float32)

    def loss(self, fwd, batch):
        prompts, answers, index = batch
        t, device = self.tcfg, self.model.lm_head.weight.device
        new = self.sample(prompts, seed=t.seed * 1_000_003 + index * 4099)
        r = self.rewards(prompts, answers, new).to(device)
        adv = group_advantages(r, t.grpo_group)
        rows = [prompts[b // t.grpo_group] + ids for b, ids in enumerate(new)]
        L = max(map(len, rows)) - 1
        x = torch.zeros(len(rows), L, dtype=torch.long)
        y = torch.full((len(rows), L), IGNORE, dtype=torch.long)
        for b, (row, ids) in enumerate(zip(rows, new)):
            x[b, : len(row) - 1] = torch.tensor(row[:-1])
            P = len(row) - len(ids)
            y[b, P - 1: len(row) - 1] = torch.tensor(ids)
        x, y = x.to(device), y.to(device)
        ref_lp = self.reference_logps(x, y)
        h, _ = fwd(x, hidden=True)
        lp = token_logps(h, self.model.lm_head.weight, y)
        mask = (y != IGNORE).float()
        loss, kl = grpo_loss(lp, ref_lp, adv, mask, t.grpo_beta)
        g = r.view(-1, t.grpo_group)
        return loss, {"grpo/reward": r.mean(), "grpo/reward_std": g.std(1, unbiased=False).mean(), "grpo/kl": kl,
                      "grpo/answer_len": mask.sum(1).mean(), "grpo/solved": (g.max(1).values > 0).float().mean()}

    def reference_logps(self, x: Tensor, y: Tensor) -> Tensor:
        off = lora.disabled(self.model) if self.use_lora else contextlib.nullcontext()
        ref = self.model if self.use_lora else self.ref
        was = ref.training
        ref.eval()
        with torch.inference_mode(), off:
            h, _ = ref(x, hidden=True)
            lp = token_logps(h, ref.lm_head.weight, y)
        ref.train(was)
        return lp.clone()
