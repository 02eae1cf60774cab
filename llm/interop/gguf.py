"""GGUF out and in: llama-architecture files for llama.cpp, written and read with the `gguf` package.

Export (`export_gguf`): a Llama-family checkpoint of ours (RMSNorm, SwiGLU, RoPE, GQA, no biases) as a GGUF file
of type f32, f16, q8_0 or q4_0. Tensors take llama.cpp's names (token_embd, blk.N.attn_q/k/v/output,
ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output). Our RoPE rotates halves (q[:D/2], q[D/2:]) as
Hugging Face does; llama.cpp's llama rotates adjacent pairs, so the rows of wq and wk are permuted per head
(row j of the pair layout = row j/2 + (j%2) D/2 of ours), exactly what llama.cpp's own HF converter does.
q8_0 / q4_0: blocks of 32 along the input, one fp16 scale per block (q4_0 symmetric, codes - 8); 1-D tensors
(norms) stay f32, and a matrix whose rows are not a multiple of 32 falls back to f16. The tokenizer goes in as
llama.cpp reads a byte-level BPE ("gpt2" model): tokens as byte-level strings, merges, token types (normal,
control for special tokens), bos / eos ids, and the pre-tokenizer name whose split matches ours
(cl100k's pattern, ours by default: "llama-bpe"; GPT-2's: "gpt-2"; others are refused).

Import (`load_gguf`): a llama-architecture file (f32, f16, bf16, q8_0, q4_0 tensors; dequantized to the
requested dtype; `--quantize` then maps them to our int8 / int4 if asked) with a "gpt2" BPE tokenizer. Any
other architecture, tensor type or tokenizer is one CheckpointError line.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import torch

from llm.checkpoint import CheckpointError, load_into
from llm.config import ModelConfig
from llm.interop.hf import family_of
from llm.interop.hf_export import bpe_merges
from llm.model import Transformer
from llm.tokenizer import GPT2_PATTERN, PATTERN, Tokenizer, bytes_to_unicode

TYPES = ("f32", "f16", "q8_0", "q4_0")
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# ----------------------------------------------------------------------------- names and layout


def _names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(ours, llama.cpp's) for every tensor but the split wqkv, which _tensors_out handles."""
    out = [("tok_emb.weight", "token_embd.weight"), ("norm_f.weight", "output_norm.weight")]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        out += [(b + "norm1.weight", g + "attn_norm.weight"), (b + "attn.wo.weight", g + "attn_output.weight"),
                (b + "norm2.weight", g + "ffn_norm.weight"), (b + "mlp.w1.weight", g + "ffn_gate.weight"),
                (b + "mlp.w3.weight", g + "ffn_up.weight"), (b + "mlp.w2.weight", g + "ffn_down.weight")]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", "output.weight"))
    return out


def _to_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order to llama.cpp's adjacent-pair order, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _from_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_llama(cfg: ModelConfig) -> None:
    if family_of(cfg) != "llama" or cfg.bias or cfg.rope_scaling or cfg.window is not None:
        raise CheckpointError("GGUF export writes llama-architecture files: this model is not a plain Llama "
                              f"(family {family_of(cfg)}, bias={cfg.bias}, rope_scaling={cfg.rope_scaling}, "
                              f"window={cfg.window})")


# ----------------------------------------------------------------------------- export


def _pre_name(pattern: str) -> str:
    known = {PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2"}
    if pattern not in known:
        raise CheckpointError("GGUF export: the tokenizer's split pattern is not one whose llama.cpp "
                              "pre-tokenizer this code names (cl100k's -> llama-bpe, GPT-2's -> gpt-2)")
    return known[pattern]


def _write_tokenizer(w, tok: Tokenizer, n_vocab: int) -> None:
    if tok.info["kind"] not in ("bpe", "tiktoken"):
        raise CheckpointError(f"GGUF export: a {tok.info['kind']!r} tokenizer cannot be written (byte-level BPE only)")
    ranks = tok._ranks if tok.info["kind"] == "bpe" else tok.enc._mergeable_ranks
    special = dict(tok.enc._special_tokens)
    char = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(char[x] for x in b)

    n = max(n_vocab, tok.n_vocab)  # the embedding's rows: a padded vocabulary gets unused tokens
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for b, i in ranks.items():
        tokens[i], types[i] = s(b), gguf.TokenType.NORMAL
    for c, i in special.items():
        tokens[i], types[i] = c, gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(tok.enc._pat_str))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{s(a)} {s(b)}" for a, b in bpe_merges(ranks)])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_add_bos_token(tok.add_bos)
    if tok.info.get("chat_template"):
        w.add_chat_template(tok.info["chat_template"])


