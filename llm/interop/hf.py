"""Hugging Face interop: load GPT-2 / Llama / Mistral / Qwen2 / Qwen3 / Mixtral model directories, export ours.

Import (`load_hf`, used by `llm.loading.load_model` for any directory whose config.json has a
"model_type"): config.json becomes a ModelConfig, every weight is read through safetensors'
memory map one tensor at a time, cast to the target dtype on the target device and assigned
into a model built on the meta device, so no second full copy of the weights ever exists.
The tokenizer comes from the same directory (`Tokenizer.from_hf`).

Export (`python -m llm.interop export CKPT OUT_DIR`, llm.interop.hf_export): our checkpoint as the matching Hugging Face
family (config.json + model.safetensors + tokenizer.json), which transformers'
AutoModelForCausalLM / AutoTokenizer load.

One table (`weight_rules`) maps our tensor names to theirs for both directions:
  copy   ours = theirs                     GPT-2 Conv1D: ours = theirs^T ("t")
  cat    wqkv = [q; k; v] along rows       Mixtral experts: w = stack(expert_0 .. expert_E-1)
Our RoPE is rotate-half like transformers', so q/k rows copy without permutation.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from llm.checkpoint import CheckpointError, listing, load_into
from llm.config import ConfigError, ModelConfig, model_config_from_dict
from llm.model import Transformer
from llm.runtime import DTYPES, first_line
from llm.tokenizer import Tokenizer

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral")
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM"}
INDEX = "model.safetensors.index.json"
# Tensors transformers stores that carry no weights: GPT-2's causal-mask buffers, cached RoPE frequencies.
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


class Rule(NamedTuple):
    """Our tensor `ours` <-> their tensors `hf` through `op` (copy | t | cat | stack); `sizes` splits a cat."""

    ours: str
    hf: tuple[str, ...]
    op: str = "copy"
    sizes: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- config


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json names a transformers "model_type" (not one of our checkpoints)."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg and "format" not in cfg


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers config dict; unsupported values raise one line naming them all."""
    try:
        return _config_from_hf(hf, source)
    except KeyError as e:
        raise CheckpointError(f"{source}: {hf.get('model_type')} config lacks the key {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: bad {hf.get('model_type')} config value ({first_line(e)})") from None


def _config_from_hf(hf: dict, source: str) -> ModelConfig:
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: unsupported Hugging Face architecture {family!r} "
                              f"(supported: {', '.join(FAMILIES)})")
    bad: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            bad.append(what)

    def get(key: str, default=None):
        return hf[key] if hf.get(key) is not None else default

    if family == "gpt2":
        act = get("activation_function", "gelu_new")
        need(act in ("gelu_new", "gelu_pytorch_tanh"), f"activation_function={act!r} (need the tanh GELU)")
        need(get("scale_attn_weights", True), "scale_attn_weights=false")
        need(not get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
        need(not get("add_cross_attention", False), "add_cross_attention=true")
        d = dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                 n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=get("n_inner", 4 * hf["n_embd"]),
                 pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                 tie_embeddings=get("tie_word_embeddings", True), norm_eps=get("layer_norm_epsilon", 1e-5))
    else:
        act = get("hidden_act", "silu")
        need(act == "silu", f"hidden_act={act!r} (need 'silu')")
        n_head = hf["num_attention_heads"]
        d = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                 n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=get("num_key_value_heads", n_head),
                 n_embd=hf["hidden_size"], head_dim=get("head_dim", hf["hidden_size"] // n_head),
                 intermediate_size=hf["intermediate_size"], tie_embeddings=get("tie_word_embeddings", False),
                 norm_eps=get("rms_norm_eps", 1e-6), **_rope(hf, need))
        attn_bias, mlp_bias = get("attention_bias", False), get("mlp_bias", False)
        if family == "llama":
            need(attn_bias == mlp_bias, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (need both or neither)")
            d["bias"] = bool(attn_bias and mlp_bias)
        else:
            need(not attn_bias, f"attention_bias=true (o_proj bias) in {family}")
        d["qkv_bias"] = family == "qwen2"
        d["qk_norm"] = family == "qwen3"
        d["window"] = _window(family, hf, need)
        if family == "mixtral":
            d.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                     expert_hidden=hf["intermediate_size"], score_func="softmax", norm_topk=True,
                     aux_coef=get("router_aux_loss_coef", 0.001))
    if bad:
        raise CheckpointError(f"{source}: unsupported {family} config values: {', '.join(bad)}")
    try:
        return ModelConfig(**d, pad_vocab_multiple=1)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _rope(hf: dict, need) -> dict:
    """rope_theta and the llama3 frequency scaling, from transformers 4 (rope_theta + rope_scaling) or 5 keys."""
    params = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 1e6 if hf["model_type"] == "mixtral" else 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    need(kind in ("default", "llama3"), f"rope_type={kind!r} (supported: default, llama3)")
    prf = params.get("partial_rotary_factor", 1.0)
    need(prf == 1.0, f"partial_rotary_factor={prf}")
    scaling = None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": "llama3", **{k: params[k] for k in keys}}
    return dict(rope_theta=float(theta), rope_scaling=scaling)


