"""The host-row cache: `host_cache_lookup` (Triton vs reference, over multi-step walks), the cached
`sparse_decode` (same attention as uncached, lines hold exact copies), and HostRowCache's row reset."""

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.config import HOST_CACHE_WAYS as W
from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError
from sglang_asynctls.kernels.host_cache import host_cache_lookup as kernel_lookup
from sglang_asynctls.kernels.sparse_decode import sparse_decode as kernel_sparse_decode
from sglang_asynctls.offload import reference as OR
from sglang_asynctls.offload.host_cache import HostRowCache
from sglang_asynctls.offload.host_stats import Column

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _state(nr, hkv, lines):
    return [torch.full((nr, hkv, lines), -1, dtype=torch.int32, device=DEV) for _ in range(3)]


def test_reference_hits_fill_one_line_per_set_and_never_evict_a_hit():
    # one row, one head, 2 sets of W ways; host slots from 100; slot s lives in set s % 2
    tags, stamps, claims = _state(2, 1, 2 * W)
    rows, active = torch.tensor([1], device=DEV), torch.tensor([True], device=DEV)
    slots = torch.tensor([[[100, 102, 101, 5, -1]]], dtype=torch.int32, device=DEV)
    counters = torch.zeros(len(Column), dtype=torch.int64, device=DEV)
    ref = OR.host_cache_lookup(slots, rows, torch.tensor([10], device=DEV), active, tags, stamps, claims, 100,
                               counters, ways=W)
    # set 0 has misses 100 and 102: the later entry (102) takes way 0; set 1: 101 takes its way 0
    base = 1 * 2 * W
    assert ref.tolist() == [[[-1, -(base + 0) - 2, -(base + W) - 2, -1, -1]]]
    assert tags[1, 0, 0] == 102 and tags[1, 0, W] == 101 and stamps[1, 0, 0] == 10
    assert counters[:5].tolist() == [4, 3, 0, 2, 1]
    ref = OR.host_cache_lookup(slots, rows, torch.tensor([11], device=DEV), active, tags, stamps, claims, 100,
                               counters, ways=W)
    # now 102 and 101 hit; 100 misses and takes set 0's next LRU line (way 1), not 102's line
    assert ref.tolist() == [[[-(base + 1) - 2, base + 0, base + W, -1, -1]]]
    assert counters[:5].tolist() == [8, 6, 2, 3, 2]
    assert (claims == -1).all()


def _walk(b, hkv, k, nr, lines, host_from, slots_range, steps, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(nr - 1, generator=g)[:b] + 1
    active = torch.ones(b, dtype=torch.bool)
    active[0] = False  # a short request (dense path): the cache must not touch its row
    walk, pool = [], torch.randperm(slots_range, generator=g)[: k * 2]
    for _ in range(steps):
        sel = torch.stack([torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(hkv)])
                           for _ in range(b)]).int()
        sel[torch.rand(sel.shape, generator=g) < 0.1] = -1
        walk.append(sel.to(DEV))
    return rows.to(DEV), active.to(DEV), walk


@pytest.mark.parametrize("lines", [0, W, 4 * W])
@pytest.mark.parametrize("k", [12, 40])
def test_kernel_lookup_equals_the_reference_over_a_walk(lines, k):
    b, hkv, nr, host_from = 3, 2, 5, 30
    rows, active, walk = _walk(b, hkv, k, nr, lines, host_from, 120, steps=6, seed=k + lines)
    states = [_state(nr, hkv, lines), _state(nr, hkv, lines)]
    counters = [torch.zeros(len(Column), dtype=torch.int64, device=DEV) for _ in range(2)]
    for t, sel in enumerate(walk):
        seq = torch.full((b,), 1000 + t, dtype=torch.int32, device=DEV)
        want = OR.host_cache_lookup(sel, rows, seq, active, *states[0], host_from, counters[0], ways=W)
        got = kernel_lookup(sel, rows, seq, active, *states[1], host_from, counters[1], ways=W)
        assert torch.equal(got, want), f"step {t}"
        for a, e in zip(states[1], states[0]):
            assert torch.equal(a, e), f"step {t}"
    assert torch.equal(counters[1], counters[0])
    assert (states[1][2] == -1).all()  # claims
    if lines:
        assert counters[0][Column.CACHE_HITS] > 0  # the walk revisits slots: later steps hit
    inactive = int(rows[0])
    assert (states[1][0][inactive] == -1).all()


def _kv(s, hkv, d, dv, dtype, mla, g):
    k_buf = torch.randn(s, hkv, d, generator=g).to(dtype).to(DEV)
    v_buf = k_buf[..., :dv] if mla else torch.randn(s, hkv, dv, generator=g).to(dtype).to(DEV)
    return k_buf, v_buf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [dict(hkv=2, g=4, d=32, dv=32, mla=False),
                                   dict(hkv=1, g=8, d=48, dv=32, mla=True)])