def export_gguf(model: Transformer, tok: Tokenizer, out: str | Path, qtype: str = "f32") -> Path:
    """Write `model` (a plain Llama of ours) and its tokenizer as a llama.cpp GGUF file of type `qtype`."""
    if qtype not in TYPES:
        raise CheckpointError(f"GGUF type must be one of {', '.join(TYPES)}, got {qtype!r}")
    cfg = model.cfg
    _check_llama(cfg)
    if getattr(model, "quantization", None):
        raise CheckpointError("GGUF export reads full-precision weights: pass the unquantized checkpoint")
    G = gguf.GGMLQuantizationType
    gtype = {"f32": G.F32, "f16": G.F16, "q8_0": G.Q8_0, "q4_0": G.Q4_0}[qtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]
    out = Path(out)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("llm export")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftype)
    _write_tokenizer(w, tok, cfg.vocab_size)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tensors = [(g, sd[o]) for o, g in _names(cfg)]
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    for i in range(cfg.n_layer):
        q, k, v = sd[f"blocks.{i}.attn.wqkv.weight"].split([H * D, Hkv * D, Hkv * D])
        tensors += [(f"blk.{i}.attn_q.weight", _to_pairs(q, H)), (f"blk.{i}.attn_k.weight", _to_pairs(k, Hkv)),
                    (f"blk.{i}.attn_v.weight", v)]
    for name, t in tensors:
        a = t.numpy()
        if a.ndim == 1 or gtype == G.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif gtype == G.F16 or a.shape[-1] % 32:
            w.add_tensor(name, a.astype(np.float16))
        else:
            data = gguf.quants.quantize(a.astype(np.float32), gtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ----------------------------------------------------------------------------- import


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _read_tokenizer(reader, source: str) -> Tokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{source}: tokenizer model {model!r} is not read (byte-level BPE 'gpt2' only)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    patterns = {"llama-bpe": PATTERN, "llama3": PATTERN, "dbrx": PATTERN, "gpt-2": GPT2_PATTERN,
                "default": GPT2_PATTERN}
    if pre not in patterns:
        raise CheckpointError(f"{source}: pre-tokenizer {pre!r} is not read "
                              f"(known: {', '.join(sorted(patterns))})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges") or []
    specials = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)}
    vocab = {t: i for i, t in enumerate(tokens) if int(types[i]) == int(gguf.TokenType.NORMAL)}
    added = {t: {"content": t, "id": i, "special": int(types[i]) == int(gguf.TokenType.CONTROL)}
             for i, t in enumerate(tokens) if int(types[i]) in specials}
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    info = {"eot": tokens[eos] if eos is not None else None, "bos": tokens[bos] if bos is not None else None,
            "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False))}
    if info["eot"] is None:
        raise CheckpointError(f"{source}: no tokenizer.ggml.eos_token_id")
    tmpl = _field(reader, "tokenizer.chat_template")
    if tmpl:
        info["chat_template"] = tmpl
    try:
        return Tokenizer.from_byte_level(vocab, merges, added, patterns[pre], info, name=Path(source).stem)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              tokenizer: bool = True, **overrides) -> tuple[Transformer, Tokenizer | None, dict]:
    """(model in eval mode, tokenizer, config dict) from a llama-architecture GGUF file; tensors dequantized."""
    src = str(path)
    try:
        reader = gguf.GGUFReader(src)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: not a readable GGUF file ({str(e).splitlines()[0]})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{src}: GGUF architecture {arch!r} is not read (llama only)")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(READ_TYPES))
    if bad:
        raise CheckpointError(f"{src}: GGUF tensor type(s) {', '.join(bad)} are not read "
                              f"(reads {', '.join(READ_TYPES)})")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        raise CheckpointError(f"{src}: RoPE scaling {_field(reader, 'llama.rope.scaling.type')!r} is not read")
    raw = {t.name: t for t in reader.tensors}
    n_embd, n_head = int(_field(reader, "llama.embedding_length")), int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    d = dict(vocab_size=0, block_size=int(_field(reader, "llama.context_length", 2048)),
             n_layer=int(_field(reader, "llama.block_count")), n_head=n_head, n_kv_head=n_kv, n_embd=n_embd,
             head_dim=int(_field(reader, "llama.attention.key_length", n_embd // n_head)),
             intermediate_size=int(_field(reader, "llama.feed_forward_length")),
             norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
             rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
             tie_embeddings="output.weight" not in raw, pad_vocab_multiple=1)

    def tensor(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"{src}: missing tensor {name}")
        t = raw[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type.name != "F32" else np.asarray(t.data)
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: the file is memory-mapped read-only

    emb = tensor("token_embd.weight")
    d["vocab_size"] = emb.shape[0]
    d.update(overrides)
    try:
        cfg = ModelConfig(**d)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    tensors = {"tok_emb.weight": emb}
    for ours, theirs in _names(cfg)[1:]:
        tensors[ours] = tensor(theirs)
    for i in range(cfg.n_layer):
        q = _from_pairs(tensor(f"blk.{i}.attn_q.weight"), cfg.n_head)
        k = _from_pairs(tensor(f"blk.{i}.attn_k.weight"), cfg.n_kv_head)
        tensors[f"blocks.{i}.attn.wqkv.weight"] = torch.cat([q, k, tensor(f"blk.{i}.attn_v.weight")])
    dtype = dtype or torch.float32
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    load_into(model, tensors, Path(src))
    model.init_buffers(device)
    tok = _read_tokenizer(reader, src) if tokenizer else None
    conf = {"format": "gguf", "model_type": "llama", "model": asdict(cfg), "tokenizer": tok.info if tok else None}
    return model.eval(), tok, conf

