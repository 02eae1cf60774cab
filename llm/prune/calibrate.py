"""Calibration: the activation statistics pruning ranks by, from one pass over calibration text.

Text comes from any dataset `llm.data.corpus.open_source` reads (default: the embedded Python-stdlib corpus),
encoded with the checkpoint's own tokenizer, cut into rows of the model's context. One forward pass in eval mode
with hooks collects, over all N calibration tokens:
  channel[c]        mean_t |x_t,c| of the residual stream entering every block and the final norm, summed over
                    those places (Minitron's embedding-channel importance)
  heads[l][h]       mean_t ||o_t,h||_2 of attention head h's output (the input of attn.wo) in block l
  mlp[l][j]         mean_t |a_t,j| of MLP hidden channel j (the input of mlp.w2) in block l
  layer[l]          1 - mean_t cos(x_t, block_l(x)_t): how much block l changes the residual stream (ShortGPT's
                    block influence; a block that barely changes it is the first to drop)
  in_norm[name]     ||X_:,k||_2 per input column k of every linear in the blocks (Wanda's activation norm)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llm.config import DataConfig
from llm.data.corpus import open_source
from llm.model import Transformer
from llm.tokenizer import Tokenizer


@dataclass
class Stats:
    tokens: int = 0
    channel: Tensor | None = None
    heads: list[Tensor] = field(default_factory=list)
    mlp: list[Tensor] = field(default_factory=list)
    layer: list[float] = field(default_factory=list)
    in_norm: dict[str, Tensor] = field(default_factory=dict)


def calibration_rows(dataset: str, tok: Tokenizer, block_size: int, n_tokens: int) -> tuple[Tensor, int]:
    """(rows (R, block_size) of token ids, tokens read): training-split documents in corpus order, each ending with
    the end-of-text id, until n_tokens are read. Fewer when the text runs out (the caller says how many)."""
    ids: list[int] = []
    for split, _, text in open_source(DataConfig(dataset=dataset)).docs():
        if split != "train":  # the validation documents stay unseen (perplexity is measured there)
            continue
        ids += tok.encode(text) + [tok.eot_id]
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    rows = len(ids) // block_size
    return torch.tensor(ids[: rows * block_size], dtype=torch.long).view(rows, block_size), len(ids)


@torch.no_grad()
def collect(model: Transformer, rows: Tensor, batch: int = 8, progress: Callable[[int, int], None] | None = None
            ) -> Stats:
    """Run `rows` through `model` (eval) with hooks and return the averaged statistics (module docstring)."""
    cfg, st = model.cfg, Stats()
    L, H, D = cfg.n_layer, cfg.n_head, cfg.head_dim
    st.channel = torch.zeros(cfg.n_embd)
    st.heads = [torch.zeros(H) for _ in range(L)]
    st.mlp = [torch.zeros(cfg.intermediate_size) for _ in range(L)]
    cos = [0.0] * L
    sq: dict[str, Tensor] = {}
    hooks = []

    def residual_in(x: Tensor) -> None:
        st.channel += x.float().abs().sum((0, 1)).cpu()

    def pre(fn):  # a forward pre-hook that returns None (a returned tensor would replace the module's input)
        def hook(mod, args):
            fn(args[0].float())
        return hook

    for i, b in enumerate(model.blocks):
        def block_hook(mod, args, out, i=i):
            residual_in(args[0])
            cos[i] += nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1).sum().item()

        hooks.append(b.register_forward_hook(block_hook))
        hooks.append(b.attn.wo.register_forward_pre_hook(
            pre(lambda x, i=i: st.heads[i].add_(x.unflatten(-1, (H, D)).norm(dim=-1).sum((0, 1)).cpu()))))
        hooks.append(b.mlp.w2.register_forward_pre_hook(
            pre(lambda x, i=i: st.mlp[i].add_(x.abs().sum((0, 1)).cpu()))))
        for name, m in b.named_modules():
            if isinstance(m, nn.Linear):
                key = f"blocks.{i}.{name}"
                sq[key] = torch.zeros(m.in_features)
                hooks.append(m.register_forward_pre_hook(pre(lambda x, key=key: sq[key].add_(x.pow(2).sum((0, 1))
                                                                                               .cpu()))))
    hooks.append(model.norm_f.register_forward_pre_hook(pre(residual_in)))
    model.eval()
    try:
        for r0 in range(0, len(rows), batch):
            model(rows[r0:r0 + batch])
            if progress:
                progress(min(r0 + batch, len(rows)), len(rows))
    finally:
        for h in hooks:
            h.remove()
    n = max(1, rows.numel())
    st.tokens = rows.numel()
    st.channel /= n
    st.heads = [h / n for h in st.heads]
    st.mlp = [m / n for m in st.mlp]
    st.layer = [1.0 - c / n for c in cos]
    st.in_norm = {k: v.sqrt() for k, v in sq.items()}
    return st
