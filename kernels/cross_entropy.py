"""Cross-entropy in Triton: a row-wise op over (N, V) logits and a fused LM-head + loss.

loss = sum_i keep_i * (lse_i - z_{i, t_i} + z_loss * lse_i^2) / n,  n = max(1, sum_i keep_i),
keep_i = (t_i != ignore_index),  lse_i = logsumexp_j z_ij.

Gradient of the logits (what the kernels write):
  dz_ij = keep_i * (softmax_ij * (1 + 2 * z_loss * lse_i) - [j == t_i]) * g / n

`cross_entropy(logits, targets)` is the plain op: the forward kernel streams each row once
(online max / sum-of-exp) and saves lse; the backward kernel re-reads the row and writes dz.

`linear_cross_entropy(x, weight, targets)` never holds the (N, V) logits. Rows are processed in
chunks: logits_c = x_c @ W^T (a torch GEMM into one reused buffer), then the same forward kernel
computes lse / loss and, in a second pass over the row, overwrites the logits with dz in place;
grad_x_c = dz_c @ W and grad_W += dz_c^T @ x_c follow as GEMMs. The gradients are therefore
computed during the forward (with g = 1) and backward only scales them by the incoming scalar.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import DTYPE_NAMES, AotCase, pow2_range

# Fewest rows per chunk of the fused op. The chunk's grad_W update (dz_c^T @ x_c) reads and
# writes the whole (V, d) fp32 accumulator, 8*V*d bytes for 2*V*d*rows FLOPs; below ~1k rows
# that GEMM is memory-bound on an H100 (ridge ~250 FLOP/byte) and the weight is re-read too often.
MIN_CHUNK_ROWS = 1024


@triton.jit
def _write_row_grad(src_ptr, dst_ptr, target, lse, coef, scale, V, BLOCK_V: tl.constexpr):
    # src_ptr: start of one row of logits; dst_ptr: start of the row of dz (may equal src_ptr,
    #   each block is read before it is overwritten); target: the row's label (int64);
    # lse: the row's log-sum-exp (fp32); coef: 1 + 2 * z_loss * lse, the softmax factor;
    # scale: g / n; V: row length; BLOCK_V: columns per step (power of two, masked tail).
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(src_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        dz = (p * coef - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(dst_ptr + cols, dz.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_row(dst_ptr, V, BLOCK_V: tl.constexpr):
    # dst_ptr: start of a row of dz for an ignored target; V: row length; BLOCK_V: columns per step.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(dst_ptr + cols, tl.zeros([BLOCK_V], dtype=dst_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (N, V) logits, any float dtype; overwritten with dz when WRITE_GRAD
    stride_row,  # elements between rows of logits (columns are contiguous)
    targets_ptr,  # (N,) int64 labels
    loss_ptr,  # (N,) fp32 out: per-row nll + z_loss * lse^2 (0 for ignored rows), summed on the host
    lse_ptr,  # (N,) fp32 out: per-row log-sum-exp (0 for ignored rows), saved for the backward
    scale_ptr,  # () fp32: g / n, the factor dz is written with (read only when WRITE_GRAD)
    V,  # vocabulary size: row length, any value (non-power-of-two tails are masked)
    ignore_index,  # label value whose row contributes nothing
    z_loss,  # weight of the lse^2 term
    BLOCK_V: tl.constexpr,  # columns per step; rows are streamed so V is not bounded by registers
    WRITE_GRAD: tl.constexpr,  # second pass writing dz in place (fused op) or not (plain op)
):
    # int64 row offsets: N * V passes 2^31 for a 16k x 128k batch of logits.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target != ignore_index:
        # Online log-sum-exp in one read: a running max m and the sum s of exp(z - m), rescaled
        # whenever the max grows, so no exp ever overflows and the row is read once.
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_t = tl.load(row_ptr + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_t + z_loss * lse * lse)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            _write_row_grad(row_ptr, row_ptr, target, lse, 1.0 + 2.0 * z_loss * lse, scale, V, BLOCK_V)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(row_ptr, V, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,  # (N, V) logits from the forward (read only)
    stride_row,  # elements between rows of logits
    dlogits_ptr,  # (N, V) out: dz, contiguous, in the logits' dtype
    targets_ptr,  # (N,) int64 labels
    lse_ptr,  # (N,) fp32 log-sum-exp saved by the forward
    scale_ptr,  # () fp32: grad_output / n, read on the device so the host never syncs
    V,  # vocabulary size
    ignore_index,  # label value whose row gets a zero gradient
    z_loss,  # weight of the lse^2 term
    BLOCK_V: tl.constexpr,  # columns per step
):
    row = tl.program_id(0).to(tl.int64)
    dst_ptr = dlogits_ptr + row * V
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target != ignore_index:
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr)
        _write_row_grad(logits_ptr + row * stride_row, dst_ptr, target, lse, 1.0 + 2.0 * z_loss * lse,
                        scale, V, BLOCK_V)
    else:
        _zero_row(dst_ptr, V, BLOCK_V)


# ----------------------------------------------------------------------------- launchers


def _block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096 columns per step (16 per thread at 8 warps) keeps the row
    streaming with wide loads without spilling; short rows use one masked block."""
    block = max(16, min(triton.next_power_of_2(V), 4096))
    return block, 8 if block >= 2048 else 4


