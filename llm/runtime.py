"""Small helpers every stage shares: the device and dtype a run uses, CPU threads, one-line errors."""

from __future__ import annotations

import torch

from llm.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU; a named CUDA device without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on a CUDA device that has it, fp32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def set_threads(n: int | None) -> None:
    """torch's CPU threads (None: leave torch's choice)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
