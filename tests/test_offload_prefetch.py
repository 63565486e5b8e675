"""The host-row prefetch: the fine stage's near-misses (`select_token_slots(..., ahead=)` vs `reference.select_ahead`),
`host_prefetch` and `block_overlap` against their references, the lookup's prefetch-hit count, the no-stale rule
(a line whose copy has not landed is never read), and attention with the prefetch on equal to it off."""

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.config import HOST_CACHE_WAYS as W
from sglang_asynctls.kernels.block_overlap import block_overlap as kernel_overlap
from sglang_asynctls.kernels.host_cache import host_cache_lookup as kernel_lookup
from sglang_asynctls.kernels.host_prefetch import host_prefetch as kernel_prefetch
from sglang_asynctls.kernels.select_tokens import select_token_slots, select_tokens
from sglang_asynctls.kernels.sparse_decode import sparse_decode as kernel_sparse_decode
from sglang_asynctls.offload import reference as OR
from sglang_asynctls.offload.host_cache import HostRowCache
from sglang_asynctls.offload.host_stats import Column

from kernel_cases import SHAPES, assert_topk_set, make_cache

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SINK, WINDOW = 4, 6
LAYOUTS = {"gqa": dict(hkv=2, g=4, d=32, dv=32, mla=False), "mla": dict(hkv=1, g=5, d=80, dv=64, mla=True)}


# ---------------------------------------------------------------------------------------------- near-misses


def _scores(c, budget):
    kmin, kmax, table, labels, scale = c["index"]
    blocks = R.coarse_select(c["q"], kmin, kmax, table, c["seq_lens"], block_size=c["bs"], block_budget=budget,
                             sink_tokens=SINK, local_window=WINDOW)
    positions = R.candidate_positions(blocks, c["seq_lens"], c["bs"])
    scores = R.token_scores(c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], positions, c["sm_scale"])
    return blocks, positions, scores


def _priority(scores, positions, seq_lens):
    lens = seq_lens[:, None, None]
    forced = (positions >= 0) & ((positions < SINK) | (positions >= lens - WINDOW))
    return scores.masked_fill(forced, float("inf"))


def _sets(x):
    return [[sorted(v for v in row.tolist() if v >= 0) for row in b] for b in x]


@pytest.mark.parametrize("budget, ahead", [(11, 5), (40, 64), (300, 13)])  # k_t > sink + window, as the config
def test_near_misses_are_the_next_ranks_below_the_cut_off(budget, ahead):
    """Kernel (31-bit keys) = reference as sets; at the default 16-bit keys picked + ahead is a top-(k_t + P) and
    the two never share a slot; past the candidates the list is -1 padded."""
    c = make_cache([27, 61, 113], **SHAPES["gqa"], device=DEV)
    blocks, positions, scores = _scores(c, 12)
    want = R.positions_to_slots(R.select_ahead(scores, positions, c["seq_lens"], budget, ahead, SINK, WINDOW),
                                c["r2t"], c["rows"])
    kw = dict(block_size=c["bs"], token_budget=budget, sink_tokens=SINK, local_window=WINDOW)
    got = torch.full((3, 2, ahead), 7, dtype=torch.int32, device=DEV)
    slots = select_token_slots(scores, blocks, c["r2t"], c["rows"], c["seq_lens"], key_bits=31, ahead=got, **kw)
    assert _sets(got) == _sets(want)
    assert _sets(slots) == _sets(R.positions_to_slots(
        R.select_tokens(scores, positions, c["seq_lens"], budget, SINK, WINDOW), c["r2t"], c["rows"]))
    ahead16 = torch.empty(3, 2, ahead, dtype=torch.int32, device=DEV)
    picked = select_token_slots(scores, blocks, c["r2t"], c["rows"], c["seq_lens"], ahead=ahead16, **kw)
    cand = R.positions_to_slots(positions, c["r2t"], c["rows"])
    pri = _priority(scores, positions, c["seq_lens"])
    assert_topk_set(torch.cat([picked, ahead16], dim=2), cand, pri, budget + ahead)
    assert_topk_set(picked, cand, pri, budget)
    for i in range(3):
        for h in range(2):
            a, p = set(ahead16[i, h].tolist()) - {-1}, set(picked[i, h].tolist()) - {-1}
            assert not a & p
            n = len(a)
            assert (ahead16[i, h, n:] == -1).all()  # the list is dense, then padded


