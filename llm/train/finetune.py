"""Fine-tuning in the trainer: what `train` does differently when the data is instruction / chat examples
(llm/data/sft.py) or --lora-rank is given (llm/lora.py). The trainer calls these few hooks; the loop, the
checkpoints and the exact resume are the pretraining ones.

  check        refuse what does not combine, before anything is loaded (no --init-from)
  check_base   a quantized --init-from trains only LoRA adapters around its frozen codes (QLoRA-style)
  tokenizer    the base's tokenizer with the chat template's special tokens (our checkpoints: ChatML)
  prepare      the examples encoded with that tokenizer (masked answers), or the pretraining shards
  adapt        grow the vocab for the added tokens, then freeze the base and add LoRA; prints what trains
  weights      the checkpoint file a run saves and resumes: model.safetensors, or adapter.safetensors
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from llm import checkpoint as ckpt_io
from llm import lora, quant
from llm.chat import chat_tokenizer
from llm.config import ConfigError, DataConfig, TrainConfig
from llm.data import sft
from llm.data.shards import prepare as prepare_shards
from llm.model import Transformer
from llm.tokenizer import Tokenizer
from llm.train.distributed import fmt_bytes

Say = Callable[..., None]


def lora_config(tcfg: TrainConfig) -> lora.LoRAConfig | None:
    if tcfg.lora_rank is None:
        return None
    return lora.LoRAConfig(tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_dropout, lora.parse_targets(tcfg.lora_targets))


def is_finetune(dcfg: DataConfig, tcfg: TrainConfig) -> bool:
    return tcfg.lora_rank is not None or sft.is_sft(dcfg)


def check(dcfg: DataConfig, tcfg: TrainConfig) -> None:
    """One ConfigError for a fine-tuning setting that cannot work (the LoRA flags are checked here too)."""
    if not is_finetune(dcfg, tcfg):
        return
    lora_config(tcfg)
    if not tcfg.init_from:
        raise ConfigError("fine-tuning (instruction / chat data or --lora-rank) starts from a model: give "
                          "--init-from CHECKPOINT or a Hugging Face model directory")


def check_base(cfg: dict, tcfg: TrainConfig) -> None:
    """A quantized base (config "quantization") stays frozen in its int8 / int4 codes: only LoRA trains on it,
    and its embedding and head must be in full precision (the chat tokens' new rows train there)."""
    scheme = cfg.get("quantization")
    if not scheme or tcfg.lora_rank is None:
        quant.refuse_training(cfg, "--init-from")
        return
    if quant.check_scheme(scheme).get("embeddings"):
        raise ConfigError("--init-from: the base's embedding and head are quantized (--embeddings); LoRA needs "
                          "them in full precision for the added chat tokens: quantize without --embeddings")


def tokenizer(tok: Tokenizer, dcfg: DataConfig) -> tuple[Tokenizer, list[str]]:
    """(tokenizer the run trains with, the special tokens it added) — chat tokens for fine-tuning data."""
    return chat_tokenizer(tok) if sft.is_sft(dcfg) else (tok, [])


def prepare(dcfg: DataConfig, tok: Tokenizer | None, block_size: int, say: Say) -> Path:
    if sft.is_sft(dcfg):
        return sft.prepare(dcfg, tok, block_size, say)
    return prepare_shards(dcfg, say, tokenizer=tok)


def adapt(model: Transformer, tcfg: TrainConfig, base_vocab: int, added: list[str], say: Say) -> dict | None:
    """Grow `model` for the added tokens and, with --lora-rank, freeze it and add the adapters (in place).
    Returns the adapter config a LoRA run saves with every checkpoint (None for full fine-tuning)."""
    lora.grow_vocab(model, base_vocab + len(added))
    if added:
        say(f"chat template: added {', '.join(added)} to the vocabulary (ids {base_vocab}.."
            f"{base_vocab + len(added) - 1}; their embedding and head rows start at the mean of the others)")
    cfg = lora_config(tcfg)
    if cfg is None:
        return None
    n = quant.dense_numel(model)
    lora.apply_lora(model, cfg, (base_vocab, len(added)) if added else None)
    say(describe_memory(model, n, cfg))
    base = str(Path(tcfg.init_from).resolve()) if tcfg.init_from else None
    return lora.adapter_config(cfg, model, base, base_vocab, added)


def describe_memory(model: torch.nn.Module, n_full: int, cfg: lora.LoRAConfig) -> str:
    """The LoRA line printed at start: trainable parameters, gradient + AdamW bytes against full fine-tuning,
    and the frozen base's bytes (quantized: against the same weights in fp32)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = 4 + 8  # an fp32 gradient and AdamW's two fp32 moments per trainable parameter
    base = lora.frozen_bytes(model)
    scheme = getattr(model, "quantization", None)
    frozen = (f"; frozen base {fmt_bytes(base)} ({quant.describe(scheme)} block weights) vs {fmt_bytes(4 * n_full)} "
              f"in fp32" if scheme else f"; frozen base {fmt_bytes(base)}")
    return (f"LoRA r={cfg.rank} alpha={cfg.alpha:g} dropout={cfg.dropout:g} on {','.join(cfg.targets)}: "
            f"{trainable:,} trainable parameters ({100 * trainable / n_full:.2f}% of {n_full:,}); gradient + "
            f"optimizer {fmt_bytes(trainable * per)} vs {fmt_bytes(n_full * per)} for full fine-tuning "
            f"({100 * trainable / n_full:.2f}%){frozen}")


def weights_file(adapter: dict | None) -> str:
    return lora.ADAPTER_FILE if adapter is not None else ckpt_io.MODEL_FILE


def load_weights(model: torch.nn.Module, src: Path, adapter: dict | None, device: torch.device) -> None:
    """The resumed checkpoint's weights into `model`: the whole model, or only the adapter tensors."""
    path = src / weights_file(adapter)
    tensors, _ = ckpt_io.read_tensors(path, device=str(device))
    (lora.load_adapter_tensors if adapter is not None else ckpt_io.load_into)(model, tensors, path)