def _window(family: str, hf: dict, need) -> int | None:
    """Sliding-window width: Mistral/Mixtral's sliding_window, Qwen's when every layer slides."""
    win = hf.get("sliding_window")
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            return None
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                          "full_attention" for i in range(hf["num_hidden_layers"])]
        need(len(set(types)) == 1, "sliding window on some layers only (layer_types / max_window_layers)")
        return win if types and types[0] == "sliding_attention" else None
    types = set(hf.get("layer_types") or [])
    need(types <= {"full_attention", "sliding_attention"} and len(types) <= 1, f"layer_types={sorted(types)}")
    return win


# ----------------------------------------------------------------------------- weight names


def family_of(cfg: ModelConfig) -> str:
    """The transformers family that computes exactly what `cfg` computes; ConfigError naming what none does."""
    if cfg.mlp == "gelu":
        ok = (cfg.pos_emb == "learned" and cfg.norm == "layernorm" and cfg.bias and not cfg.qk_norm and
              cfg.window is None and cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.n_embd)
        if ok:
            return "gpt2"
    elif cfg.pos_emb == "rope" and cfg.norm == "rmsnorm":
        if cfg.n_experts:
            ok = not (cfg.bias or cfg.qkv_bias or cfg.qk_norm or cfg.n_shared_experts or cfg.first_dense_layers
                      or cfg.score_func != "softmax" or not cfg.norm_topk or cfg.route_scale != 1.0)
            if ok:
                return "mixtral"
        elif cfg.qk_norm:
            if not (cfg.bias or cfg.qkv_bias):
                return "qwen3"
        elif cfg.qkv_bias:
            if not cfg.bias:
                return "qwen2"
        elif cfg.window is not None:
            if not cfg.bias:
                return "mistral"
        else:
            return "llama"
    raise ConfigError(f"no transformers family computes this model (mlp={cfg.mlp}, norm={cfg.norm}, "
                      f"pos_emb={cfg.pos_emb}, bias={cfg.bias}, qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, "
                      f"window={cfg.window}, n_experts={cfg.n_experts})")


