"""`python -m llm.interop.export_gguf CKPT OUT.gguf --type f32|f16|q8_0|q4_0`: a checkpoint as a llama.cpp GGUF file.

CKPT is anything load_model reads (our checkpoint dir, a training out-dir, a Hugging Face Llama dir); the model
must be a plain Llama (llm/interop/gguf.py says what that means and how the file is laid out).
"""

from __future__ import annotations

import argparse
import sys

import torch

from llm.checkpoint import CheckpointError
from llm.config import run_main
from llm.interop.gguf import TYPES, export_gguf
from llm.loading import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llm export-gguf", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="our checkpoint dir, a training out-dir, or a Hugging Face Llama dir")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="f32", choices=TYPES, help="tensor type of the matrices (norms stay f32)")
    args = p.parse_args(argv)
    try:
        model, tok, _ = load_model(args.checkpoint, "cpu", torch.float32)
        path = export_gguf(model, tok, args.out, args.type)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.type}, {model.cfg.n_layer} layers)")
    return 0


if __name__ == "__main__":
    run_main(main)
