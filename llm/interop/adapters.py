"""LoRA adapters in and out: merge into a plain checkpoint, export to / import from the PEFT format.

  python -m llm.interop.adapters merge --checkpoint BASE --lora DIR --out OUT
      BASE + adapter folded into the weights: a plain checkpoint OUT/merged (OUT/latest points at it)
  python -m llm.interop.adapters export-peft --lora DIR --out OUT
      OUT/base: the base as a transformers model (llm/interop/hf_export.py; an HF base is referenced as it is)
      OUT/adapter: adapter_config.json + adapter_model.safetensors, loadable with
      peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter)
  python -m llm.interop.adapters import-peft --peft DIR --base BASE --out OUT
      a PEFT LoRA adapter of a Llama-style model as our adapter dir (sample.py --checkpoint BASE --lora OUT)

PEFT names: q/k/v/o -> self_attn.{q,k,v,o}_proj, gate/up/down -> mlp.{gate,up,down}_proj, under
base_model.model.model.layers.N.; lora_A.weight (r, in), lora_B.weight (out, r), scale lora_alpha / r.
An adapter that added tokens (chat templates on our checkpoints) trains embedding rows PEFT's LoRA has no
place for: merge it and export the merged checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from llm import checkpoint as ckpt_io
from llm import lora
from llm.checkpoint import CheckpointError, read_tensors
from llm.config import ConfigError
from llm.interop.hf import family_of, is_hf_dir
from llm.interop.hf_export import export
from llm.loading import load_model
from llm.tokenizer import TokenizerError

PEFT_CONFIG, PEFT_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model.model.layers."
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def merge_to(base: str, adapter: str, out: str) -> Path:
    """Write base + adapter merged as a plain checkpoint `out/merged`; returns its path."""
    model, tok, _ = load_model(base, lora=adapter)
    lora.merge(model)
    return ckpt_io.save(out, "merged", model, tok, {"merged_from": {"base": str(base), "lora": str(adapter)}})


def _our_key(block: int, target: str, ab: str) -> str:
    return f"blocks.{block}.{lora.TARGETS[target]}.lora_{ab}.{target}"


def export_peft(adapter: str, out: str) -> Path:
    """OUT/base (an HF export of the adapter's base) and OUT/adapter in the PEFT format; returns OUT/adapter."""
    adir = ckpt_io.resolve(adapter)
    cfg = lora.read_adapter_config(adir)
    if cfg.get("added_tokens"):
        raise ConfigError(f"the adapter in {adir} added tokens ({', '.join(cfg['added_tokens'])}) whose embedding "
                          "rows PEFT's LoRA cannot hold: merge it (python -m llm.interop.adapters merge) and export "
                          "the merged checkpoint with python -m llm.interop.hf_export")
    model, _, _ = load_model(cfg["base"], lora=adir)
    if family_of(model.cfg) == "gpt2" or model.cfg.n_experts:
        raise ConfigError("PEFT export supports Llama-style dense models (separate q/k/v projections)")
    o = Path(out)
    base = Path(cfg["base"]) if is_hf_dir(cfg["base"]) else export(cfg["base"], o / "base")
    tensors = lora.adapter_tensors(model)
    theirs = {}
    for i in range(model.cfg.n_layer):
        for t in cfg["targets"]:
            for ab in "AB":
                theirs[f"{PREFIX}{i}.{PEFT_NAMES[t]}.lora_{ab}.weight"] = \
                    tensors[_our_key(i, t, ab)].detach().float().contiguous()
    (o / "adapter").mkdir(parents=True, exist_ok=True)
    save_file(theirs, o / "adapter" / PEFT_FILE, metadata={"format": "pt"})
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["rank"], "lora_alpha": cfg["alpha"],
            "lora_dropout": cfg["dropout"], "target_modules": [PEFT_NAMES[t].split(".")[1] for t in cfg["targets"]],
            "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": str(base.resolve()),
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    (o / "adapter" / PEFT_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return o / "adapter"


def import_peft(peft_dir: str, base: str, out: str) -> Path:
    """A PEFT LoRA adapter for `base` as our adapter dir `out` (config.json + tokenizer + adapter files)."""
    p = Path(peft_dir)
    if not (p / PEFT_CONFIG).is_file() or not (p / PEFT_FILE).is_file():
        raise CheckpointError(f"{p} is not a PEFT adapter (need {PEFT_CONFIG} and {PEFT_FILE})")
    pc = json.loads((p / PEFT_CONFIG).read_text())
    unsupported = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out") if pc.get(k)] + (
        ["rank_pattern/alpha_pattern"] if pc.get("rank_pattern") or pc.get("alpha_pattern") else [])
    if pc.get("peft_type") != "LORA" or unsupported:
        raise ConfigError(f"{p}: only plain LoRA adapters import (peft_type {pc.get('peft_type')}, "
                          f"unsupported: {', '.join(unsupported) or 'none'})")
    short = {v.split(".")[1]: k for k, v in PEFT_NAMES.items()}
    mods = pc["target_modules"] if isinstance(pc["target_modules"], list) else [pc["target_modules"]]
    bad = [m for m in mods if m not in short]
    if bad:
        raise ConfigError(f"{p}: target modules {', '.join(bad)} have no LoRA target here ({', '.join(short)})")
    cfg = lora.LoRAConfig(int(pc["r"]), float(pc["lora_alpha"]), float(pc.get("lora_dropout", 0.0)),
                          tuple(short[m] for m in mods))
    model, tok, _ = load_model(base)
    lora.apply_lora(model, cfg)
    theirs, _ = read_tensors(p / PEFT_FILE)
    ours = {_our_key(i, t, ab): theirs.get(f"{PREFIX}{i}.{PEFT_NAMES[t]}.lora_{ab}.weight")
            for i in range(model.cfg.n_layer) for t in cfg.targets for ab in "AB"}
    missing = [k for k, v in ours.items() if v is None]
    if missing:
        raise CheckpointError(f"{p / PEFT_FILE} lacks tensors for {len(missing)} of the adapter's layers "
                              f"(e.g. {missing[0]})")
    lora.load_adapter_tensors(model, ours, p / PEFT_FILE)
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    lora.save_adapter(o, model, lora.adapter_config(cfg, model, str(Path(base).resolve()), tok.n_vocab, []))
    conf = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model": model.cfg.__dict__ | {},
            "tokenizer": tok.save(o), "imported_from": str(p)}
    (o / ckpt_io.CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    return o


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm.interop.adapters", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base: a plain checkpoint")
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--lora", required=True)
    m.add_argument("--out", required=True)
    e = sub.add_parser("export-peft", help="an adapter in the PEFT format next to an HF-exported base")
    e.add_argument("--lora", required=True)
    e.add_argument("--out", required=True)
    i = sub.add_parser("import-peft", help="a PEFT LoRA adapter as ours")
    i.add_argument("--peft", required=True)
    i.add_argument("--base", required=True)
    i.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "merge":
            print(f"wrote {merge_to(args.checkpoint, args.lora, args.out)}")
        elif args.cmd == "export-peft":
            print(f"wrote {export_peft(args.lora, args.out)}")
        else:
            print(f"wrote {import_peft(args.peft, args.base, args.out)}")
    except (ConfigError, CheckpointError, TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
