"""Knowledge distillation: the student learns the hard labels and a frozen teacher's distribution.

  loss = alpha * CE(s, y) + (1 - alpha) * T^2 * D(softmax(t / T), softmax(s / T))

s, t: the student's and the teacher's logits at the same positions; y: the next tokens (-100 outside the answers
on instruction / chat data, as for CE: those rows count in neither term); D: forward KL(teacher || student)
(Hinton et al. 2015, default), reverse KL(student || teacher) or the Jensen-Shannon divergence (--distill-loss);
the T^2 keeps the soft term's gradient scale independent of T. Chosen by `train.py --teacher PATH`.

The teacher is any checkpoint argument `llm.loading.load_model` takes (ours, a training out-dir, a Hugging Face
dir, a quantized or PEFT checkpoint). It is loaded once in `setup`, frozen, in eval mode, and run per micro-batch
under `torch.inference_mode` for its final hidden states only; both heads and the loss then go through
`ops.linear_distill` (kernels/distill.py on CUDA: neither (N, V) logits tensor exists in full). Nothing of the
teacher is stored for the dataset. Because it is frozen and deterministic, resume stays exact with no state here.

Teacher and student must share the tokenizer (the same ids for a probe text and the same vocabulary): checked in
`check`, before any data is prepared (a student trained from scratch adopts the teacher's tokenizer), and again
against the built model in `setup`. Widths, depths and heads may differ: that is the point.
Metrics: distill/ce (hard-label CE), distill/kl (the divergence D at temperature T, unscaled), distill/top1_agree
(share of kept positions where the argmaxes agree).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from llm import ops
from llm.config import ConfigError, DataConfig
from llm.loading import load_model, load_tokenizer
from llm.tokenizer import Tokenizer
from llm.train import finetune
from llm.train.objectives.base import Context, Objective, Say

# Text whose encoding two tokenizers must agree on: code, prose, digits, whitespace runs, unicode.
PROBE = ("def f(x):\n    return x * 2  # double it\n\nThe quick brown fox jumps over 13 lazy dogs. "
         "Été, naïve café — 数据 🙂\t\tend.")


def same_tokenizer(student: Tokenizer, teacher: Tokenizer) -> str | None:
    """None when both encode PROBE to the same ids and have the same number of ids, else what differs."""
    if student.n_vocab != teacher.n_vocab:
        return f"{student.n_vocab} vs {teacher.n_vocab} token ids"
    a, b = student.encode(PROBE), teacher.encode(PROBE)
    if a != b:
        i = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
        return f"they encode a probe text differently (first difference at token {i})"
    return None


class Distill(Objective):
    """alpha * CE + (1 - alpha) * T^2 * divergence(teacher, student), from a frozen teacher (module docstring)."""

    name = "distill"

    def check(self) -> None:
        t = self.tcfg
        if not t.teacher:
            raise ConfigError("--objective distill needs --teacher CHECKPOINT (or a Hugging Face model dir)")
        if not 0.0 <= t.distill_alpha <= 1.0:
            raise ConfigError(f"--distill-alpha must be in [0, 1] (the weight of the hard-label CE), got "
                              f"{t.distill_alpha}")
        if not t.distill_temperature > 0:
            raise ConfigError(f"--distill-temperature must be > 0, got {t.distill_temperature}")
        self.teacher_tok = _read(t.teacher, "--teacher", load_tokenizer)
        if t.init_from:  # the student's tokenizer is known now: refuse before any data is prepared
            student_tok = finetune.tokenizer(_read(t.init_from, "--init-from", load_tokenizer), self.dcfg)[0]
            self._compare(student_tok, t.init_from)

    def _compare(self, student_tok: Tokenizer, student: str) -> None:
        why = same_tokenizer(student_tok, self.teacher_tok)
        if why:
            raise ConfigError(f"the teacher {self.tcfg.teacher} and the student ({student}) do not share a tokenizer: "
                              f"{why}; distillation compares distributions over the same token ids")

    def prepare(self, dcfg: DataConfig, tok: Tokenizer | None, block_size: int, say: Say) -> Path:
        """A student trained from scratch (no --init-from) encodes the data with the teacher's tokenizer."""
        return finetune.prepare(dcfg, tok or self.teacher_tok, block_size, say)

    def setup(self, ctx: Context) -> None:
        t = self.tcfg
        self._compare(ctx.tok, t.init_from or "trained from scratch")
        dtype = None if ctx.dtype == torch.float32 else ctx.dtype  # the run's compute dtype halves a teacher's bytes
        teacher, _, cfg = _read(t.teacher, "--teacher", lambda p: load_model(p, ctx.device, dtype))
        student = ctx.model
        T = finetune.token_block(student.cfg.block_size, t)
        if teacher.n_positions < T:
            raise ConfigError(f"--teacher {t.teacher}: its context holds {teacher.n_positions} tokens, the student "
                              f"trains on rows of {T}; use --block-size {teacher.n_positions} or less")
        Vs, Vt = student.cfg.padded_vocab_size, teacher.cfg.padded_vocab_size
        # Padded heads of equal size: the whole head, so alpha = 1 is exactly the model's own CE; otherwise the
        # tokenizer's ids (both heads hold them; the padding rows are never a target).
        self.vocab = Vs if Vs == Vt else ctx.tok.n_vocab
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        with torch.no_grad():  # a quantized head dequantized once: (V, C) is small next to (N, V) logits
            self.teacher_head = teacher.lm_head.weight[: self.vocab].detach().clone()
        self.student = student
        n = sum(p.numel() for p in teacher.parameters())
        q = cfg.get("quantization")
        ctx.say(f"distillation: teacher {t.teacher} ({n / 1e6:.2f}M parameters{', ' + q['mode'] if q else ''}, "
                f"{teacher.cfg.n_layer} layers, width {teacher.cfg.n_embd}), loss {t.distill_alpha:g} * CE + "
                f"{1 - t.distill_alpha:g} * {t.distill_temperature:g}^2 * {t.distill_loss} at T = "
                f"{t.distill_temperature:g}, over {self.vocab} ids")

    def loss(self, fwd: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        h, _ = fwd(x, hidden=True)  # (B, T, C): the student's final hidden states, through the wrappers
        with torch.inference_mode():
            th, _ = self.teacher(x, hidden=True)  # (B, T, Ct)
        t = self.tcfg
        w = self.student.lm_head.weight[: self.vocab]  # (V, C)
        loss, stats = ops.linear_distill(h.flatten(0, 1), w, th.flatten(0, 1), self.teacher_head.to(th.dtype),
                                         y.flatten(), t.distill_alpha, t.distill_temperature, t.distill_loss,
                                         kernels=self.student.cfg.kernels, compiled=self.tcfg.compile)
        loss = loss + self.student.aux_loss()  # an MoE student's balance losses, as in its own CE forward
        return loss, {"distill/ce": stats[0], "distill/kl": stats[1], "distill/top1_agree": stats[2]}


def _read(path: str, flag: str, fn):
    """fn(path), any failure to read it as one ConfigError naming the flag and the path."""
    try:
        return fn(path)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"{flag} {path}: {e}") from None
