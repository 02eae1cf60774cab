"""kernels/cross_entropy.py against kernels/reference.py: loss and every gradient.

fp32 is checked with the fp32 tolerance; fp16 / bf16 with the FlashAttention rule against an
fp32 reference (the reference run in the same low precision sets the error budget). The kernels
use no tl.dot (the GEMMs are torch matmuls), so bf16 runs on CPU through the interpreter too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule, requires_cuda

import kernels.cross_entropy as ce
from kernels.cross_entropy import chunk_rows, cross_entropy, linear_cross_entropy
from kernels.reference import (
    cross_entropy_dlogits_ref,
    cross_entropy_lse_ref,
    cross_entropy_ref,
    linear_cross_entropy_ref,
)

FP32 = pytest.param(torch.float32, id="fp32")
FP16 = pytest.param(torch.float16, id="fp16")
BF16 = pytest.param(torch.bfloat16, id="bf16")
DTYPES = [FP32, FP16, BF16]
Z_LOSS = [pytest.param(0.0, id="noz"), pytest.param(1e-3, id="z")]


def _targets(N: int, V: int, gen: torch.Generator, ignore_index: int = -100, frac_ignored: float = 0.25):
    """Random labels in [0, V) with about frac_ignored of the rows (never all, when N > 1) ignored."""
    t = torch.randint(0, V, (N,), generator=gen)
    if N > 1:
        drop = torch.rand(N, generator=gen) < frac_ignored
        drop[0] = True
        drop[-1] = False
        t[drop] = ignore_index
    return t.to(DEVICE)


def _upstream(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen)) * 1.5 + 0.25  # a scalar gradient != 1


def _run(fn, inputs: list[torch.Tensor], g: float, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, *args)
    (loss * g).backward()
    return loss.detach(), [t.grad for t in leaves]


def _compare(fn, ref, inputs: list[torch.Tensor], names: list[str], g: float, *args) -> None:
    """Loss and the grads of every input: fn in the inputs' dtype vs ref in fp32 (and ref in the
    same dtype as the low-precision baseline)."""
    dtype = inputs[0].dtype
    loss, grads = _run(fn, inputs, g, *args)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    hp_loss, hp_grads = _run(ref, [t.float() for t in inputs], g, *args)
    for gr, t in zip(grads, inputs):
        assert gr.dtype == t.dtype and gr.shape == t.shape
    if dtype == torch.float32:
        assert_close(loss, hp_loss, name="loss")
        for gr, hp, name in zip(grads, hp_grads, names):
            assert_close(gr, hp, name=f"grad_{name}")
        return
    lp_loss, lp_grads = _run(ref, inputs, g, *args)
    assert_fa_rule(loss, lp_loss, hp_loss, "loss")
    for gr, lp, hp, name in zip(grads, lp_grads, hp_grads, names):
        assert_fa_rule(gr, lp, hp, f"grad_{name}")


# ----------------------------------------------------------------------------- plain cross_entropy

PLAIN_SHAPES = [pytest.param(1, 1000, id="N1-V1000"), pytest.param(7, 4099, id="N7-V4099"),
                pytest.param(130, 1000, id="N130-V1000"), pytest.param(3, 32000, id="N3-V32000")]


@pytest.mark.parametrize("z_loss", Z_LOSS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V", PLAIN_SHAPES)
def test_cross_entropy(N: int, V: int, dtype: torch.dtype, z_loss: float) -> None:
    gen = torch.Generator().manual_seed(N * 7919 + V)
    logits = (torch.randn(N, V, generator=gen) * 4).to(DEVICE, dtype)
    t = _targets(N, V, gen)
    _compare(cross_entropy, cross_entropy_ref, [logits], ["logits"], _upstream(gen), t, -100, z_loss)


def test_cross_entropy_strided_rows_and_custom_ignore_index() -> None:
    """Rows with a stride wider than V (a slice of a bigger buffer) and ignore_index = a vocab id."""
    gen = torch.Generator().manual_seed(1)
    V = 4099
    wide = (torch.randn(9, 5000, generator=gen) * 3).to(DEVICE)
    t = torch.randint(0, V, (9,), generator=gen).to(DEVICE)
    t[[1, 4]] = 17
    leaf = wide.clone().requires_grad_()
    loss = cross_entropy(leaf[:, :V], t, 17, 2e-3)
    g = _upstream(gen)
    (loss * g).backward()
    ref_leaf = wide.clone().requires_grad_()
    ref = cross_entropy_ref(ref_leaf[:, :V], t, 17, 2e-3)
    (ref * g).backward()
    assert_close(loss, ref, name="loss")
    assert_close(leaf.grad, ref_leaf.grad, name="grad_logits")
    assert bool((leaf.grad[[1, 4]] == 0).all()) and bool((leaf.grad[:, V:] == 0).all())


# ----------------------------------------------------------------------------- fused linear + CE

FUSED_SHAPES = [
    pytest.param(1, 96, 1000, id="N1-d96-V1000"),
    pytest.param(7, 100, 4099, id="N7-d100-V4099"),
    pytest.param(7, 1, 1000, id="N7-d1-V1000"),
    pytest.param(130, 96, 1000, id="N130-d96-V1000"),
    pytest.param(130, 1, 4099, id="N130-d1-V4099"),
    pytest.param(5, 100, 32000, id="N5-d100-V32000"),
]


@pytest.mark.parametrize("z_loss", Z_LOSS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, d, V", FUSED_SHAPES)
def test_linear_cross_entropy(N: int, d: int, V: int, dtype: torch.dtype, z_loss: float) -> None:
    gen = torch.Generator().manual_seed(N * 31 + d * 7 + V)
    x = torch.randn(N, d, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(V, d, generator=gen) * (2.0 / d**0.5)).to(DEVICE, dtype)
    t = _targets(N, V, gen)
    # chunk=16 splits the 130-row cases into 9 chunks (last one partial); small cases stay one chunk.
    fused = lambda x_, w_, t_, ii, z: linear_cross_entropy(x_, w_, t_, ii, z, chunk=16)
    _compare(fused, linear_cross_entropy_ref, [x, w], ["x", "weight"], _upstream(gen), t, -100, z_loss)


def test_linear_cross_entropy_batched_rows_default_chunk() -> None:
    """x (B, T, d) with targets (B, T), default chunk size, through the public signature."""
    gen = torch.Generator().manual_seed(2)
    B, T, d, V = 2, 9, 100, 1000
    x = torch.randn(B, T, d, generator=gen).to(DEVICE)
    w = (torch.randn(V, d, generator=gen) * 0.2).to(DEVICE)
    t = _targets(B * T, V, gen).view(B, T)
    flat = lambda x_, w_, t_, ii, z: linear_cross_entropy_ref(x_.reshape(-1, d), w_, t_.reshape(-1), ii, z)
    _compare(linear_cross_entropy, flat, [x, w], ["x", "weight"], _upstream(gen), t, -100, 1e-3)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_forced_chunks_match_one_chunk(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small forced chunk really chunks (no GEMM output has more rows than the chunk) and gives
    the one-chunk answer."""
    gen = torch.Generator().manual_seed(3)
    N, d, V, C = 130, 96, 1000, 16
    x = torch.randn(N, d, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(V, d, generator=gen) * 0.2).to(DEVICE, dtype)
    t = _targets(N, V, gen)
    g = _upstream(gen)
    assert chunk_rows(N, d, V) == N  # the default is a single chunk at this size
    one_loss, one_grads = _run(lambda a, b: linear_cross_entropy(a, b, t), [x, w], g)

    logits_rows = []
    real_mm = torch.mm

    def spy_mm(a, b, *, out=None):
        if out is not None and out.shape[-1] == V:
            logits_rows.append(out.shape[0])
        return real_mm(a, b, out=out) if out is not None else real_mm(a, b)

    monkeypatch.setattr(torch, "mm", spy_mm)
    loss, grads = _run(lambda a, b: linear_cross_entropy(a, b, t, chunk=C), [x, w], g)
    monkeypatch.undo()
    assert logits_rows == [C] * (N // C) + [N % C]
    assert_close(loss, one_loss, dtype=torch.float32, name="loss")
    for gr, ref, name in zip(grads, one_grads, ["x", "weight"]):
        # fp16: grad_x rows are identical GEMMs; grad_W sums 9 fp32 partials instead of one GEMM.
        assert_close(gr, ref, name=f"grad_{name}")


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_grad_weight_fallback_slices(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 grad_W accumulation without torch's fp32-output addmm, in slices of 37 vocab rows
    (on CUDA the probe may pick the one-GEMM path, so force the fallback)."""
    monkeypatch.setattr(ce, "FALLBACK_SLICE_ELEMS", 37 * 96)
    monkeypatch.setitem(ce._FP32_ADDMM_OK, (DEVICE, dtype), False)
    test_linear_cross_entropy(130, 96, 1000, dtype, 1e-3)


def test_chunk_rows_rule() -> None:
    assert chunk_rows(16384, 4096, 128256) == 1024  # the floor: Liger's rule would give 512
    assert chunk_rows(16384, 4096, 32000) == 2048  # chunk logits the size of x
    assert chunk_rows(65536, 4096, 32000) == 8192
    assert chunk_rows(5000, 4096, 128256) == 1024  # 5 even chunks of 1000 rows, rounded to 128
    assert chunk_rows(300, 4096, 128256) == 300  # never more than N
    assert chunk_rows(1, 1, 1000) == 1


# ----------------------------------------------------------------------------- ignore / labels / modes


@pytest.mark.parametrize("op", ["plain", "fused"])
def test_all_targets_ignored(op: str) -> None:
    gen = torch.Generator().manual_seed(4)
    N, d, V = 6, 24, 1000
    t = torch.full((N,), -100, device=DEVICE)
    if op == "plain":
        z = torch.randn(N, V, generator=gen).to(DEVICE).requires_grad_()
        loss = cross_entropy(z, t, -100, 1e-3)
        leaves = [z]
    else:
        x = torch.randn(N, d, generator=gen).to(DEVICE).requires_grad_()
        w = torch.randn(V, d, generator=gen).to(DEVICE).requires_grad_()
        loss = linear_cross_entropy(x, w, t, -100, 1e-3)
        leaves = [x, w]
    (loss * _upstream(gen)).backward()
    assert loss.item() == 0.0
    for leaf in leaves:
        assert leaf.grad is not None and bool((leaf.grad == 0).all())


@pytest.mark.parametrize("bad", [pytest.param(1000, id="V"), pytest.param(5000, id="beyond"),
                                 pytest.param(-1, id="negative")])
def test_labels_outside_vocab_raise(bad: int) -> None:
    gen = torch.Generator().manual_seed(5)
    N, d, V = 4, 8, 1000
    t = torch.tensor([3, bad, -100, 7], device=DEVICE)
    z = torch.randn(N, V, generator=gen).to(DEVICE)
    x = torch.randn(N, d, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(V, d, generator=gen).to(DEVICE).requires_grad_()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy(z, t)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(x, w, t)


def test_bad_shapes_and_dtypes_raise() -> None:
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(100, 8, device=DEVICE)
    t = torch.randint(0, 100, (4,), device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(x, w.half(), t)
    with pytest.raises(ValueError, match="width"):
        linear_cross_entropy(x, w[:, :7], t)
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(x @ w.t(), t.float())
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(x, w, t, chunk=0)


def test_partial_grad_and_no_grad() -> None:
    """Frozen weight: only grad_x; under no_grad: the loss alone, same value."""
    gen = torch.Generator().manual_seed(6)
    N, d, V = 7, 96, 4099
    x = torch.randn(N, d, generator=gen).to(DEVICE)
    w = (torch.randn(V, d, generator=gen) * 0.2).to(DEVICE)
    t = _targets(N, V, gen)
    g = _upstream(gen)
    xk = x.clone().requires_grad_()
    (linear_cross_entropy(xk, w, t) * g).backward()
    xr = x.clone().requires_grad_()
    (linear_cross_entropy_ref(xr, w, t) * g).backward()
    assert_close(xk.grad, xr.grad, name="grad_x")
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), w, t)
    assert not loss.requires_grad
    assert_close(loss, linear_cross_entropy_ref(x, w, t), name="loss")


def test_autocast_matches_reference() -> None:
    """fp32 x and weight under bf16 autocast (the trainer's setup): the GEMMs run in bf16 like the
    reference's, the grads come back in fp32."""
    gen = torch.Generator().manual_seed(9)
    N, d, V = 7, 96, 1000
    x = torch.randn(N, d, generator=gen).to(DEVICE)
    w = (torch.randn(V, d, generator=gen) * 0.2).to(DEVICE)
    t = _targets(N, V, gen)
    g = _upstream(gen)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(*args)
        return run

    loss, grads = _run(under_autocast(linear_cross_entropy), [x, w], g, t)
    lp_loss, lp_grads = _run(under_autocast(linear_cross_entropy_ref), [x, w], g, t)
    hp_loss, hp_grads = _run(linear_cross_entropy_ref, [x, w], g, t)
    assert lp_loss.item() != hp_loss.item()  # the reference really ran its matmul in bf16
    assert_fa_rule(loss, lp_loss, hp_loss, "loss")
    for gr, lp, hp, name in zip(grads, lp_grads, hp_grads, ["x", "weight"]):
        assert gr.dtype == torch.float32
        assert_fa_rule(gr, lp, hp, f"grad_{name}")


def test_second_backward_raises() -> None:
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 8, device=DEVICE)
    loss = linear_cross_entropy(x, w, torch.tensor([1, 2, 3], device=DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# ----------------------------------------------------------------------------- CUDA, real sizes


@requires_cuda
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("N, d, V, chunk", [pytest.param(2051, 256, 32000, None, id="N2051-d256-V32000"),
                                            pytest.param(700, 128, 128256, 128, id="N700-d128-V128256-c128")])
def test_linear_cross_entropy_cuda(N: int, d: int, V: int, chunk: int | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, d, generator=gen).to("cuda", dtype)
    w = (torch.randn(V, d, generator=gen) * (2.0 / d**0.5)).to("cuda", dtype)
    t = _targets(N, V, gen)
    fused = lambda x_, w_, t_, ii, z: linear_cross_entropy(x_, w_, t_, ii, z, chunk=chunk)
    _compare(fused, linear_cross_entropy_ref, [x, w], ["x", "weight"], _upstream(gen), t, -100, 1e-4)


@requires_cuda
def test_cross_entropy_cuda_bf16_large_vocab() -> None:
    gen = torch.Generator().manual_seed(8)
    N, V = 257, 128256
    logits = (torch.randn(N, V, generator=gen) * 4).to("cuda", torch.bfloat16)
    t = _targets(N, V, gen)
    _compare(cross_entropy, cross_entropy_ref, [logits], ["logits"], _upstream(gen), t, -100, 1e-4)



# ----------------------------------------------------------------------------- a vocabulary slice's row ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V", [(1, 17), (9, 300), (6, 5000)])
def test_lse_and_dlogits_of_a_vocabulary_slice(N: int, V: int, dtype: torch.dtype) -> None:
    """The vocabulary-parallel loss's row ops (llm/vocab_parallel.py): per-row lse of a slice, and dz for a given
    (global) lse where some kept rows' labels lie in another slice (-1: no one-hot term), written in place."""
    gen = torch.Generator().manual_seed(N * V)
    logits = (torch.randn(N, V, generator=gen) * 3).to(DEVICE, dtype)
    t = _targets(N, V, gen)
    t[(torch.arange(N, device=DEVICE) % 3 == 1) & (t != -100)] = -1  # a label in another rank's slice
    lse, want = ce.cross_entropy_lse(logits, t), cross_entropy_lse_ref(logits, t)
    assert lse.dtype == torch.float32 and bool((lse[t == -100] == 0).all())
    assert_close(lse, want, dtype=torch.float32, name="lse")
    wide = want + torch.rand(N, generator=gen).to(DEVICE)  # the whole vocabulary's lse is larger than a slice's
    buf = logits.clone()
    dz = ce.cross_entropy_dlogits(buf, t, wide, 0.37, -100, 1e-3, out=buf)
    assert dz.data_ptr() == buf.data_ptr() and dz.dtype == dtype
    assert_close(dz, cross_entropy_dlogits_ref(logits, t, wide, 0.37, -100, 1e-3), name="dz")
