"""The paged decode kernel (kernels/paged_decode.py) equals its reference, and the paged KV cache
(llm/paged_cache.py) gives the model the logits of the contiguous cache: blocks out of order and
scattered over the pool, ragged lengths, GQA, head dims 80/96, windows, several key splits."""

import pytest
import torch
from conftest import DEVICE, assert_close, assert_fa_rule

from kernels.reference import kv_attention_ref, paged_decode_attention_ref
from llm.config import ModelConfig
from llm.model import Transformer
from llm.paged_cache import BlockPool, PagedKVCache, PoolExhausted

pytest.importorskip("triton")


def scattered(B: int, lengths: list[int], page: int, n_blocks: int, Hkv: int, D: int, dtype):
    """A pool of random K/V and block tables whose blocks are a random permutation (never in order)."""
    k_pool = torch.randn(n_blocks, page, Hkv, D, device=DEVICE, dtype=dtype)
    v_pool = torch.randn(n_blocks, page, Hkv, D, device=DEVICE, dtype=dtype)
    need = [-(-n // page) for n in lengths]
    perm = torch.randperm(n_blocks).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(perm[i:i + n])
        i += n
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    return k_pool, v_pool, bt, torch.tensor(lengths, device=DEVICE)


@pytest.mark.parametrize("B,H,Hkv,D,Tq,page,window,splits", [
    (3, 4, 2, 80, 1, 16, None, 1),
    (2, 6, 1, 96, 1, 8, None, 3),
    (3, 4, 4, 64, 3, 16, None, 2),
    (2, 8, 2, 80, 1, 16, 11, 2),
    (1, 2, 1, 32, 5, 4, 6, 1),
], ids=["gqa-d80", "mqa-d96-splits", "mha-tq3", "window-d80", "window-tq5-page4"])
def test_paged_decode_kernel_equals_reference(B, H, Hkv, D, Tq, page, window, splits):
    from kernels.paged_decode import paged_decode_attention

    lengths = [37, 5, 64][:B] if B > 1 else [29]
    lengths = [max(n, Tq) for n in lengths]
    k_pool, v_pool, bt, lens = scattered(B, lengths, page, 40, Hkv, D, torch.float32)
    q = torch.randn(B, Tq, H, D, device=DEVICE)
    out = paged_decode_attention(q, k_pool, v_pool, bt, lens, window=window, num_splits=splits)
    ref = paged_decode_attention_ref(q, k_pool, v_pool, bt, lens, window=window)
    assert_close(out, ref)
    # the reference itself: row by row, the gathered contiguous cache through kv_attention_ref
    for b in range(B):
        k = k_pool[bt[b].long()].reshape(1, -1, Hkv, D)[:, : lengths[b]]
        v = v_pool[bt[b].long()].reshape(1, -1, Hkv, D)[:, : lengths[b]]
        one = kv_attention_ref(q[b:b + 1], k, v, lens[b:b + 1], window)
        assert_close(ref[b:b + 1], one)


def test_paged_decode_kernel_fp16_within_the_fa_rule():
    from kernels.paged_decode import paged_decode_attention

    k_pool, v_pool, bt, lens = scattered(2, [50, 17], 16, 12, 2, 64, torch.float16)
    q = torch.randn(2, 1, 4, 64, device=DEVICE, dtype=torch.float16)
    out = paged_decode_attention(q, k_pool, v_pool, bt, lens, num_splits=2)
    ref_lp = paged_decode_attention_ref(q, k_pool, v_pool, bt, lens)
    ref_hp = paged_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), bt, lens)
    assert_fa_rule(out, ref_lp, ref_hp)


def test_launch_configs_cover_every_variant_the_launcher_can_pick():
    from kernels.paged_decode import LAUNCH_CONFIGS, kernel_variants

    picks = {v["BLOCK_N"] for v in kernel_variants()}
    assert picks <= {c["BLOCK_N"] for c in LAUNCH_CONFIGS} and len(kernel_variants()) > 10


