"""Resident-set update: the Triton kernel against the torch reference, and the reference against hand-made LRU
cases (hits keep their slot, misses evict the least recently used slot not in M_t, overlap counts |M_t ∩ M_{t-1}|);
the engine's fused launches (layer_update, resident_candidates) against their references."""

import pytest
import torch

from sglang_asynctls.kernels.resident_candidates import resident_candidates as kernel_candidates
from sglang_asynctls.kernels.resident_update import layer_update as kernel_layer_update
from sglang_asynctls.kernels.resident_update import resident_update as kernel_update
from sglang_asynctls.offload import reference as OR
from sglang_asynctls.offload.trace import random_walk as walk

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _state(num_rows, hkv, r, kb):
    tags = torch.full((num_rows, hkv, r), -1, dtype=torch.int32, device=DEV)
    return tags, torch.full_like(tags, -1), torch.full((num_rows, hkv, kb), -1, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("r,kb", [(8, 8), (12, 5), (16, 7)])
def test_kernel_matches_reference_over_a_random_walk(r, kb):
    num_rows, hkv, b = 7, 3, 4
    rows = torch.tensor([5, 1, 6, 2], device=DEV)
    ref, ker = _state(num_rows, hkv, r, kb), _state(num_rows, hkv, r, kb)
    for t, sel in enumerate(walk(12, [29] * b, hkv, kb, keep=0.7, seed=r + kb, revisit=0.5, device=DEV)):
        step = torch.tensor([t], dtype=torch.int32, device=DEV)
        want = OR.resident_update(*ref, rows, sel, step)
        got = kernel_update(*ker, rows, sel, step)
        for name, w, g in zip(("slots", "copy_src", "copy_dst", "overlap", "misses"), want, got):
            assert torch.equal(w, g), (t, name)
        for w, g in zip(ref, ker):
            assert torch.equal(w, g), t


def test_reference_is_lru_over_slots_outside_m_t():
    tags, lu, prev = _state(1, 1, 4, 2)
    rows = torch.tensor([0], device=DEV)

    def upd(t, blocks):
        sel = torch.tensor([[blocks]], dtype=torch.int32, device=DEV)
        return [x.flatten().tolist() for x in OR.resident_update(tags, lu, prev, rows, sel,
                                                                 torch.tensor([t], dtype=torch.int32, device=DEV))]

    assert upd(0, [0, 1]) == [[0, 1], [0, 1], [0, 1], [0], [2]]  # empty slots first, in slot order
    assert upd(1, [2, 3]) == [[2, 3], [2, 3], [2, 3], [0], [2]]
    # 0 hits slot 0; 4 takes slot 1 (last used at step 0), not 2 or 3 (step 1)
    assert upd(2, [0, 4]) == [[0, 1], [-1, 4], [-1, 1], [0], [1]]
    assert upd(3, [4, 0]) == [[1, 0], [-1, -1], [-1, -1], [2], [0]]
    assert tags.flatten().tolist() == [0, 4, 2, 3] and lu.flatten().tolist() == [3, 3, 1, 1]
    assert upd(4, [0, 5]) == [[0, 2], [-1, 5], [-1, 2], [1], [1]]  # slots 2 and 3 tie at step 1: the lower goes
    # LRU order is slot 3 (step 1), then slot 1 (step 3); the misses take that set in slot order
    assert upd(5, [7, 8]) == [[1, 3], [7, 8], [1, 3], [0], [2]]
    assert tags.flatten().tolist() == [0, 7, 5, 8] and lu.flatten().tolist() == [4, 5, 4, 5]


def test_every_entry_of_m_t_is_resident_after_the_update_and_hits_keep_their_slot():
    num_rows, hkv, r, kb = 3, 2, 10, 6
    tags, lu, prev = _state(num_rows, hkv, r, kb)
    rows = torch.tensor([2, 0], device=DEV)
    before = None
    for t, sel in enumerate(walk(10, [40] * 2, hkv, kb, keep=0.6, seed=1, device=DEV)):
        old_tags = tags[rows.long()].clone()
        slots, src, dst, overlap, misses = kernel_update(tags, lu, prev, rows, sel,
                                                         torch.tensor([t], dtype=torch.int32, device=DEV))
        valid = sel >= 0
        held = torch.gather(tags[rows.long()], 2, slots.long().clamp(min=0))
        assert torch.equal(torch.where(valid, held, -1), sel)  # each valid entry's slot holds its block
        assert len(set(slots[0, 0][valid[0, 0]].tolist())) == int(valid[0, 0].sum())  # distinct slots
        match = sel[..., :, None] == old_tags[..., None, :]  # [B, Hkv, Kb, R]
        was = match.any(-1) & valid
        assert torch.equal(src >= 0, valid & ~was) and torch.equal(misses, (valid & ~was).sum(-1).int())
        assert torch.equal(torch.where(was, slots, -1), torch.where(was, match.int().argmax(-1).int(), -1))
        if before is not None:
            inter = [[len(set(sel[i, h][valid[i, h]].tolist()) & set(before[i, h][before[i, h] >= 0].tolist()))
                      for h in range(hkv)] for i in range(2)]
            assert overlap.tolist() == inter
        before = sel


def test_random_walk_selections_are_distinct_in_range_and_keep_about_keep():
    sel = walk(30, [29, 40], 2, 8, keep=0.75, seed=3, pad=0.0, revisit=0.8)
    kept = 0
    for prev, cur in zip(sel, sel[1:]):
        for b, n in enumerate([29, 40]):
            for h in range(2):
                ids = cur[b, h].tolist()
                assert len(set(ids)) == len(ids) and all(0 <= x < n for x in ids)
                kept += len(set(ids) & set(prev[b, h].tolist()))
    assert 0.65 < kept / (29 * 2 * 2 * 8) < 0.85


def _engine_state(num_rows, hkv, r, kb, nblk, seed):
    g = torch.Generator().manual_seed(seed)
    tags, lu, prev = _state(num_rows, hkv, r, kb)
    prev_slots = torch.full_like(prev, -1)
    cache_pages = torch.randperm(num_rows * r + 5, generator=g)[: num_rows * r].view(num_rows, r).int().to(DEV)
    table = torch.randperm(num_rows * nblk + 7, generator=g)[: num_rows * nblk].view(num_rows, nblk).int().to(DEV)
    counters = torch.zeros(5, dtype=torch.int64, device=DEV)
    stamps = torch.tensor([0, 0], dtype=torch.int64, device=DEV)
    return [tags, lu, prev, prev_slots], cache_pages, table, counters, stamps


@pytest.mark.parametrize("r,kb", [(8, 8), (12, 5), (40, 16)])
def test_fused_layer_update_matches_reference(r, kb):
    """layer_update (update + prev_slots + compacted copy list in pages + telemetry counters, one launch) against
    its torch reference over a random walk, with and without the stall record."""
    num_rows, hkv, nblk = 6, 2, 53
    rows = torch.tensor([4, 0, 3], device=DEV)
    ref = _engine_state(num_rows, hkv, r, kb, nblk, seed=r)
    ker = _engine_state(num_rows, hkv, r, kb, nblk, seed=r)
    for t, sel in enumerate(walk(10, [nblk] * 3, hkv, kb, keep=0.6, seed=kb, revisit=0.5, device=DEV)):
        step = torch.tensor([t], dtype=torch.int32, device=DEV)
        for st in (ref, ker):
            st[4].copy_(torch.tensor([1000 + 7 * t, 1000 + 5 * t + (t % 3) * 9], device=DEV))  # landed, needed
        want = OR.layer_update(*ref[0][:4], rows, sel, step, *ref[1:], t % 2 == 1)
        got = kernel_layer_update(*ker[0][:4], rows, sel, step, *ker[1:], t % 2 == 1)
        for name, w, g in zip(("slots", "src_pages", "dst_pages", "overlap", "misses"), want, got):
            assert torch.equal(w, g), (t, name)
        for w, g in zip(ref[0] + [ref[3]], ker[0] + [ker[3]]):
            assert torch.equal(w, g), t
        # compacted: a row's misses first
        n = got[4]
        assert torch.equal((got[1] >= 0).sum(-1).int(), n) and torch.equal((got[2] >= 0).sum(-1).int(), n)
    assert int(ker[3][3]) == 10 and int(ker[3][4]) > 0


@pytest.mark.parametrize("bs,lens", [(8, (61, 113, 90)), (4, (7, 40, 33))])
def test_candidates_kernel_matches_reference(bs, lens):
    num_rows, hkv, r, kb = 5, 3, 9, 6
    g = torch.Generator().manual_seed(bs)
    rows = torch.tensor([3, 0, 4], device=DEV)
    prev = torch.full((num_rows, hkv, kb), -1, dtype=torch.int32)
    for i, n in zip(rows.tolist(), lens):
        for h in range(hkv):
            ids = torch.randperm(-(-n // bs), generator=g)[:kb].int()
            prev[i, h, : len(ids)] = ids
    prev[torch.rand(prev.shape, generator=g) < 0.2] = -1
    prev_slots = torch.where(prev >= 0, torch.randint(0, r, prev.shape, generator=g, dtype=torch.int32), -1)
    cache_pages = torch.randperm(num_rows * r + 3, generator=g)[: num_rows * r].view(num_rows, r).int()
    seq_lens = torch.tensor(lens, device=DEV)
    args = (prev.to(DEV), prev_slots.to(DEV), cache_pages.to(DEV), rows, seq_lens, bs)
    want = OR.resident_candidates(*args)
    got = kernel_candidates(*args)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert bool((got[0] < 0).any()) and bool((got[0] >= 0).any())


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_a_limited_layer_behaves_like_a_resident_set_of_that_size(impl):
    """limit_slots: a layer given n of R slots makes the same hits, copies and slots as a set of n slots (the
    kernel turns its PINNED marks back into the step: the unused slots must not carry that mark)."""
    from sglang_asynctls.offload.resident_set import ResidentSet

    kb, hkv, rows, steps = 6, 2, torch.arange(2), 12
    big = ResidentSet(2, 2, hkv, 3 * kb, kb, "cpu", impl=impl)
    big.limit_slots([kb, 3 * kb])  # layer 0 at r = 1, layer 1 at r = 3
    small = ResidentSet(1, 2, hkv, kb, kb, "cpu", impl=impl)
    big.admit(rows, torch.arange(2 * 3 * kb).view(2, -1))
    small.admit(rows, torch.arange(2 * 3 * kb).view(2, -1)[:, :kb])
    g = torch.Generator().manual_seed(3)
    table = torch.arange(2 * 40, dtype=torch.int32).view(2, 40)
    copies_r3 = 0
    for _ in range(steps):
        sel = torch.stack([torch.stack([torch.randperm(16, generator=g)[:kb] for _ in range(hkv)])
                           for _ in range(2)]).int()
        a, b = big.update(0, rows, sel, table), small.update(0, rows, sel, table)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        copies_r3 += int(big.update(1, rows, sel, table).misses.sum())
        big.advance(), small.advance()
        assert (big.tags[0, :, :, kb:] == -2).all()  # the slots layer 0 does not use never take a block
    assert copies_r3 < int(small._counters[0, 2])  # more slots, fewer copies: the limit is per layer
    with pytest.raises(ValueError, match="one limit in"):
        big.limit_slots([kb])
