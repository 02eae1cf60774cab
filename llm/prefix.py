"""Prefix tuning (Li & Liang 2021): P learned key/value rows per layer that every query attends to, the model frozen.

Layer l attends over keys [K_l^pre ; K_l] and values [V_l^pre ; V_l], K_l^pre, V_l^pre (P, Hkv, D): the prefix is
a region of the KV cache, P rows long, filled before the first token and shared by every sequence; no prompt
tokens are spent on it. Training sees it the same way: an uncached forward reads the prefix through `PrefixView`,
a read-only cache holding only those rows (so training and decoding run the one attention path,
`ops.kv_attention`, keys longer than queries).

Serving (llm/serve/engine.py): the engine writes the rows into blocks of its paged pool once (`fill_blocks`) and
every sequence's block table starts with them; its tokens start at position P there too (`PagedKVCache(start=P)`).

Positions. The rows are keys and values as attention sees them (after RoPE): they have no positions of their
own. The real tokens start at position P, where the cache's next row is, in training and in decoding alike;
Hugging Face PEFT does the same (it offsets position ids by num_virtual_tokens). So a prefix model holds
block_size - P tokens of context (`Transformer.new_cache` refuses more).

Reparameterization (Li & Liang §4.3; training on the rows directly is unstable): during training
    rows = init + MLP(E),   E (P, C),   MLP: C -> hidden -> tanh -> 2 L Hkv D,   the last layer zero at start,
so step 0 attends to `init`: the keys and values the base computes for P vocabulary tokens (the paper initializes
with real words' activations). Saving folds the MLP away: `prefix.keys`, `prefix.values` (L, P, Hkv, D) are what
every loader reads; a training checkpoint also carries `prefix.reparam.*` (E, the MLP, init) for an exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llm.config import ConfigError

KEYS, VALUES, REPARAM = "prefix.keys", "prefix.values", "prefix.reparam."


@dataclass
class PrefixConfig:
    tokens: int = 16      # P: rows per layer
    hidden: int = 512     # the reparameterization MLP's hidden width during training (0: train the rows directly)

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"--prefix-tokens must be >= 1, got {self.tokens}")
        if self.hidden < 0:
            raise ConfigError(f"--prefix-hidden must be >= 0, got {self.hidden}")


class Reparam(nn.Module):
    """rows (2, L, P, Hkv, D) = init + MLP(E): the training-time form of the prefix."""

    def __init__(self, init: Tensor, n_embd: int, hidden: int) -> None:
        super().__init__()
        _, L, P, Hkv, D = init.shape
        self.register_buffer("init", init.detach().clone())
        self.embedding = nn.Parameter(torch.randn(P, n_embd, device=init.device, dtype=init.dtype))
        self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), nn.Tanh(), nn.Linear(hidden, 2 * L * Hkv * D)).to(init)
        nn.init.zeros_(self.mlp[2].weight)  # step 0 = init exactly, as LoRA's B = 0
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> Tensor:
        return _rows(self.init, self.mlp(self.embedding))


def _rows(init: Tensor, out: Tensor) -> Tensor:
    """init (2, L, P, Hkv, D) + the MLP's output (P, 2 L Hkv D) laid out as the rows."""
    _, L, P, Hkv, D = init.shape
    return init + out.view(P, 2, L, Hkv, D).permute(1, 2, 0, 3, 4)