def aot_cases() -> list[AotCase]:
    """Every `_block_v` step for any vocabulary, per logits dtype, for `python -m kernels.aot`."""
    f32, cases = torch.float32, []
    ptrs = {"targets_ptr": torch.int64, "loss_ptr": f32, "lse_ptr": f32, "scale_ptr": f32}
    scalars = {"ignore_index": -100, "z_loss": 1e-4}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for v in pow2_range(16, 4096):
            block, warps = _block_v(v)
            for write_grad in (False, True):
                cases.append(AotCase(_cross_entropy_fwd_kernel, dict(BLOCK_V=block, WRITE_GRAD=write_grad), warps, 3,
                                     dtype, DTYPE_NAMES[dtype], ptrs=ptrs, scalars=scalars))
            cases.append(AotCase(_cross_entropy_bwd_kernel, dict(BLOCK_V=block), warps, 3, dtype, DTYPE_NAMES[dtype],
                                 ptrs=ptrs, scalars=scalars))
    return cases


def _check_targets(targets: Tensor, n_rows: int, vocab: int, ignore_index: int) -> None:
    """Integer labels, one per row, each in [0, vocab) or ignore_index (the reference's contract; the
    range check reads the labels on the host once per call, as the reference does)."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.numel() != n_rows:
        raise ValueError(f"targets has {targets.numel()} labels for {n_rows} rows")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        v = int(targets[bad][0])
        raise ValueError(f"label {v} is outside the vocabulary [0, {vocab}) (ignore_index={ignore_index})")


def _launch_rows(logits: Tensor, targets: Tensor, loss_rows: Tensor, lse: Tensor, scale: Tensor,
                 ignore_index: int, z_loss: float, write_grad: bool) -> None:
    """Run the forward kernel over the rows of a 2-D logits view (columns contiguous)."""
    n, V = logits.shape
    if n == 0:
        return
    block, warps = _block_v(V)
    _cross_entropy_fwd_kernel[(n,)](logits, logits.stride(0), targets, loss_rows, lse, scale, V,
                                    ignore_index, float(z_loss), BLOCK_V=block, WRITE_GRAD=write_grad,
                                    num_warps=warps)


def _count(targets: Tensor, ignore_index: int) -> Tensor:
    """n = max(1, number of kept labels), an fp32 device scalar (no host sync)."""
    return (targets != ignore_index).sum().clamp_min(1).float()


def cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                      z_loss: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss (fp32 scalar), per-row lse (N,) fp32 and the kept-row count n (fp32 scalar)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    _check_targets(targets, logits.shape[0], logits.shape[1], ignore_index)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = targets.reshape(-1).long()
    N = logits.shape[0]
    loss_rows = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss_rows)
    n = _count(targets, ignore_index)
    _launch_rows(logits, targets, loss_rows, lse, n, ignore_index, z_loss, write_grad=False)
    return loss_rows.sum() / n, lse, n


def cross_entropy_bwd(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, ignore_index: int = -100,
                      z_loss: float = 0.0, out: Tensor | None = None) -> Tensor:
    """dlogits (N, V) in the logits' dtype for an upstream gradient folded into scale = g / n; `out`: write it
    there (may be `logits` itself, contiguous: each block is read before it is overwritten). A target outside
    [0, V) other than ignore_index gets no one-hot term (a vocabulary slice: `cross_entropy_dlogits`)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if out is None else out
    if dlogits.shape != (N, V) or dlogits.stride() != (V, 1) or dlogits.dtype != logits.dtype:
        raise ValueError(f"out must be a contiguous {N} x {V} {logits.dtype} tensor")
    if N == 0:
        return dlogits
    block, warps = _block_v(V)
    _cross_entropy_bwd_kernel[(N,)](logits, logits.stride(0), dlogits, targets.reshape(-1).long(), lse,
                                    scale.float().reshape(()), V, ignore_index, float(z_loss),
                                    BLOCK_V=block, num_warps=warps)
    return dlogits


