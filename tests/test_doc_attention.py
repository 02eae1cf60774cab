"""Document-masked attention (packed rows): kernels/attention.py's `doc_attention` against
`kernels.reference.doc_attention_ref`, forward and every gradient, and the key tiles it skips.

Awkward documents on purpose: length-1 documents, one document spanning the whole row, documents cut at
every tile edge, GQA and MQA, sliding windows, batch rows with different packings, fp32 (1e-5) and fp16 (the
FlashAttention rule against a low-precision baseline with the same mask). The tile test counts the tl.dot
calls the interpreter executes: each visited (query tile, key tile) pair costs a fixed number of dots, so the
count is the work done; it must equal the number of tile pairs the block-diagonal mask touches.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule, skip_fp32_kernel_on_cuda

from kernels import attention as attn_mod
from kernels.attention import attention, doc_attention
from kernels.reference import attention_ref, doc_attention_ref, doc_runs_ref

FP32, FP16 = torch.float32, torch.float16


def segments_of(lengths: list[list[int]]) -> torch.Tensor:
    """(B, T) segment ids: row b packs documents of lengths[b] (ids count up from 0)."""
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


def _mask(segments: torch.Tensor, window: int | None) -> torch.Tensor:
    runs = doc_runs_ref(segments)
    T = segments.shape[1]
    pos = torch.arange(T)
    m = (runs[:, :, None] == runs[:, None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        m &= (pos[:, None] - pos[None, :]) < window
    return m  # (B, T, T)


def _doc_lowp(q, k, v, segments, window=None):
    """doc_attention_ref's semantics in q's dtype: QK^T and PV in that dtype, softmax in fp32."""
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    s = (qt @ kt.transpose(-1, -2)) * D ** -0.5
    p = torch.softmax(s.float().masked_fill(~_mask(segments, window)[:, None].to(s.device), -1e30), dim=-1)
    return (p.to(q.dtype) @ vt).transpose(1, 2)


def _run(fn, q, k, v, do, *args, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, *args, **kw)
    return [out, *torch.autograd.grad(out, leaves, do)]


# (lengths per row, H, Hkv, D, window, dtype)
CASES = [
    pytest.param([[1, 5, 30, 1, 3]], 2, 1, 32, None, FP32, id="len1-docs-mqa"),
    pytest.param([[57], [57]], 4, 2, 64, None, FP16, id="one-doc-spans-the-row-fp16-b2"),
    pytest.param([[16, 32, 1, 15, 16], [1] * 20 + [60]], 4, 1, 32, None, FP32, id="tile-edges-gqa4-b2"),
    pytest.param([[20, 1, 1, 33, 15]], 2, 2, 16, 9, FP32, id="window9"),
    pytest.param([[3, 40, 2, 26]], 8, 2, 80, 17, FP16, id="window-gqa-d80-fp16"),
]


@pytest.mark.parametrize("lengths, H, Hkv, D, window, dtype", CASES)
def test_doc_attention_matches_reference(lengths, H, Hkv, D, window, dtype):
    skip_fp32_kernel_on_cuda(dtype)
    seg = segments_of(lengths).to(DEVICE)
    B, T = seg.shape
    gen = torch.Generator().manual_seed(T * 7 + D)
    q, k, v, do = (torch.randn(B, T, h, D, generator=gen).to(DEVICE, dtype) for h in (H, Hkv, Hkv, H))
    got = _run(doc_attention, q, k, v, do, seg, window=window)
    hp = _run(doc_attention_ref, *(x.float() for x in (q, k, v, do)), seg, window=window)
    lp = _run(_doc_lowp, q, k, v, do, seg, window=window) if dtype != FP32 else None
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert got[i].dtype == dtype and got[i].shape == hp[i].shape
        if lp is None:
            assert_close(got[i], hp[i], name=name)
        else:
            assert_fa_rule(got[i], lp[i], hp[i], name=name)


def test_reference_equals_per_document_attention_and_one_document_is_plain_causal():
    seg = segments_of([[4, 1, 11], [16]])
    q, k, v = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 1, 8), torch.randn(2, 16, 1, 8)
    o = doc_attention_ref(q, k, v, seg)
    s = 0
    for n in (4, 1, 11):  # each document alone, as its own sequence
        assert_close(o[:1, s:s + n], attention_ref(q[:1, s:s + n], k[:1, s:s + n], v[:1, s:s + n]))
        s += n
    assert_close(o[1:], attention_ref(q[1:], k[1:], v[1:]))
    # Equal ids in separate runs are separate documents (the kernels see runs, not id values).
    reused = torch.tensor([[0] * 4 + [1] + [0] * 11] * 2)
    assert_close(doc_attention_ref(q, k, v, reused), doc_attention_ref(q, k, v, segments_of([[4, 1, 11]] * 2)))


def test_bad_document_masks_raise():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"S == T"):
        doc_attention_ref(q, torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="causal"):
        doc_attention_ref(q, q, q, torch.zeros(1, 8), causal=False)
    with pytest.raises(ValueError, match=r"segments \(B, T\)"):
        doc_attention(q.to(DEVICE), q.to(DEVICE), q.to(DEVICE), torch.zeros(1, 7, device=DEVICE))


def _touched_pairs(mask: torch.Tensor, bm: int, bn: int) -> int:
    """(row tile, column tile) pairs of a (B, T, T) mask holding any visible entry, summed over rows b."""
    B, T, _ = mask.shape
    n = 0
    for i in range(0, T, bm):
        for j in range(0, T, bn):
            n += int(mask[:, i:i + bm, j:j + bn].flatten(1).any(1).sum())
    return n


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's tl.dot calls")
def test_skipped_tiles_follow_the_block_diagonal(monkeypatch):
    interp = pytest.importorskip("triton.runtime.interpreter")
    calls = {"n": 0}
    real = interp.InterpreterBuilder.create_dot

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", counting)
    T, H, D = 192, 1, 16
    bm, bn = attn_mod._INTERP_TILES["fwd"]
    dbm, dbn = attn_mod._INTERP_TILES["dkdv"]
    x = [torch.randn(1, T, H, D, requires_grad=True) for _ in range(3)]
    causal = torch.ones(1, T, T, dtype=torch.bool).tril()
    counts = {}
    for name, lengths in [("causal", None), ("T/2", [96, 96]), ("T/8", [24] * 8), ("mixed", [1, 70, 1, 1, 50, 69])]:
        seg = None if lengths is None else segments_of([lengths])
        calls["n"] = 0
        o = attention(*x) if seg is None else doc_attention(*x, seg)
        fwd = calls["n"]
        calls["n"] = 0
        o.backward(torch.randn_like(o))
        bwd = calls["n"]
        mask = causal if seg is None else _mask(seg, None)
        # forward: 2 dots per visited tile; backward: 4 per (key block, query block) in dK/dV, 3 per tile in dQ
        assert fwd == 2 * H * _touched_pairs(mask, bm, bn), name
        assert bwd == 4 * H * _touched_pairs(mask, dbm, dbn) + 3 * H * _touched_pairs(mask, bm, bn), name
        counts[name] = (fwd, float(mask.sum()) / float(causal.sum()))
    for name in ("T/2", "T/8"):  # work falls with the visible fraction (tile edges add a little)
        work, visible = counts[name][0] / counts["causal"][0], counts[name][1]
        assert visible <= work <= visible + 2 * bm / T, (name, work, visible)
