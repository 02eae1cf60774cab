"""`python -m llm.quantize --checkpoint DIR|HF_DIR --mode int8|int4 [--group-size 64] --out DIR`.

Reads any checkpoint `llm.loading.load_model` reads (ours, a training out-dir, a Hugging Face
directory) in fp32 on the CPU, quantizes it (llm.quant), and writes a checkpoint directory of ours:
model.safetensors with the int8 / packed int4 codes and fp16 scales, config.json with the scheme
under "quantization", the tokenizer. sample.py, llm.eval and load_model read it like any other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llm import checkpoint as ckpt_io
from llm.config import run_main
from llm.loading import load_model
from llm.quant import GROUP_SIZES, MODES, QuantError, describe, make_scheme, quantize_model, storage_state


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm quantize", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Weight-only int8 / int4 quantization of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, a training --out-dir, or a HF model dir")
    p.add_argument("--mode", required=True, help=f"one of {', '.join(MODES)}")
    p.add_argument("--group-size", type=int, default=64,
                   help=f"int4: inputs per scale/offset group, one of {', '.join(map(str, GROUP_SIZES))}")
    p.add_argument("--embeddings", action="store_true",
                   help="also quantize the output head (same mode) and the token embedding (int8 rows); "
                        "smaller files and faster decode, at a measured quality cost (benchmarks/NOTES.md)")
    p.add_argument("--out", required=True, help="the quantized checkpoint directory to write")
    return p


def quantize_checkpoint(src: str, out: str | Path, scheme: dict) -> Path:
    """Write the quantized copy of checkpoint `src` to directory `out`; returns its path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise QuantError(f"--out {out} exists and is not empty; choose a new directory")
    model, tok, cfg = load_model(src, "cpu", torch.float32)
    if cfg.get("quantization"):
        raise QuantError(f"{src} is already quantized ({describe(cfg['quantization'])}); quantize the unquantized "
                         "checkpoint instead (codes quantized twice stack both errors)")
    quantize_model(model, scheme)
    extra = {"quantization": scheme, "quantized_from": str(src)}
    return ckpt_io.save(out.parent, out.name, model, tok, extra=extra, model_state=storage_state(model),
                       pointer=None)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        scheme = make_scheme(args.mode, args.group_size, args.embeddings)
        path = quantize_checkpoint(args.checkpoint, args.out, scheme)
    except (ValueError, OSError) as e:  # the project's errors are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (path / ckpt_io.MODEL_FILE).stat().st_size
    print(f"wrote {path} ({describe(scheme)}, {size / 2**20:.1f} MiB of weights)")
    return 0


if __name__ == "__main__":
    run_main(main)