def weight_rules(cfg: ModelConfig, family: str, prefix: str | None = None) -> list[Rule]:
    """Our tensor names <-> transformers' for `family`; `prefix` is their base-model prefix."""
    if family == "gpt2":
        return _gpt2_rules(cfg, "transformer." if prefix is None else prefix)
    P = "model." if prefix is None else prefix
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    rules = [Rule("tok_emb.weight", (f"{P}embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        L, B = f"{P}layers.{i}.", f"blocks.{i}."
        qkv = tuple(f"{L}self_attn.{n}_proj" for n in "qkv")
        rules += [Rule(B + "norm1.weight", (L + "input_layernorm.weight",)),
                  Rule(B + "attn.wqkv.weight", tuple(n + ".weight" for n in qkv), "cat", (H * D, Hkv * D, Hkv * D)),
                  Rule(B + "attn.wo.weight", (L + "self_attn.o_proj.weight",)),
                  Rule(B + "norm2.weight", (L + "post_attention_layernorm.weight",))]
        if cfg.bias or cfg.qkv_bias:
            rules.append(Rule(B + "attn.wqkv.bias", tuple(n + ".bias" for n in qkv), "cat", (H * D, Hkv * D, Hkv * D)))
        if cfg.bias:
            rules.append(Rule(B + "attn.wo.bias", (L + "self_attn.o_proj.bias",)))
        if cfg.qk_norm:
            rules += [Rule(B + f"attn.{n}_norm.weight", (L + f"self_attn.{n}_norm.weight",)) for n in "qk"]
        if cfg.n_experts and i >= cfg.first_dense_layers:
            rules += _mixtral_rules(cfg, L, B)
            continue
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            rules.append(Rule(B + f"mlp.{ours}.weight", (L + f"mlp.{theirs}.weight",)))
            if cfg.bias:
                rules.append(Rule(B + f"mlp.{ours}.bias", (L + f"mlp.{theirs}.bias",)))
    rules.append(Rule("norm_f.weight", (f"{P}norm.weight",)))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def _gpt2_rules(cfg: ModelConfig, P: str) -> list[Rule]:
    rules = [Rule("tok_emb.weight", (f"{P}wte.weight",)), Rule("pos_emb.weight", (f"{P}wpe.weight",))]
    for i in range(cfg.n_layer):
        L, B = f"{P}h.{i}.", f"blocks.{i}."
        for ours, theirs, t in (("norm1", "ln_1", False), ("attn.wqkv", "attn.c_attn", True),
                                ("attn.wo", "attn.c_proj", True), ("norm2", "ln_2", False),
                                ("mlp.w1", "mlp.c_fc", True), ("mlp.w2", "mlp.c_proj", True)):
            rules += [Rule(f"{B}{ours}.weight", (f"{L}{theirs}.weight",), "t" if t else "copy"),
                      Rule(f"{B}{ours}.bias", (f"{L}{theirs}.bias",))]
    rules += [Rule("norm_f.weight", (f"{P}ln_f.weight",)), Rule("norm_f.bias", (f"{P}ln_f.bias",))]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def _mixtral_rules(cfg: ModelConfig, L: str, B: str) -> list[Rule]:
    """Router `gate` (E, d); experts w1/w3 (F, d) and w2 (d, F) each, stacked into our 3-D expert weights."""
    M = L + "block_sparse_moe."
    experts = range(cfg.n_experts)
    return [Rule(B + "mlp.router.weight", (M + "gate.weight",))] + [
        Rule(B + f"mlp.experts.{ours}", tuple(f"{M}experts.{e}.{theirs}.weight" for e in experts), "stack")
        for ours, theirs in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2"))]


# ----------------------------------------------------------------------------- reading safetensors


class _Weights:
    """Tensor name -> safetensors file of a model directory (one file, or shards listed by an index)."""

    def __init__(self, d: Path, stack: ExitStack) -> None:
        self.d, self.stack, self.handles = d, stack, {}
        if (d / INDEX).is_file():
            try:
                self.where = {k: d / v for k, v in json.loads((d / INDEX).read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{d / INDEX}: not a safetensors index ({first_line(e)})") from None
            for f in sorted(set(self.where.values())):
                if not f.is_file():
                    raise CheckpointError(f"{d / INDEX} lists {f.name}, which is missing")
        elif (d / "model.safetensors").is_file():
            self.where = {k: d / "model.safetensors" for k in self._open(d / "model.safetensors").keys()}
        else:
            pickles = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt*")]
            hint = f" ({', '.join(pickles)} is pickle-based and is never loaded)" if pickles else ""
            raise CheckpointError(f"{d} has no model.safetensors or {INDEX}{hint}")

    def _open(self, f: Path):
        if f not in self.handles:
            try:
                self.handles[f] = self.stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({first_line(e)})") from None
        return self.handles[f]

    def get(self, name: str, device, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, memory-mapped from its file, then cast/moved (the only copy made)."""
        f = self.where[name]
        try:
            t = self._open(f).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({first_line(e)})") from None
        return t.to(device=device, dtype=dtype)


def _prefix(family: str, names: set[str]) -> str:
    """Their base-model prefix: "model."/"transformer." for *ForCausalLM saves, "" for bare base models."""
    first = "wte.weight" if family == "gpt2" else "embed_tokens.weight"
    for p in ("transformer.", "model.", ""):
        if p + first in names:
            return p
    return "transformer." if family == "gpt2" else "model."


def combine_tensors(rule: Rule, ts: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == "copy":
        return ts[0]
    if rule.op == "t":
        return ts[0].t().contiguous()
    if rule.op == "cat":
        return torch.cat(ts, 0)
    return torch.stack(ts, 0)


def split_tensor(rule: Rule, t: torch.Tensor) -> list[torch.Tensor]:
    if rule.op == "copy":
        return [t]
    if rule.op == "t":
        return [t.t()]
    if rule.op == "cat":
        return list(t.split(list(rule.sizes), 0))
    return list(t.unbind(0))


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            tokenizer: bool = True, **overrides) -> tuple[torch.nn.Module, Tokenizer | None, dict]:
    """(model in eval mode, tokenizer, config dict) from a Hugging Face model directory.

    dtype: the weights' dtype (default: config.json's torch_dtype, else float32). Each tensor
    goes memory map -> `dtype` on `device` -> the model, one at a time.
    """
    d = Path(path)
    try:
        hf = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: cannot read ({first_line(e)})") from None
    mcfg = config_from_hf(hf, str(d / "config.json"))
    family = hf["model_type"]
    if overrides:
        try:
            mcfg = model_config_from_dict({**asdict(mcfg), **overrides})
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    dtype = dtype or DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype")), torch.float32)
    with ExitStack() as stack:
        weights = _Weights(d, stack)
        names = set(weights.where)
        rules = weight_rules(mcfg, family, _prefix(family, names))
        needed = [n for r in rules for n in r.hf]
        missing = [n for n in needed if n not in names]
        unexpected = sorted(n for n in names - set(needed) if not IGNORED.search(n) and
                            not (n == "lm_head.weight" and mcfg.tie_embeddings))
        if missing or unexpected:
            src = d / INDEX if (d / INDEX).is_file() else d / "model.safetensors"
            parts = [listing("missing", missing), listing("unexpected", unexpected)]
            raise CheckpointError(f"{src} does not hold the tensors of this {family} config: "
                                  + " | ".join(p for p in parts if p))
        tensors = {r.ours: combine_tensors(r, [weights.get(n, device, dtype) for n in r.hf]) for r in rules}
    if mcfg.n_experts and mcfg.balance == "bias":  # an aux-loss-free bias to train from zero (--init-from)
        for i in range(mcfg.first_dense_layers, mcfg.n_layer):
            tensors[f"blocks.{i}.mlp.router.expert_bias"] = torch.zeros(mcfg.n_experts, device=device)
    tok = Tokenizer.from_hf(d) if tokenizer else None
    if mcfg.pos_emb == "learned" and mcfg.block_size < tensors["pos_emb.weight"].shape[0]:
        tensors["pos_emb.weight"] = tensors["pos_emb.weight"][: mcfg.block_size]  # a shorter context by override
    with torch.device("meta"):
        model = Transformer(mcfg)
    load_into(model, tensors, d)
    model.init_buffers(device)
    cfg = {"format": "hf", "model_type": family, "model": asdict(mcfg), "tokenizer": tok.info if tok else None}
    return model.eval(), tok, cfg


# ----------------------------------------------------------------------------- export
