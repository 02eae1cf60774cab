"""One entry point for every checkpoint argument: our checkpoint dirs, training out-dirs, Hugging Face dirs."""

from __future__ import annotations

from pathlib import Path

import torch

from llm.checkpoint import load_checkpoint
from llm.interop.hf import is_hf_dir, load_hf
from llm.model import Transformer
from llm.tokenizer import Tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **overrides) -> tuple[Transformer, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config dict) from a checkpoint dir, an out_dir, or a Hugging Face model dir.

    overrides replace model config fields (run-time ones such as kernels or dropout).
    """
    if is_hf_dir(path):
        return load_hf(path, device, dtype, **overrides)
    return load_checkpoint(path, device, dtype, **overrides)
