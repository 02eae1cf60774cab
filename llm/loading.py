"""One entry point for every checkpoint argument: our checkpoint dirs, training out-dirs, Hugging Face dirs."""

from __future__ import annotations

from pathlib import Path

import torch

from llm.checkpoint import load_checkpoint
from llm.interop.hf import is_hf_dir, load_hf
from llm.model import Transformer
from llm.quant import quantize_loaded
from llm.tokenizer import Tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: dict | None = None, **overrides) -> tuple[Transformer, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config dict) from a checkpoint dir, an out_dir, or a Hugging Face model dir
    (quantized checkpoints included).

    quantize: a scheme (llm.quant.make_scheme) to quantize the weights with at load: they are read in fp32
    on the CPU, quantized, then moved to device / dtype; the returned config records the scheme.
    overrides replace model config fields (run-time ones such as kernels or dropout).
    """
    load = load_hf if is_hf_dir(path) else load_checkpoint
    if quantize is None:
        return load(path, device, dtype, **overrides)
    model, tok, cfg = load(path, "cpu", None, **overrides)
    if not cfg.get("quantization"):
        model = model.float()
    model = quantize_loaded(model, cfg, quantize).to(device=device, dtype=dtype)
    model.init_buffers(device)  # RoPE tables stay fp32 whatever the weights' dtype
    return model.eval(), tok, {**cfg, "model": dict(model.cfg.__dict__), "quantization": quantize}
