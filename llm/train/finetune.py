"""Fine-tuning in the trainer: what `train` does differently when the data is instruction / chat examples
(llm/data/sft.py) or a parameter-efficient method is asked for (--peft lora|prefix|adapter, or --lora-rank:
llm/peft.py). The trainer calls these few hooks; the loop, the checkpoints and the exact resume are the
pretraining ones.

  check        refuse what does not combine, before anything is loaded (no --init-from, bad method settings)
  check_base   a quantized --init-from trains only PEFT parameters around its frozen codes (QLoRA-style); a
               prefix must leave room in the base's context
  base_config  the base's model config, with --doc-mask / --doc-positions applied; other model flags noted
  tokenizer    the base's tokenizer with the chat template's special tokens (our checkpoints: ChatML)
  token_block  tokens per training row: the context, less a prefix's rows
  prepare      the examples encoded with that tokenizer (masked answers), or the pretraining shards
  adapt        grow the vocab for the added tokens, then freeze the base and add the method; prints what trains
  weights      the checkpoint file a run saves and resumes: model.safetensors, or adapter.safetensors
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from llm import bottleneck, lora, peft, prefix, quant
from llm import checkpoint as ckpt_io
from llm.chat import chat_tokenizer
from llm.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from llm.data import preference, prompts, sft
from llm.data.mixture import parse_mixture, prepare_mixture
from llm.data.shards import prepare as prepare_shards
from llm.model import Transformer
from llm.tokenizer import Tokenizer
from llm.train.distributed import fmt_bytes

Say = Callable[..., None]


def method(tcfg: TrainConfig) -> str | None:
    """The PEFT method of the run: --peft, or lora when only --lora-rank is given; None: full fine-tuning."""
    return tcfg.peft or ("lora" if tcfg.lora_rank is not None else None)


def peft_config(tcfg: TrainConfig) -> peft.Config | None:
    """The method's settings from the flags (a ConfigError names a bad one); None without a method."""
    m = method(tcfg)
    if m == "lora":
        return lora.LoRAConfig(tcfg.lora_rank or lora.LoRAConfig.rank, tcfg.lora_alpha, tcfg.lora_dropout,
                               lora.parse_targets(tcfg.lora_targets))
    if m == "prefix":
        return prefix.PrefixConfig(tcfg.prefix_tokens, tcfg.prefix_hidden)
    if m == "adapter":
        return bottleneck.AdapterConfig(tcfg.adapter_dim, tcfg.adapter_placement)
    return None


def chat_data(dcfg: DataConfig) -> bool:
    """Conversations rendered with a chat template: SFT examples, preference pairs or RL prompts."""
    return sft.is_sft(dcfg) or preference.is_preference(dcfg) or dcfg.dataset == prompts.EMBEDDED


def is_finetune(dcfg: DataConfig, tcfg: TrainConfig) -> bool:
    return method(tcfg) is not None or chat_data(dcfg)


def check(dcfg: DataConfig, tcfg: TrainConfig) -> None:
    """One ConfigError for a fine-tuning setting that cannot work (the method's flags are checked here too)."""
    if not is_finetune(dcfg, tcfg):
        return
    peft_config(tcfg)
    if not tcfg.init_from:
        raise ConfigError("fine-tuning (instruction / chat data or --peft / --lora-rank) starts from a model: give "
                          "--init-from CHECKPOINT or a Hugging Face model directory")


def check_base(cfg: dict, tcfg: TrainConfig) -> None:
    """A quantized base (config "quantization") stays frozen in its int8 / int4 codes: only a PEFT method trains on
    it, and its embedding and head must be in full precision (the chat tokens' new rows train there). A prefix
    must leave the text room in the base's context."""
    block = cfg["model"]["block_size"]
    if method(tcfg) == "prefix" and tcfg.prefix_tokens >= block:
        raise ConfigError(f"--prefix-tokens {tcfg.prefix_tokens}: the prefix takes that many of the base's {block} "
                          f"positions and leaves none for the text; use at most {block - 1} (far fewer in practice)")
    scheme = cfg.get("quantization")
    if not scheme or method(tcfg) is None:
        quant.refuse_training(cfg, "--init-from")
        return
    if quant.check_scheme(scheme).get("embeddings"):
        raise ConfigError("--init-from: the base's embedding and head are quantized (--embeddings); PEFT needs "
                          "them in full precision for the added chat tokens: quantize without --embeddings")


# Model flags a fine-tune applies to its base: they change how the model runs, not its weights' shapes.
APPLIED_TO_BASE = ("doc_mask", "doc_positions", "dropout", "kernels")