def test_cached_sparse_decode_attends_exactly_and_fills_copies(dtype, shape):
    hkv, grp, d, dv, mla = shape["hkv"], shape["g"], shape["d"], shape["dv"], shape["mla"]
    b, k, nr, lines, host_from = 3, 24, 4, 2 * W, 40
    g = torch.Generator().manual_seed(7)
    k_buf, v_buf = _kv(160, hkv, d, dv, dtype, mla, g)
    rows, active, walk = _walk(b, hkv, k, nr, lines, host_from, 160, steps=4, seed=1)
    # the reference cache looks up with the reference, the kernel one with the kernel
    caches = [HostRowCache(1, nr, hkv, lines, d, dv, mla, dtype, DEV, host_from, impl=impl)
              for impl in ("reference", "triton")]
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    for t, sel in enumerate(walk):
        q = torch.randn(b, hkv * grp, d, generator=g).to(dtype).to(DEV)
        seq = torch.full((b,), 500 + t, dtype=torch.int32, device=DEV)
        plain = R.sparse_decode(q, k_buf, v_buf, sel, d ** -0.5)
        want = R.sparse_decode(q, k_buf, v_buf, sel, d ** -0.5, cache=caches[0].for_layer(0, rows, seq, active)(sel))
        got = kernel_sparse_decode(q, k_buf, v_buf, sel, d ** -0.5,
                                   cache=caches[1].for_layer(0, rows, seq, active)(sel))
        torch.testing.assert_close(want.float(), plain.float(), **tol)
        torch.testing.assert_close(got.float(), want.float(), **tol)
    for cache in caches:  # every tagged line holds an exact copy of its slot's row
        tags = cache.tags[0]
        for row, h, line in (tags >= 0).nonzero().tolist():
            c = (row * hkv + h) * lines + line
            slot = int(tags[row, h, line])
            assert torch.equal(cache.k[0][c], k_buf[slot, h])
            if not mla:
                assert torch.equal(cache.v[0][c], v_buf[slot, h])
    assert torch.equal(caches[1].tags, caches[0].tags)


def test_reset_rows_drops_lines_and_zero_lines_only_count():
    cache = HostRowCache(2, 4, 1, W, 8, 8, False, torch.float32, DEV, 10,
                         counters=torch.zeros(2, len(Column), dtype=torch.int64, device=DEV))
    cache.tags[:, 2] = 5
    cache.stamps[:, 2] = 3
    cache.reset_rows(torch.tensor([2], device=DEV))
    assert (cache.tags == -1).all() and (cache.stamps == -1).all()
    counting = HostRowCache(1, 4, 1, 0, 8, 8, False, torch.float32, DEV, 10,
                            counters=torch.zeros(1, len(Column), dtype=torch.int64, device=DEV))
    sel = torch.tensor([[[3, 12, 15, -1]]], dtype=torch.int32, device=DEV)
    one = torch.ones(1, dtype=torch.int32, device=DEV)
    assert counting.for_layer(0, one, one * 9, torch.tensor([True], device=DEV))(sel) is None
    assert counting.counters[0, :5].tolist() == [3, 2, 0, 0, 1]


def test_config_checks_the_cache_flag():
    assert AsyncTLSConfig(host_kv_gib=8, host_cache_tokens=2048).host_cache_tokens == 2048
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-host-cache-tokens"):
        AsyncTLSConfig(host_kv_gib=8, host_cache_tokens=100)
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-host-kv-gib"):
        AsyncTLSConfig(host_cache_tokens=2048)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cached_decode_is_bit_identical_to_uncached_at_qwen3_size():
    b, hkv, grp, d, k, lines, nr = 4, 8, 4, 128, 1024, 2048, 6
    g = torch.Generator().manual_seed(3)
    k_buf, v_buf = _kv(40000, hkv, d, d, torch.bfloat16, False, g)
    rows, active, walk = _walk(b, hkv, k, nr, lines, 15000, 40000, steps=4, seed=5)
    cache = HostRowCache(1, nr, hkv, lines, d, d, False, torch.bfloat16, DEV, 15000, impl="triton")
    hits = 0
    for t, sel in enumerate(walk):
        q = torch.randn(b, hkv * grp, d, generator=g).to(torch.bfloat16).to(DEV)
        tup = cache.for_layer(0, rows, torch.full((b,), 90000 + t, dtype=torch.int32, device=DEV), active)(sel)
        hits += int((tup[2] >= 0).sum())
        got = kernel_sparse_decode(q, k_buf, v_buf, sel, d ** -0.5, cache=tup)
        assert torch.equal(got, kernel_sparse_decode(q, k_buf, v_buf, sel, d ** -0.5)), f"step {t}"
    assert hits > 0