def cross_entropy_lse(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-row log-sum-exp (N,) fp32 of logits (N, V) (0 where the target is ignore_index): the forward kernel's
    online max / sum-of-exp, the same pass the loss uses. Targets only mark rows (a vocabulary slice's rows keep
    their label elsewhere): any label other than ignore_index computes the row."""
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float (N, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows = torch.where(targets.reshape(-1) == ignore_index, ignore_index, 0).long()  # z_t read in range, unused
    N = logits.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    scratch = torch.empty_like(lse)
    _launch_rows(logits, rows, scratch, lse, scratch, ignore_index, 0.0, write_grad=False)
    return lse


def cross_entropy_dlogits(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor | float,
                          ignore_index: int = -100, z_loss: float = 0.0, out: Tensor | None = None) -> Tensor:
    """kernels/reference.py `cross_entropy_dlogits_ref` (dz for a given lse, one-hot only for targets in [0, V)),
    through the backward kernel; `out` may be `logits` (in place)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=logits.device)
    return cross_entropy_bwd(logits, targets, lse.float().contiguous(), scale, ignore_index, z_loss, out)


def chunk_rows(n_rows: int, d: int, vocab: int, min_rows: int = MIN_CHUNK_ROWS) -> int:
    """Rows per chunk of the fused op.

    Liger's rule sizes a chunk's logits (rows x V) like x itself (n_rows x d), so the loss adds
    about one activation's worth of memory. We take that, but never fewer than `min_rows` rows
    (MIN_CHUNK_ROWS for the GPU kernels): each chunk re-reads W twice and reads + writes the
    (V, d) fp32 grad_W accumulator once, and with fewer rows those GEMMs stop being compute-bound.
    The rows are then spread evenly over the chunks (no small tail chunk) and rounded up to a multiple of 128 (whole
    GEMM tiles). At d=4096 and 16k tokens: V=128256 gives 1024 rows (263 MB of bf16 logits,
    where the full logits would be 4.2 GB), V=32000 gives 2048 rows (131 MB, the size of x).
    """
    target = max(min_rows, -(-n_rows * d // vocab))
    n_chunks = max(1, -(-n_rows // target))
    rows = -(-n_rows // n_chunks)
    return max(1, min(n_rows, -(-rows // 128) * 128))


# Elements of the low-precision temporary in _addmm_fp32_'s fallback (64M: 128 MiB of bf16).
FALLBACK_SLICE_ELEMS = 1 << 26

# Whether torch.addmm(fp32 acc, bf16/fp16 a, b, out_dtype=fp32) works on a device type:
# CUDA in recent torch releases; older releases reject an fp32 `self`. Filled on first use.
_FP32_ADDMM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc fp32: the sum over chunks stays in fp32 whatever a and b are."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (a.device.type, a.dtype)
    if a.is_cuda and _FP32_ADDMM_OK.get(key, True):
        try:
            # One GEMM whose epilogue adds the fp32 accumulator (no (V, d) temporary).
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_ADDMM_OK[key] = True
            return
        except (RuntimeError, TypeError):
            _FP32_ADDMM_OK[key] = False
    # Fallback: the chunk's product rounds once to a's dtype, the running sum stays fp32. Done in
    # slices of a's rows so the low-precision temporary stays small instead of (V, d).
    step = max(1, FALLBACK_SLICE_ELEMS // max(1, b.shape[1]))
    for r0 in range(0, a.shape[0], step):
        acc[r0:r0 + step].add_(a[r0:r0 + step] @ b)


def linear_cross_entropy_fwd(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                             z_loss: float = 0.0, need_grad_x: bool = True, need_grad_w: bool = True,
                             chunk: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mean loss (fp32 scalar) and, when asked, grad_x (x.shape, x.dtype) and grad_W (V, d,
    W.dtype) for an upstream gradient of 1, computed chunk by chunk of `chunk` rows
    (default `chunk_rows`); the (N, V) logits are never materialized."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"need x (..., d) and weight (V, d), got {tuple(x.shape)} and {tuple(weight.shape)}")
    V, d = weight.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has width {x.shape[-1]} but weight is {tuple(weight.shape)} (V, d)")
    if x.dtype != weight.dtype or not x.dtype.is_floating_point:
        raise ValueError(f"x and weight must share one float dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device or x.device != targets.device:
        raise ValueError(f"x, weight and targets must be on one device, got {x.device}, {weight.device}, "
                         f"{targets.device}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match x rows {tuple(x.shape[:-1])}")
    _check_targets(targets, targets.numel(), V, ignore_index)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")

    x2 = x.reshape(-1, d)
    t = targets.reshape(-1).long()
    N = x2.shape[0]
    dev, dt = x.device, x.dtype
    n = _count(t, ignore_index)
    scale = 1.0 / n  # dz for g = 1; backward multiplies the results by g
    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty_like(loss_rows)
    grad_x = torch.empty((N, d), dtype=dt, device=dev) if need_grad_x else None
    grad_w = torch.zeros((V, d), dtype=torch.float32, device=dev) if need_grad_w else None
    write_grad = need_grad_x or need_grad_w
    C = min(chunk or chunk_rows(N, d, V), max(N, 1))
    buf = torch.empty((C, V), dtype=dt, device=dev)  # one logits/dz buffer reused by every chunk
    for r0 in range(0, N, C):
        r1 = min(r0 + C, N)
        xc, zc = x2[r0:r1], buf[: r1 - r0]
        torch.mm(xc, weight.t(), out=zc)  # logits, rounded to the input dtype like the reference
        _launch_rows(zc, t[r0:r1], loss_rows[r0:r1], lse[r0:r1], scale, ignore_index, z_loss, write_grad)
        if grad_x is not None:
            torch.mm(zc, weight, out=grad_x[r0:r1])  # zc now holds dz
        if grad_w is not None:
            _addmm_fp32_(grad_w, zc.t(), xc)
    del buf
    if grad_w is not None and grad_w.dtype != dt:
        grad_w = grad_w.to(dt)
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    return loss_rows.sum() / n, grad_x, grad_w


# ----------------------------------------------------------------------------- autograd


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float) -> Tensor:
        loss, lse, n = cross_entropy_fwd(logits, targets, ignore_index, z_loss)
        ctx.save_for_backward(logits, targets, lse, n)
        ctx.ignore_index, ctx.z_loss = ignore_index, z_loss
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse, n = ctx.saved_tensors
        dlogits = cross_entropy_bwd(logits, targets, lse, grad_out.float() / n, ctx.ignore_index, ctx.z_loss)
        return dlogits, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, z_loss: float,
                need_grad_x: bool, need_grad_w: bool, chunk: int | None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the GEMMs run in the inputs' dtype
            loss, ctx.grad_x, ctx.grad_w = linear_cross_entropy_fwd(x, weight, targets, ignore_index, z_loss,
                                                                    need_grad_x, need_grad_w, chunk)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy's gradients were precomputed in the forward and scaled "
                               "in place; it cannot be backpropagated twice (retain_graph)")
        ctx.used = True
        # Scale in place: no second (V, d) buffer; the precomputed grads are only handed out once.
        grad_x = ctx.grad_x.mul_(grad_out) if ctx.grad_x is not None else None
        grad_w = ctx.grad_w.mul_(grad_out) if ctx.grad_w is not None else None
        ctx.grad_x = ctx.grad_w = None
        return grad_x, grad_w, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, z_loss: float = 0.0) -> Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,) over targets != ignore_index,
    plus z_loss * mean(lse^2). Returns an fp32 scalar; V may be any size."""
    return CrossEntropyFunction.apply(logits, targets, ignore_index, z_loss)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0, *, chunk: int | None = None) -> Tensor:
    """cross_entropy(x @ weight.T, targets) without materializing the logits.

    x (..., d), weight (V, d), targets (...) int. Returns an fp32 scalar. Gradients are
    computed during the forward when grad mode is on and x / weight require them; `chunk`
    forces the rows per chunk (default: `chunk_rows`). Under autocast x and weight are cast to
    the autocast dtype first, as the reference's matmul would be.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Match the reference under autocast, where x @ weight.T runs in the autocast dtype; the
        # casts sit outside the Function, so their backward returns grads in the original dtypes.
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and x.requires_grad, grad_on and weight.requires_grad
    return LinearCrossEntropyFunction.apply(x, weight, targets, ignore_index, z_loss, need_x, need_w, chunk)
