"""`python -m llm.interop` (= `llm export|merge|import-peft ...`): every way a model leaves or enters here.

  export CKPT OUT_DIR                      our checkpoint (or a training out dir) as a transformers model dir
  export CKPT OUT_DIR --lora DIR           CKPT + a LoRA adapter merged, as a transformers model dir (a LoRA run's
                                           checkpoint given as CKPT brings its base: no --lora needed)
  export ADAPTER OUT_DIR --format peft     OUT_DIR/base (transformers) + OUT_DIR/adapter (PEFT LoRA or prefix)
  merge --checkpoint BASE --lora DIR --out OUT      BASE + LoRA folded into a plain checkpoint of ours
  import-peft --peft DIR --base BASE --out OUT      a PEFT LoRA / prefix adapter as ours

The argv parsing lives here, self-contained: `llm export` (llm/cli.py) calls main(["export", ...]), `llm merge`
main(["merge", ...]), `llm import-peft` main(["import-peft", ...]).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm import checkpoint as ckpt_io
from llm import lora as lora_io
from llm import peft
from llm.checkpoint import CheckpointError
from llm.config import ConfigError, run_main
from llm.interop.adapters import export_peft, import_peft, merge_to
from llm.interop.hf import is_hf_dir
from llm.interop.hf_export import export_model
from llm.loading import load_model
from llm.tokenizer import TokenizerError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.interop", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\nThe argv")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{export,merge,import-peft}")
    e = sub.add_parser("export", prog="llm export",
                       help="a checkpoint (with its LoRA merged, or as a PEFT adapter) for transformers",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Write a checkpoint of ours as a transformers model directory, or an adapter "
                                   "as a PEFT adapter next to its exported base.")
    e.add_argument("checkpoint", help="our checkpoint dir or training out dir (its latest); a LoRA / prefix run's "
                                      "checkpoint brings its base")
    e.add_argument("out_dir", help="hf: the directory for config.json, model.safetensors, tokenizer.json; "
                                   "peft: OUT_DIR/base and OUT_DIR/adapter")
    e.add_argument("--lora", default=None, metavar="DIR", help="a LoRA adapter (a LoRA run's checkpoint or out dir) "
                                                               "for CHECKPOINT")
    e.add_argument("--format", choices=("hf", "peft"), default="hf",
                   help="hf: one transformers model, any adapter merged in; peft: the adapter as a PEFT adapter "
                        "for the exported base (loads with peft.PeftModel.from_pretrained)")
    m = sub.add_parser("merge", prog="llm merge", help="fold a LoRA adapter into its base: a plain checkpoint of ours",
                       description="BASE + LoRA adapter folded into the weights: OUT/merged (OUT/latest points at it).")
    m.add_argument("--checkpoint", required=True, help="the base checkpoint")
    m.add_argument("--lora", required=True, help="the adapter (a LoRA run's checkpoint or out dir)")
    m.add_argument("--out", required=True, help="output directory")
    i = sub.add_parser("import-peft", prog="llm import-peft", help="a PEFT LoRA or prefix-tuning adapter as ours",
                       description="A PEFT adapter of a Llama-style model as our adapter dir "
                                   "(then: llm sample --checkpoint BASE --peft OUT).")
    i.add_argument("--peft", required=True, help="the PEFT adapter dir (adapter_config.json + safetensors)")
    i.add_argument("--base", required=True, help="the base model it was trained on (ours or a transformers dir)")
    i.add_argument("--out", required=True, help="output directory")
    return p


def export(checkpoint: str, out_dir: str, lora: str | None = None, fmt: str = "hf") -> Path:
    """The export command: a transformers dir (any adapter merged) or, fmt 'peft', base + PEFT adapter."""
    adapter = lora
    if adapter is None and not is_hf_dir(checkpoint):
        d = ckpt_io.resolve(checkpoint)
        if (d / lora_io.ADAPTER_CONFIG).is_file() and not (d / ckpt_io.MODEL_FILE).is_file():
            adapter = checkpoint  # a fine-tune's checkpoint: its adapter, on the base it records
    if fmt == "peft":
        if adapter is None:
            raise ConfigError(f"--format peft exports an adapter, and {checkpoint} holds none: give the fine-tune's "
                              "checkpoint (or --lora DIR), or export the model with --format hf")
        return export_peft(adapter, out_dir)
    model, tok, cfg = load_model(checkpoint, lora=lora)
    if cfg.get("quantization"):
        raise ConfigError(f"{checkpoint} is quantized ({cfg['quantization'].get('mode', '?')}): transformers "
                          "reads full-precision weights here; export the checkpoint it was quantized from")
    if adapter is not None:
        peft.merge(model)
    return export_model(model, tok, out_dir)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "export":
            out = export(args.checkpoint, args.out_dir, args.lora, args.format)
            load = (f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(out.parent / 'base')!r}"
                    f"), {str(out)!r})" if args.format == "peft" else
                    f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
            print(f"wrote {out} (load with {load})")
        elif args.cmd == "merge":
            print(f"wrote {merge_to(args.checkpoint, args.lora, args.out)}")
        else:
            print(f"wrote {import_peft(args.peft, args.base, args.out)}")
    except (CheckpointError, ConfigError, TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