def test_near_misses_as_positions_and_off_by_default():
    c = make_cache([27, 61, 113], **SHAPES["mha"], device=DEV)
    _, positions, scores = _scores(c, 5)
    ahead = torch.empty(3, 3, 8, dtype=torch.int64, device=DEV)
    select_tokens(scores, positions, c["seq_lens"], 12, SINK, WINDOW, key_bits=31, ahead=ahead)
    assert _sets(ahead) == _sets(R.select_ahead(scores, positions, c["seq_lens"], 12, 8, SINK, WINDOW))
    assert torch.equal(select_tokens(scores, positions, c["seq_lens"], 12, SINK, WINDOW),
                       select_tokens(scores, positions, c["seq_lens"], 12, SINK, WINDOW, ahead=ahead))


# ---------------------------------------------------------------------------------------------- the prefetch


def _state(nr, hkv, lines):
    tags, stamps, claims = (torch.full((nr, hkv, lines), -1, dtype=torch.int32, device=DEV) for _ in range(3))
    return tags, stamps, claims, torch.zeros(nr, hkv, lines, dtype=torch.int8, device=DEV)


def _kv(s, hkv, d, dv, mla, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(s, hkv, d, generator=g).to(dtype).to(DEV)
    return k, (k[..., :dv] if mla else torch.randn(s, hkv, dv, generator=g).to(dtype).to(DEV))


def test_reference_prefetch_hand_checked():
    """One row, one KV head, 2 sets of W lines, host slots from 100 (slot s in set s % 2). Set 0: lines 0-2 hold
    slots stamped at this step (10: being read), line 3 holds 104 (stamp 7), line 4 holds 106 (stamp 5), the rest
    are empty. Predicted: 104 (cached), 8 (a GPU slot), 110, 112, 114, 116 (set 0 misses) and 101 (set 1); the
    step's selection read 103 (set 1) uncached, 105 from the cache (line 44) and 7 from the GPU."""
    tags, stamps, claims, fetched = _state(2, 1, 2 * W)
    tags[1, 0, :5] = torch.tensor([200, 202, 204, 104, 106], dtype=torch.int32)
    stamps[1, 0, :5] = torch.tensor([10, 10, 10, 7, 5], dtype=torch.int32)
    k, v = _kv(300, 1, 8, 8, False)
    cache_k, cache_v = torch.zeros(2 * 2 * W, 8, device=DEV), torch.zeros(2 * 2 * W, 8, device=DEV)
    ahead = torch.tensor([[[104, 8, 110, 112, 114, 116, 101, -1]]], dtype=torch.int32, device=DEV)
    sel = torch.tensor([[[103, 105, 7]]], dtype=torch.int32, device=DEV)
    verdict = torch.tensor([[[-1, 44, -1]]], dtype=torch.int32, device=DEV)
    one, now = torch.tensor([1], device=DEV), torch.tensor([10], device=DEV)
    counters = torch.zeros(len(Column), dtype=torch.int64, device=DEV)
    got = OR.host_prefetch(ahead, one, now, torch.tensor([True], device=DEV), tags, stamps, claims, fetched, 100, k,
                           v, cache_k, cache_v, counters, ways=W, token_slots=sel, cache_ref=verdict)
    base = 1 * 2 * W
    # by descending entry: set 1 gives 103 its LRU line (W), then 101 the next (W + 1); set 0's free lines by
    # (stamp, way) are 5, 6, 7 (empty), 4 (stamp 5), 3 (stamp 7): 116, 114, 112, 110 take 5, 6, 7, 4
    assert got.tolist() == [[[-1, -1, base + 4, base + 7, base + 6, base + 5, base + W + 1, -1, base + W, -1, -1]]]
    assert tags[1, 0].tolist()[:8] == [200, 202, 204, 104, 110, 116, 114, 112]
    assert tags[1, 0, W:W + 2].tolist() == [103, 101]
    assert stamps[1, 0, :3].tolist() == [10, 10, 10] and stamps[1, 0, 3] == 7 and (stamps[1, 0, 4:W + 2] == 10).all()
    assert fetched[1, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1] + [0] * (W - 2)
    for c, s in ((base + 5, 116), (base + 4, 110), (base + W, 103), (base + W + 1, 101)):
        assert torch.equal(cache_k[c], k[s, 0]) and torch.equal(cache_v[c], v[s, 0])
    assert counters[Column.PREFETCH_ROWS] == 6 and (claims == -1).all()
    kclaims = torch.full_like(claims, -1)
    state = [torch.full_like(tags, -1), torch.full_like(stamps, -1), torch.zeros_like(fetched)]
    state[0][1, 0, :5] = torch.tensor([200, 202, 204, 104, 106], dtype=torch.int32)
    state[1][1, 0, :5] = torch.tensor([10, 10, 10, 7, 5], dtype=torch.int32)
    kk, kv = torch.zeros_like(cache_k), torch.zeros_like(cache_v)
    kgot = kernel_prefetch(ahead, one, now, torch.tensor([True], device=DEV), state[0], state[1], kclaims, state[2],
                           100, k, v, kk, kv, ways=W, token_slots=sel, cache_ref=verdict)
    assert torch.equal(kgot, got) and torch.equal(state[0], tags) and torch.equal(state[2], fetched)
    assert torch.equal(kk, cache_k) and torch.equal(kv, cache_v) and (kclaims == -1).all()
    # the next step's lookup hits two prefetched lines (counted once each, then ordinary) and a demand-cached one
    sel = torch.tensor([[[110, 116, 104, 5]]], dtype=torch.int32, device=DEV)
    for _ in range(2):
        OR.host_cache_lookup(sel, one, now + 1, torch.tensor([True], device=DEV), tags, stamps, claims, 100,
                             counters, ways=W, fetched=fetched)
    assert counters[Column.CACHE_HITS] == 6 and counters[Column.PREFETCH_HITS] == 2
    assert fetched[1, 0, 5] == 0 and fetched[1, 0, 4] == 0 and fetched[1, 0, 6] == 1


def _walk(b, hkv, k, p, nr, pool, steps, seed):
    """Per step a selection [B, Hkv, K] and a prediction [B, Hkv, P] (distinct within a row and head) of slots of
    0..pool-1; later selections draw on earlier predictions, as the next step's newcomers do."""
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randperm(nr - 1, generator=g)[:b] + 1).to(DEV)
    active = torch.ones(b, dtype=torch.bool)
    active[-1] = False  # a short request: neither looked up nor fetched
    out, hot = [], torch.randperm(pool, generator=g)[: 3 * (k + p)]
    for _ in range(steps):
        sel, ahead = [], []
        for _ in range(b * hkv):
            perm = hot[torch.randperm(len(hot), generator=g)]
            sel.append(perm[:k])
            ahead.append(perm[k:k + p])
        sel = torch.stack(sel).view(b, hkv, k).int()
        ahead = torch.stack(ahead).view(b, hkv, p).int()
        sel[torch.rand(sel.shape, generator=g) < 0.1] = -1
        ahead[torch.rand(ahead.shape, generator=g) < 0.1] = -1
        out.append((sel.to(DEV), ahead.to(DEV)))
    return rows, active.to(DEV), out


