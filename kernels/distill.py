"""Fused, chunked linear + distillation loss in Triton: neither the student's nor the teacher's (N, V) logits exist.

Per kept row i (targets_i != ignore_index; n = max(1, number of kept rows)), with s = x_i @ W^T the student's
logits, t = tx_i @ Wt^T the teacher's, q = softmax(s / T), p = softmax(t / T):
  loss_i = alpha * (lse(s) - s_y) + (1 - alpha) * T^2 * D_i,  loss = sum_i loss_i / n
  D_i = KL(p || q) (kind 0), KL(q || p) (kind 1), or (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2 (kind 2).
Gradient of the student's logits (what the kernel writes over them), with u = s / T:
  ds_j = alpha / n * (softmax(s)_j - [j == y]) + (1 - alpha) * T / n * dD/du_j
  dD/du_j = q_j - p_j                                 (forward KL)
          = q_j * (log q_j - log p_j - D_i)           (reverse KL)
          = q_j * (log q_j - log m_j) / 2 - q_j * J_i (JSD, J_i = sum_k q_k (log q_k - log m_k) / 2)
(the softmax's Jacobian applied to dD/dq; ignored rows get zeros). The row kernel streams each row three times in
BLOCK_V tiles: (1) online max / sum-of-exp of s, s / T and t / T and both argmaxes, (2) D_i and the softmax-Jacobian
term, (3) ds written in place over s. The launcher walks the rows in chunks, as kernels/cross_entropy.py's fused
linear CE does (and reuses its chunk size, target checks and fp32 grad_W accumulation): logits of a chunk from two
torch GEMMs into two reused buffers, the kernel, then grad_x_c = ds_c @ W and grad_W += ds_c^T @ x_c. Gradients are
computed in the forward (upstream gradient 1) and scaled in the backward. Anchor: Liger-Kernel's fused linear JSD.

row_math="torch" (the CPU route of ops.linear_distill) keeps this chunk loop and replaces the row kernel by
`distill_rows_torch`: the same closed forms in PyTorch on one chunk's logits, so a few (C, V) fp32 temporaries
exist at once instead of (N, V) ones; "torch-compiled" is that function under torch.compile (fused passes).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase
from kernels.cross_entropy import MIN_CHUNK_ROWS, _addmm_fp32_, _check_targets, _count, chunk_rows

KINDS = {"kl": 0, "reverse-kl": 1, "jsd": 2}
ROW_MATH = ("triton", "torch", "torch-compiled")
# Fewest rows per chunk of the torch row math (CPU). Eager, it holds ~8 fp32 (C, V) temporaries per chunk (the
# Triton kernel: none beyond the two logits buffers), so it takes smaller chunks than the GPU's MIN_CHUNK_ROWS; a
# 256-row GEMM is still compute-bound on a CPU (its register blocks are a few rows tall).
TORCH_MIN_CHUNK_ROWS = 256


@triton.jit
def _divergence_terms(s, t, mask, lse_st, lse_tt, inv_temp, KIND: tl.constexpr):
    # s, t: one tile of student / teacher logits (fp32, masked columns -inf); mask: columns < V;
    # lse_st, lse_tt: log-sum-exp of s / T and t / T; inv_temp: 1 / T.
    # Returns (the tile's terms of D_i, the terms of sum_k q_k g_k that the gradient subtracts, log q, log m, q, p).
    lq = tl.where(mask, s * inv_temp - lse_st, 0.0)
    lp = tl.where(mask, t * inv_temp - lse_tt, 0.0)
    q = tl.where(mask, tl.exp(lq), 0.0)
    p = tl.where(mask, tl.exp(lp), 0.0)
    if KIND == 0:
        d = p * (lp - lq)
        lm = lq
        qg = d * 0.0
    elif KIND == 1:
        d = q * (lq - lp)
        lm = lp
        qg = d
    else:
        hi = tl.maximum(lp, lq)
        lm = hi + tl.log(1.0 + tl.exp(tl.minimum(lp, lq) - hi)) - 0.6931471805599453  # log((p + q) / 2), stable
        qg = 0.5 * q * (lq - lm)
        d = 0.5 * p * (lp - lm) + qg
    return tl.where(mask, d, 0.0), tl.where(mask, qg, 0.0), lq, lm, q, p


@triton.jit
def _distill_fwd_kernel(
    s_ptr,  # (N, V) student logits of the chunk, any float dtype; overwritten with ds when WRITE_GRAD
    stride_s,  # elements between rows of s (columns contiguous)
    t_ptr,  # (N, V) teacher logits of the chunk (read only)
    stride_t,  # elements between rows of t
    targets_ptr,  # (N,) int64 labels; ignore_index rows count in no term
    loss_ptr,  # (N,) fp32 out: alpha * ce_i + (1 - alpha) * T^2 * D_i (0 for ignored rows)
    ce_ptr,  # (N,) fp32 out: lse(s) - s_y
    div_ptr,  # (N,) fp32 out: D_i at temperature T
    agree_ptr,  # (N,) fp32 out: 1 where argmax s == argmax t
    scale_ptr,  # () fp32: 1 / n, read on the device (no host sync)
    V,  # vocabulary size: row length, any value (non-power-of-two tails are masked)
    ignore_index,  # label value whose row contributes nothing
    alpha,  # weight of the hard-label CE
    temperature,  # T > 0
    KIND: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    BLOCK_V: tl.constexpr,  # columns per tile; rows are streamed so V is not bounded by registers
    WRITE_GRAD: tl.constexpr,  # third pass writing ds in place
):
    # int64 row offsets: N * V passes 2^31 for a 16k x 128k chunk.
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    target = tl.load(targets_ptr + row).to(tl.int64)
    inv_temp = 1.0 / temperature
    if target != ignore_index:
        # Pass 1: online log-sum-exps (s, s / T from the same running max since T > 0, t / T) and argmaxes; the
        # first index wins ties (strict > across tiles, tl.argmax within one), as torch.argmax.
        m_s = -float("inf")
        sum_s = 0.0
        sum_st = 0.0
        m_t = -float("inf")
        sum_tt = 0.0
        arg_s = 0
        arg_t = 0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            bs = tl.max(s, axis=0)
            bt = tl.max(t, axis=0)
            arg_s = tl.where(bs > m_s, start + tl.argmax(s, axis=0), arg_s)
            arg_t = tl.where(bt > m_t, start + tl.argmax(t, axis=0), arg_t)
            ms_new = tl.maximum(m_s, bs)
            sum_s = sum_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s - ms_new), axis=0)
            sum_st = sum_st * tl.exp((m_s - ms_new) * inv_temp) + tl.sum(tl.exp((s - ms_new) * inv_temp), axis=0)
            m_s = ms_new
            mt_new = tl.maximum(m_t, bt)
            sum_tt = sum_tt * tl.exp((m_t - mt_new) * inv_temp) + tl.sum(tl.exp((t - mt_new) * inv_temp), axis=0)
            m_t = mt_new
        lse_s = m_s + tl.log(sum_s)
        lse_st = m_s * inv_temp + tl.log(sum_st)
        lse_tt = m_t * inv_temp + tl.log(sum_tt)
        ce = lse_s - tl.load(s_row + target).to(tl.float32)
        # Pass 2: the divergence and sum_k q_k g_k (what the reverse KL / JSD gradients subtract).
        div = 0.0
        qg_sum = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            d, qg, lq, lm, q, p = _divergence_terms(s, t, mask, lse_st, lse_tt, inv_temp, KIND)
            div += tl.sum(d, axis=0)
            qg_sum += tl.sum(qg, axis=0)
        tl.store(loss_ptr + row, alpha * ce + (1.0 - alpha) * temperature * temperature * div)
        tl.store(ce_ptr + row, ce)
        tl.store(div_ptr + row, div)
        tl.store(agree_ptr + row, tl.where(arg_s == arg_t, 1.0, 0.0))
        if WRITE_GRAD:
            # Pass 3: ds = alpha/n (softmax(s) - onehot) + (1 - alpha) T/n dD/du, written over s tile by tile.
            scale = tl.load(scale_ptr)
            c_ce = alpha * scale
            c_kd = (1.0 - alpha) * temperature * scale
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
                d, qg, lq, lm, q, p = _divergence_terms(s, t, mask, lse_st, lse_tt, inv_temp, KIND)
                if KIND == 0:
                    du = q - p
                elif KIND == 1:
                    du = q * (lq - lm - div)  # lm holds log p here
                else:
                    du = 0.5 * q * (lq - lm) - q * qg_sum
                soft = tl.where(mask, tl.exp(s - lse_s), 0.0)
                ds = c_ce * (soft - tl.where(cols == target, 1.0, 0.0)) + c_kd * du
                tl.store(s_row + cols, ds.to(s_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
        tl.store(div_ptr + row, 0.0)
        tl.store(agree_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(s_row + cols, tl.zeros([BLOCK_V], dtype=s_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------- launchers


# Columns per tile and warps: one configuration for every vocabulary (a masked tail; a vocabulary under 1024 ids
# wastes lanes but is a toy). 1024 fp32 columns over 256 threads is 4 per thread for each of the ~8 live tiles
# (s, t, log q, log p, q, p, log m, ds) of pass 3: no spills (4 warps spilled the JSD pass on sm_80).
BLOCK_V, NUM_WARPS = 1024, 8


def aot_cases() -> list[AotCase]:
    """The one tile per logits dtype and divergence, with and without the gradient pass."""
    f32, cases = torch.float32, []
    ptrs = {"targets_ptr": torch.int64, "loss_ptr": f32, "ce_ptr": f32, "div_ptr": f32, "agree_ptr": f32,
            "scale_ptr": f32}
    scalars = {"ignore_index": -100, "alpha": 0.5, "temperature": 2.0}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for kind in KINDS.values():
            for write_grad in (False, True):
                cases.append(AotCase(_distill_fwd_kernel, dict(KIND=kind, BLOCK_V=BLOCK_V, WRITE_GRAD=write_grad),
                                     NUM_WARPS, 3, dtype, DTYPE_NAMES[dtype], ptrs=ptrs, scalars=scalars))
    return cases


def distill_rows_torch(s: Tensor, t: Tensor, targets: Tensor, scale: Tensor, alpha: float, temperature: float,
                       kind: str, ignore_index: int, write_grad: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """What `_distill_fwd_kernel` computes for a chunk, in PyTorch (a pure function: torch.compile fuses it).

    s, t (C, V) logits, targets (C,), scale () = 1 / n. Returns per-row fp32 (loss_i, ce_i, D_i, agree_i), 0 on
    ignored rows, and ds (C, V) fp32 (zeros on ignored rows; None unless write_grad) by the module docstring's
    closed forms: ds = scale * (alpha * (softmax(s) - onehot(y)) + (1 - alpha) * T * dD/du)."""
    acc = torch.promote_types(s.dtype, torch.float32)
    keep = targets != ignore_index
    sf, tf = s.to(acc), t.to(acc)
    lse = torch.logsumexp(sf, -1)
    ce = (lse - sf.gather(-1, torch.where(keep, targets, 0)[:, None]).squeeze(-1)) * keep
    log_q, log_p = torch.log_softmax(sf / temperature, -1), torch.log_softmax(tf / temperature, -1)
    q = log_q.exp()
    if kind == "kl":
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
        g = q - log_p.exp() if write_grad else None
    elif kind == "reverse-kl":
        div = (q * (log_q - log_p)).sum(-1)
        g = q * (log_q - log_p - div[:, None]) if write_grad else None
    else:  # jsd
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        a = q * (log_q - log_m)
        half_kl_qm = 0.5 * a.sum(-1)
        div = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + half_kl_qm
        g = 0.5 * a - q * half_kl_qm[:, None] if write_grad else None
    div = div * keep
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * div
    agree = ((sf.argmax(-1) == tf.argmax(-1)) & keep).to(acc)
    ds = None
    if write_grad:
        p_s = torch.exp(sf - lse[:, None])
        ds = alpha * p_s + ((1.0 - alpha) * temperature) * g
        ds.scatter_add_(-1, torch.where(keep, targets, 0)[:, None], torch.full_like(ce, -alpha)[:, None])
        ds = ds * (keep * scale)[:, None]
    return loss, ce, div, agree, ds


_ROWS = {"torch": distill_rows_torch}


def _rows_fn(row_math: str):
    """The row function of a non-Triton row_math; "torch-compiled" is compiled on first use (one graph per chunk
    height: the full chunks and the last one)."""
    if row_math not in _ROWS:
        _ROWS[row_math] = torch.compile(distill_rows_torch, dynamic=False)
    return _ROWS[row_math]


def linear_distill_fwd(x: Tensor, weight: Tensor, teacher_x: Tensor, teacher_weight: Tensor, targets: Tensor,
                       alpha: float = 0.5, temperature: float = 1.0, kind: str = "kl", ignore_index: int = -100,
                       need_grad_x: bool = True, need_grad_w: bool = True, chunk: int | None = None,
                       row_math: str = "triton") -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(mean loss fp32 scalar, stats (3,) fp32 = mean [ce, divergence, top-1 agreement], grad_x, grad_W) for an
    upstream gradient of 1, chunk by chunk of `chunk` rows (default `chunk_rows`); each chunk's rows by the Triton
    kernel (row_math="triton") or by `distill_rows_torch` ("torch", the CPU route; "torch-compiled")."""
    if row_math not in ROW_MATH:
        raise ValueError(f"row_math must be one of {ROW_MATH}, got {row_math!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of: {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if x.dim() != 2 or weight.dim() != 2 or teacher_x.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(f"need x (N, d), weight (V, d), teacher_x (N, dt), teacher_weight (V, dt), got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(teacher_x.shape)}, "
                         f"{tuple(teacher_weight.shape)}")
    V, d = weight.shape
    if x.shape[1] != d or teacher_x.shape[1] != teacher_weight.shape[1]:
        raise ValueError(f"widths differ: x {tuple(x.shape)} vs weight {tuple(weight.shape)}, teacher_x "
                         f"{tuple(teacher_x.shape)} vs teacher_weight {tuple(teacher_weight.shape)}")
    if teacher_weight.shape[0] != V or teacher_x.shape[0] != x.shape[0]:
        raise ValueError(f"the teacher's vocabulary / rows ({teacher_weight.shape[0]}, {teacher_x.shape[0]}) must "
                         f"equal the student's ({V}, {x.shape[0]})")
    if x.dtype != weight.dtype or teacher_x.dtype != teacher_weight.dtype or not x.dtype.is_floating_point:
        raise ValueError(f"x / weight and teacher_x / teacher_weight must each share one float dtype, got {x.dtype}, "
                         f"{weight.dtype}, {teacher_x.dtype}, {teacher_weight.dtype}")
    if len({x.device, weight.device, teacher_x.device, teacher_weight.device, targets.device}) != 1:
        raise ValueError("x, weight, teacher_x, teacher_weight and targets must be on one device")
    _check_targets(targets, x.shape[0], V, ignore_index)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    t = targets.reshape(-1).long()
    N, dev = x.shape[0], x.device
    n = _count(t, ignore_index)
    scale = 1.0 / n
    rows = torch.empty((4, N), dtype=torch.float32, device=dev)  # loss, ce, divergence, agreement per row
    grad_x = torch.empty_like(x) if need_grad_x else None
    grad_w = torch.zeros((V, d), dtype=torch.float32, device=dev) if need_grad_w else None
    write_grad = need_grad_x or need_grad_w
    min_rows = MIN_CHUNK_ROWS if row_math == "triton" else TORCH_MIN_CHUNK_ROWS
    C = min(chunk or chunk_rows(N, max(d, teacher_x.shape[1]), V, min_rows), max(N, 1))
    s_buf = torch.empty((C, V), dtype=x.dtype, device=dev)  # student logits, then ds, reused by every chunk
    t_buf = torch.empty((C, V), dtype=teacher_x.dtype, device=dev)
    for r0 in range(0, N, C):
        r1 = min(r0 + C, N)
        xc, sc, tc = x[r0:r1], s_buf[: r1 - r0], t_buf[: r1 - r0]
        torch.mm(xc, weight.t(), out=sc)  # logits rounded to the input dtype, like the reference's matmul
        torch.mm(teacher_x[r0:r1], teacher_weight.t(), out=tc)
        if row_math != "triton":
            *per_row, ds = _rows_fn(row_math)(sc, tc, t[r0:r1], scale, alpha, temperature, kind, ignore_index,
                                             write_grad)
            for i, v in enumerate(per_row):
                rows[i, r0:r1] = v
            if ds is not None:
                sc.copy_(ds)
        else:
            _distill_fwd_kernel[(r1 - r0,)](sc, sc.stride(0), tc, tc.stride(0), t[r0:r1], rows[0, r0:r1],
                                            rows[1, r0:r1], rows[2, r0:r1], rows[3, r0:r1], scale, V, ignore_index,
                                            float(alpha), float(temperature), KIND=KINDS[kind], BLOCK_V=BLOCK_V,
                                            WRITE_GRAD=write_grad, num_warps=NUM_WARPS)
        if grad_x is not None:
            torch.mm(sc, weight, out=grad_x[r0:r1])  # sc now holds ds
        if grad_w is not None:
            _addmm_fp32_(grad_w, sc.t(), xc)
    del s_buf, t_buf
    if grad_w is not None and grad_w.dtype != x.dtype:
        grad_w = grad_w.to(x.dtype)
    sums = rows.sum(1) / n
    return sums[0], sums[1:], grad_x, grad_w


