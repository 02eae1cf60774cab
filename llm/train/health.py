"""Training-health telemetry and the loss-spike detector.

Every --health-interval steps (`Health`), per layer (`0..L-1` for the blocks, `emb`, `head` for the embeddings and
the final norm + LM head):
  health/grad_rms/<layer>       sqrt(mean g^2) over the layer's parameters, after unscaling, before clipping
  health/update_ratio/<layer>   ||W_after - W_before||_F / ||W_before||_F over its matrices (0 on a skipped step)
  health/act_rms/<layer>        RMS of block <layer>'s output (the residual stream)
  health/attn_max_logit/<layer> max pre-softmax score (q.k / sqrt(D) x attn_mult) of query head 0, last <= 16
                                query rows of row 0
  health/attn_entropy/<layer>   mean softmax entropy (nats) of those rows
  health/logit_max              max output logit
The activation and attention entries come from a probe: one extra no-grad, eval-mode forward of the bare model
over 2 fixed validation sequences, with forward hooks that recompute head 0's scores for a few rows. It never
touches the training forward (so DDP, FSDP2 and torch.compile run as before; training is bit-identical with
telemetry on or off) and uses no RNG. Under FSDP2 the per-layer sums are all-reduced from the local shards.

`SpikeDetector`: a step whose loss is non-finite, or whose z-score against the last --spike-window good losses
exceeds --spike-zscore, is skipped by the trainer; its window is part of the checkpoint (exact resume).
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import torch
from torch import Tensor, nn

from llm import ops
from llm.plotting import figure, finish, panel_title, style
from llm.train import distributed as dd

PROBE_ROWS = 16  # query rows whose attention scores the probe recomputes


def layer_of(name: str) -> str:
    """The telemetry layer of a parameter name: the block index, 'emb' or 'head'."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return parts[1]
    return "emb" if parts[0] in ("tok_emb", "pos_emb") else "head"


class Health:
    """Per-layer gradient, update, activation and attention statistics every `interval` steps (0 = never)."""

    def __init__(self, model: nn.Module, interval: int, d: dd.Dist, sharded: bool) -> None:
        self.interval, self.d, self.sharded = interval, d, sharded or d.tp > 1
        self.params = [(layer_of(n), p) for n, p in model.named_parameters() if p.requires_grad]
        # Under TP each rank's sums are weighted by its share of the tensor (distinct shards / world), so the sum
        # over all ranks counts every element once, replicated or TP / FSDP-sharded; 1 otherwise (as before).
        self.share = {id(p): _share(p, d.world) if d.tp > 1 else 1.0 for _, p in self.params}
        self.layers = sorted({lay for lay, _ in self.params}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit()
                                                                               else 0, s))

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def _reduce(self, sums: dict[str, list[Tensor]]) -> dict[str, float]:
        keys = list(sums)
        vec = torch.stack([torch.stack(sums[k]).sum() if sums[k] else torch.zeros(()) for k in keys])
        if self.sharded:
            dd.all_reduce(vec, self.d)
        return dict(zip(keys, vec.tolist()))

    @torch.no_grad()
    def before_update(self) -> dict:
        """Gradient sums of squares per layer and a copy of the matrices, taken before the optimizer step."""
        sums: dict[str, list[Tensor]] = {}
        for lay, p in self.params:
            if p.grad is not None:
                sums.setdefault(f"g/{lay}", []).append(_local(p.grad).float().pow(2).sum().cpu() * self.share[id(p)])
        counts = {lay: sum(p.numel() for la, p in self.params if la == lay and p.grad is not None)
                  for lay in self.layers}
        weights = [(lay, p, _local(p).detach().clone()) for lay, p in self.params if p.dim() >= 2]
        return {"grad": self._reduce(sums), "counts": counts, "weights": weights}

    @torch.no_grad()
    def after_update(self, snap: dict) -> dict[str, float]:
        out = {f"health/grad_rms/{lay}": math.sqrt(snap["grad"].get(f"g/{lay}", 0.0) / max(1, n))
               for lay, n in snap["counts"].items()}
        sums: dict[str, list[Tensor]] = {}
        for lay, p, w0 in snap["weights"]:
            k = self.share[id(p)]
            sums.setdefault(f"d/{lay}", []).append((_local(p).float() - w0.float()).pow(2).sum().cpu() * k)
            sums.setdefault(f"w/{lay}", []).append(w0.float().pow(2).sum().cpu() * k)
        red = self._reduce(sums)
        for lay in self.layers:
            if f"w/{lay}" in red:
                out[f"health/update_ratio/{lay}"] = math.sqrt(red[f"d/{lay}"] / max(red[f"w/{lay}"], 1e-30))
        return out

    @torch.no_grad()
    def probe(self, model: nn.Module, x: Tensor) -> dict[str, float]:
        """Activation RMS per block, head 0's max attention logit and entropy per block, the max output logit."""
        out: dict[str, float] = {}
        hooks = []
        for i, block in enumerate(model.blocks):
            hooks.append(block.register_forward_hook(
                lambda m, a, y, i=i: out.__setitem__(f"health/act_rms/{i}", y.float().pow(2).mean().sqrt().item())))
            hooks.append(block.attn.register_forward_pre_hook(
                lambda m, a, i=i: out.update(_attention_stats(model, m, a[0], a[2], i))))
        was = model.training
        model.eval()
        try:
            logits, _ = model(x)
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        out["health/logit_max"] = logits.max().item()
        return out


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _share(p: Tensor, world: int) -> float:
    """This rank's share of tensor p in a sum over all `world` ranks: (distinct shards) / world; a plain
    tensor (replicated on every rank) 1 / world."""
    if not hasattr(p, "placements"):
        return 1.0 / world
    shards = math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements)  # Shard, or FSDP2's _StridedShard
                       if not (pl.is_replicate() or pl.is_partial()))
    return shards / world