class Prefix(nn.Module):
    """The prefix of every layer: `rows()` (2, L, P, Hkv, D), keys then values, through the MLP while training
    (`reparam`) or held directly (`keys`, `values`: the folded form loaders use)."""

    def __init__(self, init: Tensor, n_embd: int, hidden: int = 0) -> None:
        super().__init__()
        self.n_tokens = init.shape[2]
        if hidden:
            self.reparam = Reparam(init, n_embd, hidden)
        else:
            self.keys = nn.Parameter(init[0].detach().clone())
            self.values = nn.Parameter(init[1].detach().clone())

    def rows(self) -> Tensor:
        return self.reparam() if hasattr(self, "reparam") else torch.stack([self.keys, self.values])

    def as_cache(self, batch: int, block_size: int) -> PrefixView:
        return PrefixView(self.rows(), batch, block_size)

    @torch.no_grad()
    def fill(self, cache) -> None:
        """Write the rows into the first P slots of every row of a KVCache made with start=P."""
        rows = self.rows()
        for layer in range(rows.shape[1]):
            cache.k[layer][:, : self.n_tokens] = rows[0, layer].to(cache.k[layer].dtype)
            cache.v[layer][:, : self.n_tokens] = rows[1, layer].to(cache.v[layer].dtype)

    @torch.no_grad()
    def fill_blocks(self, pool, blocks: list[int]) -> None:
        """Write the rows at positions 0..P-1 of a paged sequence whose first blocks are `blocks` (a
        `llm.paged_cache.BlockPool`'s ids, ceil(P / block_size) of them): row p in blocks[p // bs], slot p % bs."""
        rows, P, bs = self.rows(), self.n_tokens, pool.block_size
        if len(blocks) * bs < P:
            raise ValueError(f"{len(blocks)} blocks of {bs} slots cannot hold the prefix's {P} rows")
        pos = torch.arange(P)
        slots = (torch.tensor(blocks)[pos // bs] * bs + pos % bs).to(pool.device)  # (P,) flat slot ids
        for layer in range(rows.shape[1]):
            for store, r in ((pool.k[layer], rows[0, layer]), (pool.v[layer], rows[1, layer])):
                store.view(-1, *store.shape[2:])[slots] = r.to(store.dtype)


class PrefixView:
    """The prefix as a read-only KV cache for one uncached forward (training, scoring): `update` returns
    [prefix; k], [prefix; v] (differentiable in the prefix) and nothing is stored. Positions start at P."""

    block_table = segments = None  # the attributes a cache has; a contiguous, whole-row one

    def __init__(self, rows: Tensor, batch: int, block_size: int) -> None:
        self.rows, self.batch, self.block_size = rows, batch, block_size
        self.n = rows.shape[2]

    def check_room(self, T: int) -> None:
        if self.n + T > self.block_size:
            raise ValueError(f"sequence length {T} + the prefix's {self.n} rows exceed the context length "
                             f"{self.block_size}")

    def positions(self, T: int) -> Tensor:
        return torch.arange(self.n, self.n + T, device=self.rows.device)  # (T,)

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor):
        B, T = k.shape[:2]
        pk, pv = (self.rows[i, layer].to(k.dtype).expand(B, -1, -1, -1) for i in (0, 1))
        n = self.n + T
        return torch.cat([pk, k], 1), torch.cat([pv, v], 1), torch.full((B,), n, device=k.device), [n] * B

    def advance(self, T: int) -> None:
        pass


@torch.no_grad()
def base_rows(model: nn.Module, n: int, vocab: int, seed: int) -> Tensor:
    """(2, L, n, Hkv, D): the keys and values `model` computes for n vocabulary tokens drawn with `seed` (the
    prefix's starting point; the global RNG is not touched)."""
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
    was = model.training
    model.eval()
    cache = model.new_cache(1, n)
    model(ids.to(cache.lengths.device), cache=cache)
    model.train(was)
    return torch.stack([torch.stack([c[0, :n] for c in kv]) for kv in (cache.k, cache.v)]).float()


def apply_prefix(model: nn.Module, cfg: PrefixConfig, vocab: int, seed: int, train: bool = True) -> nn.Module:
    """Freeze nothing here (the caller does); attach `model.prefix`, started at the base's rows for cfg.tokens
    tokens; train=True with cfg.hidden: the reparameterized form, else the folded one."""
    c = model.cfg
    if cfg.tokens >= c.block_size:
        raise ConfigError(f"--prefix-tokens {cfg.tokens}: the prefix takes that many of the model's "
                          f"{c.block_size} positions and leaves none for the text; use at most {c.block_size - 1}")
    init = base_rows(model, cfg.tokens, vocab, seed)
    model.prefix = Prefix(init.to(model.lm_head.weight.device), c.n_embd, cfg.hidden if train else 0)
    return model


def fold(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """{prefix.keys, prefix.values} computed from a training checkpoint's prefix.reparam.* tensors ({} if none)."""
    if REPARAM + "init" not in tensors:
        return {}
    t = {k[len(REPARAM):]: v.detach().float().cpu() for k, v in tensors.items() if k.startswith(REPARAM)}
    h = torch.tanh(F.linear(t["embedding"], t["mlp.0.weight"], t["mlp.0.bias"]))
    rows = _rows(t["init"], F.linear(h, t["mlp.2.weight"], t["mlp.2.bias"]))  # no module: no RNG drawn
    return {KEYS: rows[0].contiguous(), VALUES: rows[1].contiguous()}