# ----------------------------------------------------------------------------- autograd


class LinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, teacher_x: Tensor, teacher_weight: Tensor, targets: Tensor,
                alpha: float, temperature: float, kind: str, ignore_index: int, need_grad_x: bool,
                need_grad_w: bool, chunk: int | None, row_math: str) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # the GEMMs run in the inputs' dtypes
            loss, stats, ctx.grad_x, ctx.grad_w = linear_distill_fwd(
                x, weight, teacher_x, teacher_weight, targets, alpha, temperature, kind, ignore_index,
                need_grad_x, need_grad_w, chunk, row_math)
        ctx.mark_non_differentiable(stats)
        ctx.used = False
        return loss, stats

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_stats: Tensor):
        if ctx.used:
            raise RuntimeError("linear_distill's gradients were precomputed in the forward and scaled in place; "
                               "it cannot be backpropagated twice (retain_graph)")
        ctx.used = True
        grad_x = ctx.grad_x.mul_(grad_out) if ctx.grad_x is not None else None
        grad_w = ctx.grad_w.mul_(grad_out) if ctx.grad_w is not None else None
        ctx.grad_x = ctx.grad_w = None
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public


def linear_distill(x: Tensor, weight: Tensor, teacher_x: Tensor, teacher_weight: Tensor, targets: Tensor,
                   alpha: float = 0.5, temperature: float = 1.0, kind: str = "kl", ignore_index: int = -100, *,
                   chunk: int | None = None, row_math: str = "triton") -> tuple[Tensor, Tensor]:
    """`linear_distill_ref` (kernels/reference.py) without materializing either (N, V) logits tensor.

    x (N, d), weight (V, d), teacher_x (N, dt), teacher_weight (V, dt), targets (N,). Returns (loss fp32 scalar,
    stats (3,) fp32 = [ce, divergence, top-1 agreement], no gradient). Only x and weight get gradients (the
    teacher is frozen). Under autocast all four are cast to the autocast dtype first, as the reference's matmuls.
    row_math="torch" runs each chunk's rows in PyTorch instead of the Triton kernel (any device; ops' CPU route),
    "torch-compiled" the same under torch.compile.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight, teacher_x, teacher_weight = x.to(dt), weight.to(dt), teacher_x.to(dt), teacher_weight.to(dt)
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and x.requires_grad, grad_on and weight.requires_grad
    return LinearDistillFunction.apply(x, weight, teacher_x, teacher_weight, targets, alpha, temperature, kind,
                                       ignore_index, need_x, need_w, chunk, row_math)
