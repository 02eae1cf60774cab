"""Adapters in and out: merge LoRA into a plain checkpoint; export to / import from the PEFT format (LoRA and
prefix tuning).

The command lines are `llm merge | export | import-peft` (= `python -m llm.interop ...`, llm/interop/__main__.py):

  llm merge --checkpoint BASE --lora DIR --out OUT
      BASE + adapter folded into the weights: a plain checkpoint OUT/merged (OUT/latest points at it)
  llm export DIR OUT --format peft   (export_peft)
      OUT/base: the base as a transformers model (llm/interop/hf_export.py; an HF base is referenced as it is)
      OUT/adapter: adapter_config.json + adapter_model.safetensors, loadable with
      peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter)
  llm import-peft --peft DIR --base BASE --out OUT
      a PEFT LoRA or prefix-tuning adapter of a Llama-style model as our adapter dir
      (llm sample --checkpoint BASE --peft OUT)

PEFT names: q/k/v/o -> self_attn.{q,k,v,o}_proj, gate/up/down -> mlp.{gate,up,down}_proj, under
base_model.model.model.layers.N.; lora_A.weight (r, in), lora_B.weight (out, r), scale lora_alpha / r.
An adapter that added tokens (chat templates on our checkpoints) trained their embedding (and head) rows: PEFT
holds those as trainable tokens (`trainable_token_indices`, the rows' values under
`...embed_tokens.token_adapter.trainable_tokens_delta`), and OUT/base is the base with its vocabulary grown
as the fine-tune grew it (the new rows at their starting values, the adapter's tokenizer and chat template).

Prefix tuning: PEFT's PREFIX_TUNING with prefix_projection false holds `prompt_embeddings` (P, 2 L Hkv D): row p
is, for layer l = 0..L-1, that layer's key then value at p, each (Hkv, D) (PEFT views it as (P, 2L, Hkv, D); its
layer l reads entries 2l and 2l + 1). Our folded prefix.keys / prefix.values (L, P, Hkv, D) map to it one to one;
both put the text at positions P.. after the prefix and keep the rows unrotated, so the logits agree. Bottleneck
adapters have no PEFT counterpart here (PEFT has no Houlsby adapters for causal LMs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from llm import checkpoint as ckpt_io
from llm import lora, peft, prefix
from llm.checkpoint import CheckpointError, read_tensors
from llm.config import ConfigError
from llm.interop.hf import family_of, is_hf_dir
from llm.interop.hf_export import export, export_model
from llm.loading import load_model

PEFT_CONFIG, PEFT_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model.model.layers."
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def merge_to(base: str, adapter: str, out: str) -> Path:
    """Write base + adapter merged as a plain checkpoint `out/merged`; returns its path."""
    model, tok, _ = load_model(base, lora=adapter)
    peft.merge(model)
    return ckpt_io.save(out, "merged", model, tok, {"merged_from": {"base": str(base), "lora": str(adapter)}})


def _our_key(block: int, target: str, ab: str) -> str:
    return f"blocks.{block}.{lora.TARGETS[target]}.lora_{ab}.{target}"


def export_peft(adapter: str, out: str) -> Path:
    """OUT/base (an HF export of the adapter's base) and OUT/adapter in the PEFT format; returns OUT/adapter."""
    adir = ckpt_io.resolve(adapter)
    cfg = peft.read_config(adir)
    if cfg["method"] == "adapter":
        raise ConfigError("bottleneck adapters have no Hugging Face PEFT format to export to (PEFT exports here: "
                          "LoRA and prefix tuning)")
    added = list(cfg.get("added_tokens") or [])
    if added and cfg["method"] != "lora":
        raise ConfigError(f"the adapter in {adir} added tokens ({', '.join(added)}): PEFT holds their rows only "
                          "next to LoRA; export it merged into a plain model instead")
    model, tok, _ = load_model(cfg["base"], lora=adir)
    if family_of(model.cfg) == "gpt2" or model.cfg.n_experts:
        raise ConfigError("PEFT export supports Llama-style dense models (separate q/k/v projections)")
    o = Path(out)
    if added:  # the base as the fine-tune saw it: vocab grown (new rows at their start values), chat tokenizer
        grown = load_model(cfg["base"])[0]
        lora.grow_vocab(grown, tok.n_vocab)
        base = export_model(grown, tok, o / "base")
    else:
        base = Path(cfg["base"]) if is_hf_dir(cfg["base"]) else export(cfg["base"], o / "base")
    if cfg["method"] == "prefix":
        return _export_prefix(model, base, o)
    tensors = lora.adapter_tensors(model)
    theirs, trainable = {}, {}
    if added:
        ids = list(range(cfg["base_vocab"], cfg["base_vocab"] + len(added)))
        heads = [("embed_tokens", "model.embed_tokens", "tok_emb")]
        if not model.cfg.tie_embeddings:  # PEFT ties a tied head's rows to the embedding's by itself
            heads.append(("lm_head", "lm_head", "lm_head"))
        for name, path, ours in heads:
            theirs[f"base_model.model.{path}.token_adapter.trainable_tokens_delta"] = \
                tensors[lora.ROW_KEYS[ours]].detach().float().contiguous()
            trainable[name] = ids
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
            "use_dora": False, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
            "trainable_token_indices": trainable or None}
    (o / "adapter" / PEFT_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return o / "adapter"


def _export_prefix(model, base: Path, o: Path) -> Path:
    """OUT/adapter as PEFT prefix tuning (prefix_projection false: the folded rows as prompt_embeddings)."""
    c, rows = model.cfg, model.prefix.rows().detach().float()  # (2, L, P, Hkv, D)
    P = rows.shape[2]
    emb = rows.permute(2, 1, 0, 3, 4).reshape(P, -1).contiguous()  # (P, L * 2 * Hkv * D): per layer key, value
    (o / "adapter").mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": emb}, o / "adapter" / PEFT_FILE, metadata={"format": "pt"})
    conf = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
            "token_dim": c.n_kv_head * c.head_dim, "num_transformer_submodules": 1,
            "num_attention_heads": c.n_kv_head, "num_layers": c.n_layer, "encoder_hidden_size": c.n_embd,
            "prefix_projection": False, "base_model_name_or_path": str(base.resolve()), "inference_mode": True}
    (o / "adapter" / PEFT_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return o / "adapter"


def _import_prefix(p: Path, pc: dict, base: str) -> tuple:
    """(model with the PEFT prefix loaded, tokenizer, our prefix config) for a PREFIX_TUNING adapter."""
    model, tok, _ = load_model(base)
    c = model.cfg
    want = dict(num_layers=c.n_layer, token_dim=c.n_kv_head * c.head_dim, num_transformer_submodules=1)
    bad = [f"{k} {pc.get(k)} vs {v}" for k, v in want.items() if pc.get(k) != v]
    if bad:  # prefix_projection true is fine: PEFT saves the MLP's output (the folded rows) either way
        raise ConfigError(f"{p}: this prefix does not fit {base} ({', '.join(bad)})")
    cfg = prefix.PrefixConfig(int(pc["num_virtual_tokens"]), 0)
    peft.apply(model, cfg, vocab=tok.n_vocab, train=False)
    emb = read_tensors(p / PEFT_FILE)[0].get("prompt_embeddings")
    P, L, Hkv, D = cfg.tokens, c.n_layer, c.n_kv_head, c.head_dim
    if emb is None or tuple(emb.shape) != (P, L * 2 * Hkv * D):
        raise CheckpointError(f"{p / PEFT_FILE}: expected prompt_embeddings ({P}, {L * 2 * Hkv * D}), got "
                              f"{None if emb is None else tuple(emb.shape)}")
    rows = emb.float().view(P, L, 2, Hkv, D).permute(2, 1, 0, 3, 4)
    peft.load_tensors(model, {prefix.KEYS: rows[0], prefix.VALUES: rows[1]}, p / PEFT_FILE)
    return model, tok, cfg


def import_peft(peft_dir: str, base: str, out: str) -> Path:
    """A PEFT LoRA or prefix-tuning adapter for `base` as our adapter dir `out` (config.json + tokenizer + adapter
    files)."""
    p = Path(peft_dir)
    if not (p / PEFT_CONFIG).is_file() or not (p / PEFT_FILE).is_file():
        raise CheckpointError(f"{p} is not a PEFT adapter (need {PEFT_CONFIG} and {PEFT_FILE})")
    pc = json.loads((p / PEFT_CONFIG).read_text())
    if pc.get("peft_type") == "PREFIX_TUNING":
        model, tok, cfg = _import_prefix(p, pc, base)
        return _write_adapter(model, tok, cfg, base, p, Path(out))
    unsupported = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out") if pc.get(k)] + (
        ["rank_pattern/alpha_pattern"] if pc.get("rank_pattern") or pc.get("alpha_pattern") else [])
    if pc.get("peft_type") != "LORA" or unsupported:
        raise ConfigError(f"{p}: only plain LoRA and prefix-tuning adapters import (peft_type {pc.get('peft_type')}"
                          f", unsupported: {', '.join(unsupported) or 'none'})")
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
    return _write_adapter(model, tok, cfg, base, p, Path(out))


def _write_adapter(model, tok, cfg, base: str, src: Path, o: Path) -> Path:
    """Our adapter dir: adapter files, config.json and the tokenizer."""
    o.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in peft.saved_tensors(model).items()}, o / lora.ADAPTER_FILE,
              metadata={"format": ckpt_io.FORMAT})
    (o / lora.ADAPTER_CONFIG).write_text(json.dumps(
        peft.adapter_config(cfg, model, str(Path(base).resolve()), tok.n_vocab, []), indent=2))
    conf = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model": model.cfg.__dict__ | {},
            "tokenizer": tok.save(o), "imported_from": str(src)}
    (o / ckpt_io.CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    return o


if __name__ == "__main__":  # a library module: say where its command line is instead of exiting 0 silently
    sys.exit("error: llm.interop.adapters is a library module; its commands are llm merge | llm export "
             "--format peft | llm import-peft (= python -m llm.interop merge | export | import-peft; llm --help)")