@pytest.mark.parametrize("lines", [W, 4 * W])
@pytest.mark.parametrize("layout", ["gqa", "mla"])
def test_kernel_prefetch_equals_the_reference_over_a_walk(lines, layout):
    """Lookup, cached attention and prefetch, step after step, Triton vs reference: the same lines, stamps, flags,
    copies and counts; rows on both sides of the GPU / host boundary (slot 70 of 160)."""
    sh = LAYOUTS[layout]
    hkv, d, dv, mla = sh["hkv"], sh["d"], sh["dv"], sh["mla"]
    b, k, p, nr, host_from = 3, 19, 13, 5, 70
    k_buf, v_buf = _kv(160, hkv, d, dv, mla)
    rows, active, walk = _walk(b, hkv, k, p, nr, 160, steps=5, seed=lines + d)
    caches = [HostRowCache(1, nr, hkv, lines, d, dv, mla, torch.float32, DEV, host_from, impl=impl, ahead_rows=p,
                           counters=torch.zeros(1, len(Column), dtype=torch.int64, device=DEV))
              for impl in ("reference", "triton")]
    g = torch.Generator().manual_seed(3)
    for t, (sel, ahead) in enumerate(walk):
        q = torch.randn(b, hkv * sh["g"], d, generator=g).to(DEV)
        seq = torch.full((b,), 500 + t, dtype=torch.int32, device=DEV)
        outs = []
        for cache, attend in zip(caches, (R.sparse_decode, kernel_sparse_decode)):
            lc = cache.for_layer(0, rows, seq, active, k_buf, v_buf)
            outs.append(attend(q, k_buf, v_buf, sel, d ** -0.5, cache=lc(sel, None, ahead)))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for name in ("tags", "stamps", "fetched", "claims"):
            assert torch.equal(getattr(caches[1], name), getattr(caches[0], name)), (t, name)
        assert torch.equal(caches[1].k[0], caches[0].k[0]) and torch.equal(caches[1].v[0], caches[0].v[0])
    c = caches[0].counters[0]
    assert torch.equal(caches[1].counters, caches[0].counters)
    assert c[Column.PREFETCH_ROWS] > 0 and 0 < c[Column.PREFETCH_HITS] <= c[Column.CACHE_HITS]
    for cache in caches:  # every tagged line holds an exact copy of its slot; the short request's row is untouched
        tags = cache.tags[0]
        for row, h, line in (tags >= 0).nonzero().tolist():
            ci, slot = (row * hkv + h) * lines + line, int(tags[row, h, line])
            assert slot >= host_from and torch.equal(cache.k[0][ci], k_buf[slot, h])
            assert mla or torch.equal(cache.v[0][ci], v_buf[slot, h])
        assert (tags[int(rows[-1])] == -1).all()