def test_model_over_the_paged_cache_equals_the_contiguous_cache():
    """Reference ops (the kernel is checked against its reference above; the whole model interpreted takes 30 s)."""
    kernels = "torch"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, kernels=kernels)
    model = Transformer(cfg).eval().to(DEVICE)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (13, 5, 21)]
    pool = model.new_pool(n_blocks=30, block_size=4)
    pool.alloc(3)  # blocks in use by someone else: the rows' blocks start elsewhere
    tables = [[], [], []]
    with torch.no_grad():
        ref_cache = model.new_cache(3, 64)
        for b, p in enumerate(prompts):  # prefill each row alone into both caches, then decode together
            pool.grow(tables[b], len(p))
            one = PagedKVCache(pool, [tables[b]], [0])
            model(torch.tensor([p], device=DEVICE), cache=one)
        ref_cache.k = [torch.zeros_like(k) for k in ref_cache.k]
        lens = [len(p) for p in prompts]
        for b, p in enumerate(prompts):
            c = model.new_cache(1, 64)
            model(torch.tensor([p], device=DEVICE), cache=c)
            for layer in range(cfg.n_layer):
                ref_cache.k[layer][b] = c.k[layer][0]
                ref_cache.v[layer][b] = c.v[layer][0]
        ref_cache.set_lengths(lens)
        tok = torch.randint(0, 97, (3, 1), device=DEVICE)
        for _ in range(6):
            for b in range(3):
                pool.grow(tables[b], lens[b] + 1)
            paged = PagedKVCache(pool, tables, lens)
            got, _ = model(tok, cache=paged)
            want, _ = model(tok, cache=ref_cache)
            assert_close(got, want, name="logits")
            lens = [n + 1 for n in lens]
            tok = want[:, -1].argmax(-1, keepdim=True)


def test_pool_allocates_frees_and_refuses_overdraw():
    pool = BlockPool(1, 4, 8, 1, 4, "cpu", torch.float32)
    a = pool.alloc(3)
    assert pool.used == 3 and len(set(a)) == 3
    with pytest.raises(PoolExhausted):
        pool.alloc(2)
    pool.release(a)
    assert pool.used == 0 and pool.free == 4
    cache = PagedKVCache(pool, [pool.alloc(1)], [7])
    with pytest.raises(ValueError, match="needs 9 slots"):
        cache.check_room(2)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_ragged_step_equals_each_sequence_alone(window):
    """One forward over a ragged batch (`PagedKVCache.ragged`: two decodes, a first prefill chunk, a middle one,
    one row per token) gives each sequence the logits of its own forward (B = 1, its tokens as one row)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, kernels="torch",
                      window=window)
    model = Transformer(cfg).eval().to(DEVICE)
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (13, 6, 9, 21)]
    done = [12, 5, 0, 8]  # tokens already in the cache: decode, decode, a first chunk, a middle chunk
    pools, tables = [model.new_pool(n_blocks=40, block_size=4) for _ in range(2)], [[[] for _ in seqs] for _ in "ab"]
    want = []
    with torch.no_grad():
        for b, (s, d) in enumerate(zip(seqs, done)):  # the cached part of every row, in both pools alike
            for pool, t in zip(pools, tables):
                pool.grow(t[b], len(s))
                if d:
                    model(torch.tensor([s[:d]], device=DEVICE), cache=PagedKVCache(pool, [t[b]], [0]))
        for b, (s, d) in enumerate(zip(seqs, done)):  # each alone, in pool a
            logits, _ = model(torch.tensor([s[d:]], device=DEVICE), cache=PagedKVCache(pools[0], [tables[0][b]], [d]))
            want.append(logits[0])
        cache = PagedKVCache.ragged(pools[1], tables[1], done, [len(s) - d for s, d in zip(seqs, done)])
        ids = torch.tensor([[i] for s, d in zip(seqs, done) for i in s[d:]], device=DEVICE)
        got, _ = model(ids, cache=cache)  # (N, 1, V)
    assert cache.segments == [(0, 1), (1, 1), (2, 9), (11, 13)]
    assert_close(got[:, 0], torch.cat(want), name="ragged logits")
    for layer in range(cfg.n_layer):  # the same K/V landed in the same slots
        assert_close(pools[1].k[layer], pools[0].k[layer], name="k pool")
