"""One entry point for every checkpoint argument: our checkpoint dirs, training out-dirs, Hugging Face dirs,
llama-architecture GGUF files, and PEFT adapters (LoRA, prefix, bottleneck adapters) on top of any of them (a
PEFT run's checkpoint names its base)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from llm import lora as lora_io
from llm import peft
from llm.checkpoint import MODEL_FILE, CheckpointError, load_checkpoint, read_config, resolve
from llm.interop.gguf import is_gguf, load_gguf
from llm.interop.hf import is_hf_dir, load_hf
from llm.model import Transformer
from llm.quant import quantize_loaded
from llm.tokenizer import Tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: dict | None = None, lora: str | Path | None = None,
               **overrides) -> tuple[Transformer, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config dict) from a checkpoint dir, an out_dir, or a Hugging Face model dir
    (quantized checkpoints and LoRA checkpoints included).

    quantize: a scheme (llm.quant.make_scheme) to quantize the weights with at load: they are read in fp32
    on the CPU, quantized, then moved to device / dtype; the returned config records the scheme.
    lora: an adapter dir (a PEFT run's checkpoint or out_dir: LoRA, prefix or bottleneck adapters) applied
    unmerged, with its tokenizer (which may hold added chat tokens). A PEFT run's checkpoint passed as `path`
    loads its recorded base with it.
    overrides replace model config fields (run-time ones such as kernels or dropout).
    """
    if lora is None and not is_hf_dir(path) and not is_gguf(path):
        ckpt = resolve(path)
        if (ckpt / lora_io.ADAPTER_CONFIG).is_file() and not (ckpt / MODEL_FILE).is_file():
            path, lora = peft.read_config(ckpt)["base"], ckpt
    load = load_hf if is_hf_dir(path) else load_gguf if is_gguf(path) else load_checkpoint
    if quantize is not None:
        model, tok, cfg = load(path, "cpu", None, **overrides)
        if not cfg.get("quantization"):
            model = model.float()
        model = quantize_loaded(model, cfg, quantize).to(device=device, dtype=dtype)
        model.init_buffers(device)  # RoPE tables stay fp32 whatever the weights' dtype
        cfg = {**cfg, "model": dict(model.cfg.__dict__), "quantization": quantize}
    else:
        model, tok, cfg = load(path, device, dtype, **overrides)
    if lora is None:
        return model, tok, cfg
    adir = resolve(lora)  # on a quantized base: the adapters wrap its QuantLinears (QLoRA-style, unmerged)
    peft.load_adapter(model, adir)
    acfg = read_config(adir)
    return model.eval(), Tokenizer.load(adir, acfg["tokenizer"]), cfg | {"lora": str(adir)}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of what `load_model(path)` would load (a PEFT checkpoint's own, which may hold added chat
    tokens), without reading any weights: cheap enough to check before any compute."""
    if is_hf_dir(path):
        return Tokenizer.from_hf(Path(path))
    ckpt = resolve(path)
    return Tokenizer.load(ckpt, read_config(ckpt)["tokenizer"])


def adapter_on_shared_base(base: Transformer, lora: str | Path) -> Transformer:
    """A second model that holds the base's weight tensors themselves (no copy) with the LoRA adapter in `lora`
    on top, unmerged; `base` is untouched. For serving several adapters over one base (`llm serve --lora`).
    An adapter that adds tokens needs its own tokenizer, so it is refused (CheckpointError, one line)."""
    adir = resolve(lora)
    acfg = peft.read_config(adir)
    if acfg["method"] != "lora":
        raise CheckpointError(f"the adapter in {adir} is a {acfg['method']} adapter; only LoRA adapters are served "
                              "over a shared base (serve it on its own: llm serve --checkpoint ADAPTER_DIR)")
    if acfg.get("added_tokens"):
        raise CheckpointError(f"the adapter in {adir} adds tokens to the vocabulary; it cannot share the base's "
                              "tokenizer; serve it on its own (llm serve --checkpoint ADAPTER_DIR)")
    with torch.device("meta"):
        model = Transformer(copy.deepcopy(base.cfg))
    for name, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, t)  # the base's Parameter objects themselves: one copy in memory
    peft.load_adapter(model, adir)
    return model.eval()
