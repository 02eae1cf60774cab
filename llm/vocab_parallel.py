"""A vocabulary-parallel LM head + cross-entropy (loss parallelism) for tensor-parallel training.

Under `--tp N` (llm/train/tp.py) each TP rank holds V/N contiguous rows of the head, W_r (V/N, C): rank r's
vocabulary slice [r V/N, (r+1) V/N). The loss is formed without any rank holding a (rows, V) logits tensor, and
without any rank holding the whole head (Megatron-LM's vocab-parallel cross-entropy, torchtitan's loss_parallel;
here through our fused chunked op path, since the model passes the head weight to the loss itself):

  pass 1, per chunk of rows:  z = x_c W_r^T (rows x V/N, one reused buffer); m_r = lse over the slice
                              (`ops.cross_entropy_lse`); z_t = z[i, t_i - r V/N] where this rank owns the target
  all-reduce (TP group):      M = max_r m_r;  S = sum_r exp(m_r - M), z_t = sum_r z_t (one rank contributes it)
                              lse = M + log S;  nll_i = lse_i - z_t,i + z_loss lse_i^2  (ignored rows 0)
  backward, per chunk:        z recomputed; dz = softmax slice (1 + 2 z_loss lse) - onehot (`ops.cross_entropy_dlogits`,
                              with the global lse); grad W_r += dz^T (s x_c) (this rank's rows, complete);
                              grad x_c = s dz W_r: a partial sum over the slices, summed over the TP group

The rows x are either the same on every TP rank (replicated residual stream: grad x all-reduced) or, under
sequence parallelism (`gather_rows`), this rank's rows only: they and their targets are all-gathered (rank order)
before pass 1 and grad x is reduce-scattered back. Either way the function's value on rank r is the mean over
*its own* rows, sum_i nll_i / max(1, kept own rows) — the same loss every rank gets without SP, the rank's part
with SP (llm/train/tp.py scales it into the group's mean) — and each row's dz is scaled by its owner's upstream
gradient / kept count (`s`, all-gathered in the backward), so gradients are exactly those of the ranks' losses.
Costs one more head GEMM than the single-device fused op (the logits are recomputed in the backward, as
the global lse is only known after the all-reduce) and 2 all-reduces of (rows,) floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from kernels import reference as ref
from llm import ops


@dataclass
class VocabSplit:
    """How the model's LM head is split (set by llm/train/tp.py): `group` the TP process group, whose rank r holds
    vocabulary rows [r V/N, (r+1) V/N); `gather_rows` under sequence parallelism (each rank holds its rows only)."""

    group: object
    gather_rows: bool = False


def _gather_rows(t: Tensor, group, world: int) -> Tensor:
    """(n, ...) on each rank -> (world n, ...), rank order."""
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


class VocabParallelCrossEntropy(torch.autograd.Function):
    """The module doc's algorithm. x (n, C), weight (V/N, C) this rank's head rows, targets (n,) global ids."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, split: VocabSplit, ignore_index: int,
                z_loss: float, kernels: str, chunk: int | None) -> Tensor:
        group, world = split.group, dist.get_world_size(split.group)
        rank = dist.get_rank(split.group)
        n_own = x.shape[0]
        if split.gather_rows:
            x, targets = _gather_rows(x, group, world), _gather_rows(targets, group, world)
        Vl, C = weight.shape
        lo, N = rank * Vl, x.shape[0]
        keep = targets != ignore_index
        mine = keep & (targets >= lo) & (targets < lo + Vl)
        elsewhere = -1 if ignore_index != -1 else -2  # a kept row whose label is in another rank's slice
        t_local = torch.where(mine, targets - lo, torch.where(keep, elsewhere, ignore_index))
        acc = torch.promote_types(x.dtype, torch.float32)  # the statistics' dtype (fp32 unless fp64)
        m = torch.zeros(N, dtype=acc, device=x.device)
        z_t = torch.zeros_like(m)
        step = chunk or ops.chunk_rows(N, C, Vl)
        buf = x.new_empty((min(step, max(N, 1)), Vl))
        for r0 in range(0, N, step):
            r1 = min(r0 + step, N)
            z = buf[: r1 - r0]
            torch.mm(x[r0:r1], weight.t(), out=z)  # (rows, V/N) logits of this rank's slice
            tc = t_local[r0:r1]
            z_t[r0:r1] = z.gather(1, tc.clamp(0, Vl - 1)[:, None]).squeeze(1).to(acc) * mine[r0:r1]
            m[r0:r1] = ops.cross_entropy_lse(z, tc, ignore_index, kernels)
        del buf
        M = m.clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([torch.exp(m - M) * keep, z_t])
        dist.all_reduce(sums, group=group)
        lse = torch.where(keep, M + torch.log(sums[0].clamp_min(torch.finfo(acc).tiny)), 0.0)
        nll = (lse - sums[1] + z_loss * lse * lse) * keep
        own = slice(rank * n_own, (rank + 1) * n_own) if split.gather_rows else slice(0, N)
        n = keep[own].sum().clamp_min(1).to(acc)
        ctx.save_for_backward(x, weight, t_local, lse, n)
        ctx.split, ctx.ignore_index, ctx.z_loss, ctx.kernels, ctx.step, ctx.n_own = (split, ignore_index, z_loss,
                                                                                     kernels, step, n_own)
        return nll[own].sum() / n

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, t_local, lse, n = ctx.saved_tensors
        split, world = ctx.split, dist.get_world_size(ctx.split.group)
        N, (Vl, C), step = x.shape[0], weight.shape, ctx.step
        s = (g.to(n.dtype) / n).reshape(1)  # this rank's rows: upstream gradient / kept rows
        if split.gather_rows:  # every rank's rows are here: each scaled by its owner's factor
            s = _gather_rows(s, split.group, world).repeat_interleave(ctx.n_own)
        s = s.expand(N).to(x.dtype)[:, None]  # (N, 1)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros((Vl, C), dtype=n.dtype, device=x.device) if ctx.needs_input_grad[1] else None
        buf = x.new_empty((min(step, max(N, 1)), Vl))
        for r0 in range(0, N, step):
            r1 = min(r0 + step, N)
            z = buf[: r1 - r0]
            torch.mm(x[r0:r1], weight.t(), out=z)
            dz = ops.cross_entropy_dlogits(z, t_local[r0:r1], lse[r0:r1], 1.0, ctx.ignore_index, ctx.z_loss,
                                           ctx.kernels)  # (rows, V/N), unscaled
            if grad_x is not None:
                torch.mm(dz, weight, out=grad_x[r0:r1])
                grad_x[r0:r1] *= s[r0:r1]
            if grad_w is not None:
                grad_w.add_(dz.t() @ (x[r0:r1] * s[r0:r1]))
        del buf
        if grad_x is not None:  # partial over the vocabulary slices: sum over the group
            if split.gather_rows:
                own = torch.empty((N // world, C), dtype=grad_x.dtype, device=grad_x.device)
                dist.reduce_scatter_tensor(own, grad_x, group=split.group)
                grad_x = own
            else:
                dist.all_reduce(grad_x, group=split.group)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def vocab_parallel_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, split: VocabSplit,
                                 ignore_index: int = -100, z_loss: float = 0.0, kernels: str = "auto",
                                 chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of this rank's rows x (n, C) against targets (n,) (global vocabulary ids or
    ignore_index), the head split by rows over `split.group` (`weight` (V/N, C): this rank's slice). Returns an
    fp32 scalar: on every rank the mean over its own rows (see the module doc). `chunk` forces the rows per chunk.
    Under autocast x and weight are cast to the autocast dtype first, as ops.linear_cross_entropy does."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"need x (n, C), weight (V/N, C), targets (n,): got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    ref.check_labels(targets, weight.shape[0] * dist.get_world_size(split.group), ignore_index)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
    with torch.autocast(dev, enabled=False):
        return VocabParallelCrossEntropy.apply(x, weight, targets.long(), split, ignore_index, z_loss, kernels,
                                               chunk)