def base_config(base: ModelConfig, user: ModelConfig, explicit: set[str] | frozenset, eot_id: int,
                tcfg: TrainConfig, say: Say = print) -> ModelConfig:
    """The config a fine-tune runs its --init-from base with: the base's own, plus --doc-mask / --doc-positions
    when given (attention over packed documents; no weight changes). Any other model flag given explicitly with a
    value that differs from the base's cannot apply to trained weights: one note line names it (it used to be
    dropped without a word)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    differ = sorted(k for k in explicit & fields
                    if k not in APPLIED_TO_BASE and getattr(user, k) != getattr(base, k))
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(user, k)} (the base has {getattr(base, k)})"
                          for k in differ)
        say(f"note: --init-from {tcfg.init_from}: the model comes from the base as it is; ignoring {flags}")
    cfg = base
    if "doc_mask" in explicit and user.doc_mask != base.doc_mask:
        if user.doc_mask and method(tcfg) == "prefix":
            raise ConfigError("--doc-mask with --peft prefix: the prefix's rows are a KV cache every token attends "
                              "to, which document masking does not cover; train the prefix without --doc-mask")
        cfg = dataclasses.replace(cfg, doc_mask=user.doc_mask, eot_id=eot_id if user.doc_mask else cfg.eot_id)
    if "doc_positions" in explicit:
        cfg = dataclasses.replace(cfg, doc_positions=user.doc_positions)
    return cfg


def token_block(block_size: int, tcfg: TrainConfig) -> int:
    """Tokens per training row: the context, less the positions a prefix takes (llm/prefix.py)."""
    return block_size - tcfg.prefix_tokens if method(tcfg) == "prefix" else block_size


def tokenizer(tok: Tokenizer, dcfg: DataConfig) -> tuple[Tokenizer, list[str]]:
    """(tokenizer the run trains with, the special tokens it added) — chat tokens for fine-tuning data."""
    return chat_tokenizer(tok) if chat_data(dcfg) else (tok, [])


def prepare(dcfg: DataConfig, tok: Tokenizer | None, block_size: int, say: Say) -> Path:
    if parse_mixture(dcfg.dataset):
        return prepare_mixture(dcfg, say, tokenizer=tok)
    if sft.is_sft(dcfg):
        return sft.prepare(dcfg, tok, block_size, say)
    return prepare_shards(dcfg, say, tokenizer=tok)


def adapt(model: Transformer, tcfg: TrainConfig, base_vocab: int, added: list[str], say: Say) -> dict | None:
    """Grow `model` for the added tokens and, with a PEFT method, freeze it and add the method (in place).
    Returns the adapter config such a run saves with every checkpoint (None for full fine-tuning)."""
    lora.grow_vocab(model, base_vocab + len(added))
    if added:
        say(f"chat template: added {', '.join(added)} to the vocabulary (ids {base_vocab}.."
            f"{base_vocab + len(added) - 1}; their embedding and head rows start at the mean of the others)")
    cfg = peft_config(tcfg)
    if cfg is None:
        return None
    n = quant.dense_numel(model)
    peft.apply(model, cfg, (base_vocab, len(added)) if added else None, base_vocab, tcfg.seed)
    say(describe_memory(model, n, cfg))
    base = str(Path(tcfg.init_from).resolve()) if tcfg.init_from else None
    return peft.adapter_config(cfg, model, base, base_vocab, added)


def describe_method(cfg: peft.Config, model: torch.nn.Module) -> str:
    if isinstance(cfg, lora.LoRAConfig):
        return f"LoRA r={cfg.rank} alpha={cfg.alpha:g} dropout={cfg.dropout:g} on {','.join(cfg.targets)}"
    if isinstance(cfg, prefix.PrefixConfig):
        saved = model.prefix.rows().numel()
        how = f"trained through an MLP of width {cfg.hidden}, " if cfg.hidden else ""
        return f"prefix tuning, {cfg.tokens} rows per layer ({how}{saved:,} parameters when saved)"
    return f"bottleneck adapters dim={cfg.dim} ({cfg.placement})"


def describe_memory(model: torch.nn.Module, n_full: int, cfg: peft.Config) -> str:
    """The line printed at start: the method, trainable parameters, gradient + AdamW bytes against full
    fine-tuning, and the frozen base's bytes (quantized: against the same weights in fp32)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = 4 + 8  # an fp32 gradient and AdamW's two fp32 moments per trainable parameter
    base = peft.frozen_bytes(model)
    scheme = getattr(model, "quantization", None)
    frozen = (f"; frozen base {fmt_bytes(base)} ({quant.describe(scheme)} block weights) vs {fmt_bytes(4 * n_full)} "
              f"in fp32" if scheme else f"; frozen base {fmt_bytes(base)}")
    return (f"{describe_method(cfg, model)}: "
            f"{trainable:,} trainable parameters ({100 * trainable / n_full:.2f}% of {n_full:,}); gradient + "
            f"optimizer {fmt_bytes(trainable * per)} vs {fmt_bytes(n_full * per)} for full fine-tuning "
            f"({100 * trainable / n_full:.2f}%){frozen}")


def weights_file(adapter: dict | None) -> str:
    return lora.ADAPTER_FILE if adapter is not None else ckpt_io.MODEL_FILE


def load_weights(model: torch.nn.Module, src: Path, adapter: dict | None, device: torch.device) -> None:
    """The resumed checkpoint's weights into `model`: the whole model, or only the adapter tensors."""
    path = src / weights_file(adapter)
    tensors, _ = ckpt_io.read_tensors(path, device=str(device))
    (peft.load_tensors if adapter is not None else ckpt_io.load_into)(model, tensors, path)
