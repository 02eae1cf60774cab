"""One entry point for every checkpoint argument: our checkpoint dirs, training out-dirs, Hugging Face dirs,
and LoRA adapters on top of any of them (a LoRA run's checkpoint names its base)."""

from __future__ import annotations

from pathlib import Path

import torch

from llm import lora as lora_io
from llm.checkpoint import MODEL_FILE, load_checkpoint, read_config, resolve
from llm.interop.hf import is_hf_dir, load_hf
from llm.model import Transformer
from llm.tokenizer import Tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               lora: str | Path | None = None, **overrides) -> tuple[Transformer, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config dict) from a checkpoint dir, an out_dir, or a Hugging Face model dir.

    lora: an adapter dir (a LoRA run's checkpoint or out_dir) applied unmerged, with its tokenizer (which may
    hold added chat tokens). A LoRA run's checkpoint passed as `path` loads its recorded base with it.
    overrides replace model config fields (run-time ones such as kernels or dropout).
    """
    if lora is None and not is_hf_dir(path):
        ckpt = resolve(path)
        if (ckpt / lora_io.ADAPTER_CONFIG).is_file() and not (ckpt / MODEL_FILE).is_file():
            path, lora = lora_io.read_adapter_config(ckpt)["base"], ckpt
    if is_hf_dir(path):
        model, tok, cfg = load_hf(path, device, dtype, **overrides)
    else:
        model, tok, cfg = load_checkpoint(path, device, dtype, **overrides)
    if lora is None:
        return model, tok, cfg
    adir = resolve(lora)
    lora_io.load_adapter(model, adir)
    acfg = read_config(adir)
    return model.eval(), Tokenizer.load(adir, acfg["tokenizer"]), cfg | {"lora": str(adir)}