def _attention_stats(model: nn.Module, attn: nn.Module, x: Tensor, positions: Tensor, i: int) -> dict[str, float]:
    """Recompute query head 0 / kv head 0 of `attn` on row 0 of its input x (B, T, C): scores of the last
    PROBE_ROWS queries against their causal keys (scaled as the model scales them) -> max logit and mean entropy."""
    D, H = attn.head_dim, attn.n_head
    qkv = attn.wqkv(x[:1])  # (1, T, (H + 2 Hkv) D)
    T = qkv.shape[1]
    q, k = qkv[..., :D].view(1, T, 1, D), qkv[..., H * D:H * D + D].view(1, T, 1, D)
    if attn.cfg.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.cfg.pos_emb == "rope":
        q = ops.rope(q, model.rope_cos, model.rope_sin, positions, kernels="torch")
        k = ops.rope(k, model.rope_cos, model.rope_sin, positions, kernels="torch")
    rows = torch.arange(max(0, T - PROBE_ROWS), T, device=x.device)
    s = (q[0, rows, 0].float() @ k[0, :, 0].float().T) * attn.score_scale  # (R, T)
    s = s.masked_fill(torch.arange(T, device=x.device)[None] > rows[:, None], float("-inf"))
    p = s.softmax(-1)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return {f"health/attn_max_logit/{i}": s.max().item(), f"health/attn_entropy/{i}": ent.mean().item()}


class SpikeDetector:
    """z = (loss - mean) / max(std, 1e-3 * |mean|) over the last `window` good losses; a spike when z > zscore
    (0 = off) once the window is full, or the loss is non-finite. Spikes never enter the window."""

    def __init__(self, window: int, zscore: float) -> None:
        self.window, self.zscore = window, zscore
        self.losses: deque[float] = deque(maxlen=max(1, window))

    def check(self, loss: float) -> tuple[bool, float | None]:
        """(is a spike, its z-score or None); a good loss is added to the window."""
        if not math.isfinite(loss):
            return True, None
        z = None
        if self.zscore and len(self.losses) == self.window:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.losses) / len(self.losses))
            z = (loss - mean) / max(std, 1e-3 * abs(mean), 1e-12)
            if z > self.zscore:
                return True, z
        self.losses.append(loss)
        return False, z

    def state_dict(self) -> list[float]:
        return list(self.losses)

    def load_state_dict(self, losses: list[float]) -> None:
        self.losses.clear()
        self.losses.extend(losses[-self.losses.maxlen:])


# health.png: (statistic, panel title, y label, log scale) per panel; the series of each panel, in legend order
HEALTH_PANELS = [
    ("grad_rms", "gradient RMS", "gradient RMS (log scale)", True),
    ("update_ratio", "update size / weight size", "update RMS / weight RMS (log scale)", True),
    ("act_rms", "activation RMS (each block's output)", "activation RMS", False),
    ("attn_max_logit", "max attention logit (head 0, probe rows)", "max attention logit", False),
    ("attn_entropy", "attention entropy (head 0, probe rows)", "attention entropy (nats)", False),
    ("logit_max", "max output logit", "max output logit", False),
]


def _health_series(name: str) -> str:
    """A health key's tail as a legend entry: "0" -> "layer 0", "emb" -> "embedding", "head" -> "output head"."""
    return {"emb": "embedding", "head": "output head", "": "output head"}.get(name, f"layer {name}")


def plot_health(metrics_path: Path, out_png: Path) -> Path | None:
    """The health/* series of metrics.jsonl against step (llm/plotting.py's rules): one panel per statistic,
    one line per layer (plus the embedding and output head where measured), one legend under the panels."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(k.startswith("health/") for k in r)]
    if not rows:
        return None
    tails = sorted({k.split("/", 2)[2] if k.count("/") == 2 else "" for r in rows for k in r
                    if k.startswith("health/")}, key=lambda t: (int(t) if t.isdigit() else 1 << 30, t != "emb"))
    names = _distinct_in_order([_health_series(t) for t in tails])
    fig, axes = figure(len(HEALTH_PANELS), f"training health ({metrics_path.parent.name})")
    for ax, (stat, title, ylabel, log) in zip(axes, HEALTH_PANELS):
        for key in sorted({k for r in rows for k in r if k == f"health/{stat}" or k.startswith(f"health/{stat}/")},
                          key=lambda k: names.index(_health_series(k.removeprefix(f"health/{stat}").lstrip("/")))):
            name = _health_series(key.removeprefix(f"health/{stat}").lstrip("/"))
            i = names.index(name)
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=name, color=f"C{i % 10}", **style(i, len(pts)))
        panel_title(ax, title)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
    return finish(fig, axes, out_png, "")


def _distinct_in_order(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
