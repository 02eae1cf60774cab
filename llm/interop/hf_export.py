"""Our checkpoint -> a transformers model directory (`python -m llm.interop export CKPT OUT_DIR`, whose command
line is llm/interop/__main__.py; this module is the library it calls)."""


from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm.checkpoint import load_checkpoint
from llm.config import ConfigError, ModelConfig
from llm.interop.hf import ARCH, family_of, split_tensor, weight_rules
from llm.tokenizer import Tokenizer, TokenizerError, bytes_to_unicode


def hf_config(cfg: ModelConfig, family: str, tok: Tokenizer) -> dict:
    """transformers config.json for our `cfg` as `family` (vocab_size = our padded embedding rows)."""
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eot_id, torch_dtype="float32", architectures=[ARCH[family]],
               model_type=family, vocab_size=cfg.padded_vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    if family == "gpt2":
        return ids | dict(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_inner=cfg.intermediate_size, activation_function="gelu_new",
                          layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                          attn_pdrop=0.0)
    out = ids | dict(hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                     rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, attention_dropout=0.0)
    if family == "llama":
        out |= dict(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif family in ("qwen2", "qwen3"):
        out |= dict(use_sliding_window=cfg.window is not None, sliding_window=cfg.window, max_window_layers=0,
                    layer_types=[("sliding" if cfg.window else "full") + "_attention"] * cfg.n_layer)
    else:  # mistral, mixtral
        out["sliding_window"] = cfg.window
    if family == "mixtral":
        out |= dict(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                    intermediate_size=cfg.expert_hidden, router_aux_loss_coef=cfg.aux_coef)
    return out


def export(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write our checkpoint `ckpt` as a transformers model directory `out_dir`; returns out_dir."""
    model, tok, _ = load_checkpoint(ckpt)
    return export_model(model, tok, out_dir)


def export_model(model, tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write a loaded (plain: no adapter, not quantized) model and its tokenizer as a transformers model
    directory `out_dir`; returns out_dir."""
    cfg = model.cfg
    family = family_of(cfg)
    sd = model.state_dict()
    if any(k.endswith("expert_bias") and bool(v.any()) for k, v in sd.items()):
        raise ConfigError("the model routes with a trained aux-loss-free expert bias (balance='bias'), "
                          "which transformers' Mixtral has no place for")
    if cfg.attn_mult != 1.0 or cfg.output_mult != 1.0:
        raise ConfigError(f"the model was trained with µP multipliers (attn_mult {cfg.attn_mult:g}, output_mult "
                          f"{cfg.output_mult:g}), which transformers' configs have no place for")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for rule in weight_rules(cfg, family):
        for name, t in zip(rule.hf, split_tensor(rule, sd[rule.ours]), strict=True):
            tensors[name] = t.detach().to(torch.float32).contiguous().cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    conf = hf_config(cfg, family, tok)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    gen = {k: conf[k] for k in ("bos_token_id", "eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    export_tokenizer(tok, out, cfg.block_size)
    return out


def export_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json (byte-level BPE with our split regex and special tokens) + tokenizer_config.json."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    if tok.info["kind"] == "hf":
        tok.enc.hf.save(str(out / "tokenizer.json"))
    else:
        ranks = tok._ranks if tok.info["kind"] == "bpe" else tok.enc._mergeable_ranks
        special = dict(tok.enc._special_tokens)
        char = bytes_to_unicode()

        def s(b: bytes) -> str:
            return "".join(char[x] for x in b)

        vocab = {s(b): i for b, i in ranks.items()} | special
        merges = [(s(a), s(b)) for a, b in bpe_merges(ranks)]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        if tok.info.get("normalize"):
            from tokenizers import normalizers

            hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        always = set(tok.info.get("always", ()))
        hf.add_tokens([AddedToken(c, special=c not in always, normalized=False)
                       for c, _ in sorted(special.items(), key=lambda kv: kv[1])])
        if tok.add_bos:
            bos = tok.decode([tok.bos_id])
            hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                              special_tokens=[(bos, tok.bos_id)])
        hf.save(str(out / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False, "eos_token": tok.decode([tok.eot_id]),
            "bos_token": tok.decode([tok.bos_id])}
    if tok.info.get("chat_template"):
        conf["chat_template"] = tok.info["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of tiktoken ranks: for each multi-byte token in rank order, the last pair BPE joins.

    BPE on the token's bytes using only lower ranks must end in exactly two parts; their
    join is the merge that makes the token (the standard tiktoken -> merges conversion).
    """
    out = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best = min(((ranks.get(parts[j] + parts[j + 1]), j) for j in range(len(parts) - 1)
                        if ranks.get(parts[j] + parts[j + 1], r) < r), default=None)
            if best is None:
                break
            j = best[1]
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {tok!r} (rank {r}) is not reachable by BPE merges; cannot export")
        out.append((parts[0], parts[1]))
    return out


if __name__ == "__main__":  # a library module: say where its command line is instead of exiting 0 silently
    sys.exit("error: llm.interop.hf_export is a library module; export with: python -m llm.interop export CKPT "
             "OUT_DIR (or llm export CKPT OUT_DIR)")
