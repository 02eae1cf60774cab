"""Structured pruning: a smaller dense model, ranked by activation importance (Minitron, Muralidharan et al. 2024).

Axes, each ranked on calibration statistics (llm/prune/calibrate.py) and cut to the top-k, the same k in every
block (so the result is one plain config), the kept channels' order preserved:
  layers    drop the blocks with the lowest influence 1 - cos(x_in, x_out)
  mlp       keep the MLP hidden channels with the largest mean |activation| per block: rows of w1 (w3), columns of w2
  heads     keep whole GQA groups (a KV head and its n_head / n_kv_head query heads; query head h reads KV head
            h // (n_head / n_kv_head)) by the summed output norm of their query heads: rows of wqkv, columns of wo
  n_embd    keep the residual channels with the largest mean |x| over every block input: columns of the embedding,
            of every linear that reads the residual stream and of the head, rows of those that write it, and the
            norms' gains (RMSNorm then averages over the kept channels)
head_dim is kept, and written into the config explicitly (n_embd / n_head changes). The result is a state dict and
a config for `Transformer`; nothing else about the checkpoint differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from llm.config import ConfigError, ModelConfig
from llm.model import Transformer
from llm.prune.calibrate import Stats


@dataclass
class Shape:
    """The kept size of each axis."""

    layers: int
    mlp_hidden: int
    kv_heads: int
    n_embd: int

    def describe(self, cfg: ModelConfig) -> str:
        ratio = cfg.n_head // cfg.n_kv_head
        return (f"layers {cfg.n_layer} -> {self.layers}, MLP hidden {cfg.intermediate_size} -> {self.mlp_hidden}, "
                f"heads {cfg.n_head}/{cfg.n_kv_head} -> {self.kv_heads * ratio}/{self.kv_heads} (q/kv), width "
                f"{cfg.n_embd} -> {self.n_embd}")


def new_config(cfg: ModelConfig, shape: Shape) -> ModelConfig:
    ratio = cfg.n_head // cfg.n_kv_head
    return replace(cfg, n_layer=shape.layers, intermediate_size=shape.mlp_hidden, n_kv_head=shape.kv_heads,
                   n_head=shape.kv_heads * ratio, n_embd=shape.n_embd, head_dim=cfg.head_dim,
                   expert_hidden=shape.mlp_hidden)


def count_params(cfg: ModelConfig) -> int:
    """Parameters of a model of this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        return Transformer(cfg).num_params()


def check_shape(cfg: ModelConfig, layers: int | None, mlp_hidden: int | None, heads: int | None,
                kv_heads: int | None, n_embd: int | None) -> Shape:
    """The Shape the per-axis flags ask for (None: keep the axis), or one ConfigError naming what cannot be."""
    ratio = cfg.n_head // cfg.n_kv_head

    def within(name: str, v: int | None, have: int) -> int:
        if v is None:
            return have
        if not 1 <= v <= have:
            raise ConfigError(f"--{name} {v}: the model has {have}; keep between 1 and {have}")
        return v

    if heads is not None:
        if heads % ratio:
            raise ConfigError(f"--heads {heads} breaks the GQA groups: each of the {cfg.n_kv_head} KV heads serves "
                              f"{ratio} query heads, so keep a multiple of {ratio} (or give --kv-heads)")
        if kv_heads is not None and kv_heads * ratio != heads:
            raise ConfigError(f"--heads {heads} and --kv-heads {kv_heads} break the GQA groups: the model's groups "
                              f"are {ratio} query heads per KV head, kept whole")
        kv_heads = heads // ratio
    return Shape(within("layers", layers, cfg.n_layer), within("mlp-hidden", mlp_hidden, cfg.intermediate_size),
                 within("kv-heads", kv_heads, cfg.n_kv_head), within("n-embd", n_embd, cfg.n_embd))