@pytest.mark.parametrize("page_size", [1, 64])
def test_attention_with_the_prefetch_is_bit_identical_to_without(page_size):
    """fp32, Triton kernels: the fine stage's near-misses fetched ahead change where rows are read from, never the
    attention; the prefetched lines serve later steps. Slots come from a pool of pages of page_size (1: scattered,
    64: runs of 64), half of them host slots."""
    b, hq, hkv, d, lines = 2, 8, 2, 32, 16 * W
    pages = 4096 // page_size
    g = torch.Generator().manual_seed(page_size)
    k_buf, v_buf = _kv(4096, hkv, d, d, False, seed=page_size)
    lens = [331, 413]
    r2t = torch.zeros(3, 448, dtype=torch.int32)
    for row, n in zip((1, 2), lens):
        perm = torch.randperm(pages, generator=g)[: -(-n // page_size)]
        r2t[row, :n] = (perm[:, None] * page_size + torch.arange(page_size)).flatten()[:n].int()
    rows, r2t = torch.tensor([1, 2], device=DEV), r2t.to(DEV)
    active = torch.ones(b, dtype=torch.bool, device=DEV)
    caches = {p: HostRowCache(1, 3, hkv, lines, d, d, False, torch.float32, DEV, 2048, impl="triton", ahead_rows=p,
                              counters=torch.zeros(1, len(Column), dtype=torch.int64, device=DEV)) for p in (0, 24)}
    positions = torch.stack([torch.randperm(lens[i] - 1, generator=g)[:200] for i in range(b)])[:, None]
    positions = positions.expand(b, hkv, 200).contiguous().to(DEV)
    base = torch.rand(b, hkv, 200, generator=g)
    for t in range(6):
        q = torch.randn(b, hq, d, generator=g).to(DEV)
        scores = (base + 0.15 * torch.rand(b, hkv, 200, generator=g)).to(DEV)  # the selection drifts step to step
        seq = torch.tensor(lens, device=DEV) + t
        outs = {}
        for p, cache in caches.items():
            ahead = torch.empty(b, hkv, p, dtype=torch.int32, device=DEV) if p else None
            slots = select_token_slots(scores, positions, r2t, rows, seq, block_size=0, token_budget=48,
                                       sink_tokens=0, local_window=0, ahead=ahead)
            lc = cache.for_layer(0, rows, seq.int(), active, k_buf, v_buf)
            outs[p] = kernel_sparse_decode(q, k_buf, v_buf, slots, d ** -0.5, cache=lc(slots, None, ahead))
        assert torch.equal(outs[24], outs[0]), t
        assert torch.equal(outs[0], kernel_sparse_decode(q, k_buf, v_buf, slots, d ** -0.5))
    on = caches[24].counters[0]
    assert on[Column.PREFETCH_ROWS] > 0 and on[Column.PREFETCH_HITS] > 0
    assert on[Column.CACHE_HITS] > caches[0].counters[0, Column.CACHE_HITS]  # the prefetch turned misses into hits


def test_a_line_whose_copy_has_not_landed_is_never_read():
    """The no-stale rule, in the reference's `landed` model: a prefetched line whose copy is still in flight (its
    row still garbage) is neither hit nor taken by a fill; its slot is read from host memory, so the attention is
    exact. Once landed, the same lookup hits it."""
    hkv, d, lines, host_from = 1, 16, 2 * W, 50
    k_buf, v_buf = _kv(120, hkv, d, d, False)
    cache = HostRowCache(1, 2, hkv, lines, d, d, False, torch.float32, DEV, host_from, ahead_rows=4)
    rows, active, seq = torch.tensor([1], device=DEV), torch.tensor([True], device=DEV), torch.tensor([9], device=DEV)
    ahead = torch.tensor([[[60, 61, 62, 20]]], dtype=torch.int32, device=DEV)
    written = OR.host_prefetch(ahead, rows, seq, active, cache.tags[0], cache.stamps[0], cache.claims[0],
                               cache.fetched[0], host_from, k_buf, v_buf, cache.k[0], cache.v[0], ways=W)
    in_flight = written[written >= 0].long()
    good = cache.k[0][in_flight].clone(), cache.v[0][in_flight].clone()
    cache.k[0][in_flight] = float("nan")  # the copy has not landed: the line holds garbage
    cache.v[0][in_flight] = float("nan")
    landed = torch.ones_like(cache.tags[0], dtype=torch.bool)
    landed.view(-1)[in_flight] = False
    sel = torch.tensor([[[60, 61, 63, 64, 65, 66, 67, 5]]], dtype=torch.int32, device=DEV)  # 60, 61 were fetched
    q = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(1)).to(DEV)
    tags_before = cache.tags[0].clone()
    ref = OR.host_cache_lookup(sel, rows, seq + 1, active, cache.tags[0], cache.stamps[0], cache.claims[0],
                               host_from, ways=W, fetched=cache.fetched[0], landed=landed)
    line = torch.where(ref >= 0, ref, -ref - 2)
    assert not torch.isin(line[ref != -1], in_flight).any()  # neither read nor filled
    assert torch.equal(cache.tags[0].view(-1)[in_flight], tags_before.view(-1)[in_flight])
    out = R.sparse_decode(q, k_buf, v_buf, sel, d ** -0.5, cache=(cache.k[0], cache.v[0], ref))
    assert torch.isfinite(out).all()
    assert torch.equal(out, R.sparse_decode(q, k_buf, v_buf, sel, d ** -0.5))
    cache.k[0][in_flight], cache.v[0][in_flight] = good  # landed
    ref = OR.host_cache_lookup(sel, rows, seq + 2, active, cache.tags[0], cache.stamps[0], cache.claims[0],
                               host_from, ways=W, fetched=cache.fetched[0])
    assert (ref[0, 0, :2] >= 0).all() and torch.isin(ref[0, 0, :2].long(), in_flight).all()
    with pytest.raises(AssertionError, match="landed"):
        kernel_lookup(sel, rows, seq, active, cache.tags[0], cache.stamps[0], cache.claims[0], host_from, ways=W,
                      landed=landed)


# ---------------------------------------------------------------------------------------------- block overlap


def test_block_overlap_hand_checked_and_kernel_equals_reference():
    prev = torch.full((4, 2, 6), -1, dtype=torch.int32, device=DEV)
    rows, active = torch.tensor([3, 1, 2], device=DEV), torch.tensor([True, True, False], device=DEV)
    m0 = torch.tensor([[[0, 4, 5, 9, -1], [1, 2, 3, 4, 5]], [[7, 8, 9, 10, 11], [0, 1, -1, -1, -1]],
                       [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]], dtype=torch.int32, device=DEV)
    m1 = torch.tensor([[[9, 0, 6, 7, 8], [5, 4, 3, 2, 1]], [[7, 12, 13, -1, -1], [2, 3, -1, -1, -1]],
                       [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]], dtype=torch.int32, device=DEV)
    states = [prev.clone(), prev.clone()]
    counters = [torch.zeros(len(Column), dtype=torch.int64, device=DEV) for _ in range(2)]
    for fn, st, c in zip((OR.block_overlap, kernel_overlap), states, counters):
        fn(m0, rows, active, st, c, columns=(Column.OVERLAP, Column.OVERLAP_BLOCKS))
        assert c[Column.OVERLAP_BLOCKS] == 0  # a row's first step has nothing to compare with
        fn(m1, rows, active, st, c, columns=(Column.OVERLAP, Column.OVERLAP_BLOCKS))
    # |M_1 n M_0| per (row, head): {9, 0} 2 of 5, 5 of 5, {7} 1 of 3, 0 of 2; the inactive row is not counted
    for c in counters:
        assert (int(c[Column.OVERLAP]), int(c[Column.OVERLAP_BLOCKS])) == (8, 15)
    assert torch.equal(states[1], states[0])
    assert states[0][1, 0].tolist() == [7, 12, 13, -1, -1, -1] and (states[0][2] == -1).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # random selections, Kb of 37 against rows of 41
        m = torch.stack([torch.randperm(60, generator=g)[:37] for _ in range(6)]).view(3, 2, 37).int().to(DEV)
        m[torch.rand(m.shape, generator=g) < 0.2] = -1
        wide = [torch.full((4, 2, 41), -1, dtype=torch.int32, device=DEV) for _ in range(2)]
        for fn, st, c in zip((OR.block_overlap, kernel_overlap), wide, counters):
            fn(m, rows, active, st, c)
            fn(m.flip(2), rows, active, st, c)
        assert torch.equal(wide[1], wide[0]) and torch.equal(counters[1], counters[0])


# ---------------------------------------------------------------------------------------------- the cache object


def test_cache_refuses_a_prefetch_without_lines_and_resets_its_rows():
    with pytest.raises(ValueError, match="prefetch"):
        HostRowCache(1, 2, 1, 0, 8, 8, False, torch.float32, DEV, 10, ahead_rows=8)
    cache = HostRowCache(2, 3, 1, W, 8, 8, False, torch.float32, DEV, 10, ahead_rows=8, block_budget=4)
    cache.tags[:, 2], cache.fetched[:, 2], cache.prev_blocks[:, 2] = 5, 1, 3
    cache.reset_rows(torch.tensor([2], device=DEV))
    assert (cache.tags == -1).all() and (cache.fetched == 0).all() and (cache.prev_blocks == -1).all()
    assert cache.for_layer(0, torch.tensor([1]), torch.tensor([5]), torch.tensor([True])).ahead_rows == 0  # no pool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_side_stream_prefetch_is_bit_identical_and_joined_at_the_last_layer():
    """On the GPU: the prefetch runs on the side stream, the last layer joins it, and bf16 attention with the
    prefetch equals it without, at Qwen3-8B's head shape."""
    b, hkv, grp, d, lines, layers, p = 4, 8, 4, 128, 2048, 2, 128
    k_buf, v_buf = _kv(40000, hkv, d, d, False, torch.bfloat16, seed=4)
    caches = [HostRowCache(layers, 6, hkv, lines, d, d, False, torch.bfloat16, DEV, 15000, impl="triton",
                           ahead_rows=n, counters=torch.zeros(layers, len(Column), dtype=torch.int64, device=DEV))
              for n in (0, p)]
    rows, active, walk = _walk(b, hkv, 1024, p, 6, 40000, steps=4, seed=5)
    g = torch.Generator().manual_seed(6)
    for t, (sel, ahead) in enumerate(walk):
        q = torch.randn(b, hkv * grp, d, generator=g).to(torch.bfloat16).to(DEV)
        seq = torch.full((b,), 90000 + t, dtype=torch.int32, device=DEV)
        for layer in range(layers):
            outs = [kernel_sparse_decode(q, k_buf, v_buf, sel, d ** -0.5,
                                         cache=c.for_layer(layer, rows, seq, active, k_buf, v_buf)(
                                             sel, None, ahead if c.ahead_rows else None)) for c in caches]
            assert torch.equal(outs[0], outs[1]), (t, layer)
    assert not caches[1]._inflight  # joined at the last layer
    torch.cuda.synchronize()
    assert int(caches[1].counters[:, Column.PREFETCH_ROWS].sum()) > 0
