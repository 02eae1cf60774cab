"""Several LoRA adapters over one base in one forward pass: every row picks its adapter (S-LoRA / Punica's idea).

`llm serve --lora NAME=DIR ...`. Each projection any adapter targets becomes a `MultiLoRALinear`: the base's own
linear (nn.Linear or QuantLinear, shared, not copied) plus the adapters' low-rank factors stacked. For N adapters,
adapter a (1 .. N) with target row slices t = [lo_t, hi_t) of rank r_t on this projection:

  A_a  (R, in)   its A_t stacked along the rank:  rows [r0_t, r0_t + r_t) = A_t
  B_a  (out, R)  block-structured:  B_a[lo_t:hi_t, r0_t:r0_t + r_t] = B_t, zero elsewhere
  R = max over adapters of sum_t r_t (a smaller adapter is zero-padded; an adapter not on it is all zero)

so B_a A_a x = sum_t (rows lo_t..hi_t of) B_t A_t x: LoRALinear's update. A row x_i of a step with adapter index
k_i (0: the base) gets

  y_i = base(x_i) + s_{k_i} * ((x_i A_all^T) * m_i) B_all^T,    m_i = 1 on adapter k_i's R columns, 0 elsewhere

with A_all = [A_1; ...; A_N] (N R, in), B_all = [B_1 ... B_N] (out, N R), s_0 = 0. Every row computes all N
adapters' x A^T (N R columns: small next to the base's `out`) and the mask keeps its own; no gather, no
data-dependent shape, so a step of mixed rows is one forward and the captured decode step compiles it with the
index as one more static input. Measured against the alternatives (a per-row gather of A/B + bmm, as BGMV; a loop
over adapters with index_add) in benchmarks/NOTES.md, "Mixed LoRA batches". Dropout is off (serving).

The rows' indices live in one `AdapterRows` shared by every layer of a model: set before a forward
(`with rows.use(idx)`), None when a step has no adapter row (the layers then run the base alone).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from llm.lora import TARGETS, LoRAMixin
from llm.model import Transformer


class AdapterRows:
    """The adapter index of every row of the next forward: idx (T,) long (0 = base), or None (all base)."""

    def __init__(self, n_adapters: int) -> None:
        self.n = n_adapters
        self.idx: Tensor | None = None
        self.mask: Tensor | None = None  # (T, N, 1): row i's own adapter's columns

    @contextlib.contextmanager
    def use(self, idx: Tensor | None) -> Iterator[None]:
        """Rows of the forward inside the block carry these adapter indices (T,); None: the base for all."""
        self.set(idx)
        try:
            yield
        finally:
            self.set(None)

    def set(self, idx: Tensor | None) -> None:
        self.idx, self.mask = idx, None if idx is None else self.mask_of(idx)

    def mask_of(self, idx: Tensor) -> Tensor:
        """idx (T,) -> (T, N, 1) bool: column block a - 1 is row i's when idx_i = a (none for the base, 0)."""
        return (idx[:, None] == torch.arange(1, self.n + 1, device=idx.device))[:, :, None]


class MultiLoRALinear(nn.Module):
    """base(x) plus, per row, its own adapter's scale * B A x; x (T, ..., in) with the rows on dim 0."""

    def __init__(self, base: nn.Module, adapters: list[LoRAMixin | None], rows: AdapterRows) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = base.in_features, base.out_features
        ranks = [sum(m.lora_A[n].shape[0] for n in m.parts) if m is not None else 0 for m in adapters]
        self.n, self.r = len(adapters), max(1, *ranks)
        any_m = next(m for m in adapters if m is not None)
        ref = next(iter(any_m.lora_A.values()))
        A = torch.zeros(self.n, self.r, self.in_features, dtype=ref.dtype, device=ref.device)
        B = torch.zeros(self.n, self.out_features, self.r, dtype=ref.dtype, device=ref.device)
        scale = torch.zeros(self.n + 1, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for a, m in enumerate(adapters):
                if m is None:
                    continue
                r0 = 0
                for name, (lo, hi) in m.parts.items():
                    r = m.lora_A[name].shape[0]
                    A[a, r0:r0 + r] = m.lora_A[name]
                    B[a, lo:hi, r0:r0 + r] = m.lora_B[name]
                    r0 += r
                scale[a + 1] = m.scale
        self.register_buffer("A", A.reshape(self.n * self.r, self.in_features).t().contiguous())  # (in, N R)
        self.register_buffer("B", B.permute(0, 2, 1).reshape(self.n * self.r, self.out_features).contiguous())
        self.register_buffer("scale", scale)  # (N + 1,): 0 for the base

    def forward(self, x: Tensor) -> Tensor:
        """x (T, ..., in) -> (T, ..., out)."""
        y = self.base(x)
        if self.rows.idx is None:
            return y
        T = x.shape[0]
        x2 = x.reshape(-1, self.in_features)
        h = (x2 @ self.A).view(T, -1, self.n, self.r) * self.rows.mask[:, None]  # (T, L, N, R): own columns
        d = h.view(x2.shape[0], self.n * self.r) @ self.B
        s = self.scale[self.rows.idx].view(T, *[1] * (x.dim() - 1))
        return y + (d.view(y.shape) * s)


def stack_adapters(base: Transformer, adapters: dict[str, Transformer]) -> tuple[Transformer, AdapterRows]:
    """A model over the base's own weights (no copy; `base` untouched) whose targeted projections carry every
    adapter (`adapters`: name -> the base with that LoRA adapter on top, `llm.loading.adapter_on_shared_base`),
    adapter k (1-based, in dict order) picked per row through the returned AdapterRows."""
    if not adapters:
        raise ValueError("stack_adapters: no adapters")
    rows = AdapterRows(len(adapters))
    with torch.device("meta"):
        model = Transformer(copy.deepcopy(base.cfg))
    for name, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, t)  # the base's Parameter objects themselves
    for i, block in enumerate(model.blocks):
        for path in sorted(set(TARGETS.values())):
            layers = [m.blocks[i].get_submodule(path) for m in adapters.values()]
            layers = [m if isinstance(m, LoRAMixin) else None for m in layers]
            if any(m is not None for m in layers):
                parent, attr = path.rsplit(".", 1)
                own = base.blocks[i].get_submodule(path)  # the base's module itself (nn.Linear or QuantLinear)
                setattr(block.get_submodule(parent), attr, MultiLoRALinear(own, layers, rows))
    return model.eval(), rows