def shape_for_target(cfg: ModelConfig, target: int) -> Shape:
    """The Shape of at most `target` parameters: depth and heads kept, the MLP hidden width cut by a factor f and
    the model width by (1 + f) / 2 (width hurts more than MLP channels; Minitron's 8B -> 4B cut MLP 36% and
    width 25%), f found by bisection. One ConfigError when the target is out of reach."""
    total = count_params(cfg)
    if target >= total:
        raise ConfigError(f"--target-params {target:,} is not smaller than the model ({total:,} parameters)")

    def at(f: float) -> Shape:
        r8 = lambda v: max(8, int(round(v / 8)) * 8)  # noqa: E731 (multiples of 8: whole GEMM tiles)
        return Shape(cfg.n_layer, min(cfg.intermediate_size, r8(cfg.intermediate_size * f)), cfg.n_kv_head,
                     min(cfg.n_embd, r8(cfg.n_embd * (1 + f) / 2)))

    lo, hi = 0.0, 1.0
    if count_params(new_config(cfg, at(lo))) > target:
        raise ConfigError(f"--target-params {target:,} is out of reach by width alone (the smallest width gives "
                          f"{count_params(new_config(cfg, at(lo))):,}); give --layers / --kv-heads too")
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_params(new_config(cfg, at(mid))) <= target else (lo, mid)
    return at(lo)


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, in ascending index order (the kept channels keep their order)."""
    return scores.topk(k).indices.sort().values


def prune(model: Transformer, stats: Stats, shape: Shape) -> Transformer:
    """A new, smaller Transformer holding the kept slices of `model`'s weights (model itself is unchanged)."""
    cfg = model.cfg
    if cfg.n_experts:
        raise ConfigError("structured pruning of a Mixture-of-Experts model is not supported (prune its experts by "
                          "router load is not built yet); prune a dense model")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    ratio = H // Hkv
    keep_layers = _top(torch.tensor(stats.layer), shape.layers).tolist()
    emb = _top(stats.channel, shape.n_embd)
    out: dict[str, Tensor] = {}
    for new_i, i in enumerate(keep_layers):
        p = f"blocks.{i}."
        mlp = _top(stats.mlp[i], shape.mlp_hidden)
        groups = _top(stats.heads[i].view(Hkv, ratio).sum(1), shape.kv_heads)
        q_heads = (groups[:, None] * ratio + torch.arange(ratio)).flatten()  # (kv_heads * ratio,)
        rows = torch.cat([q_heads, H + groups, H + Hkv + groups])  # heads of wqkv's [q; k; v] rows
        qkv_rows = (rows[:, None] * D + torch.arange(D)).flatten()
        o_cols = (q_heads[:, None] * D + torch.arange(D)).flatten()
        for k, v in sd.items():
            if not k.startswith(p):
                continue
            name, t = k[len(p):], v
            if name.startswith("attn.wqkv."):
                t = t[qkv_rows]
            elif name == "attn.wo.weight":
                t = t[:, o_cols]
            elif name.startswith(("mlp.w1.", "mlp.w3.")):
                t = t[mlp]
            elif name == "mlp.w2.weight":
                t = t[:, mlp]
            out[f"blocks.{new_i}.{name}"] = t
    for k, v in sd.items():
        if not k.startswith("blocks."):
            out[k] = v
    for k in list(out):  # the width: every tensor indexed by a residual channel
        t, name = out[k], k.split(".", 2)[-1] if k.startswith("blocks.") else k
        if name in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight") or name.endswith((
                "attn.wqkv.weight", "mlp.w1.weight", "mlp.w3.weight")):
            t = t[:, emb]
        elif name.endswith(("attn.wo.weight", "mlp.w2.weight")):
            t = t[emb]
        elif name.endswith(("attn.wo.bias", "mlp.w2.bias")) or (
                name.startswith(("norm1.", "norm2.", "norm_f.")) or k.startswith("norm_f.")):
            t = t[emb]
        out[k] = t.contiguous()
    small = Transformer(new_config(cfg, shape))
    small.load_state_dict(out, strict=True)
    return small.eval()
