"""IndexPool: prefill + decode maintenance equals a from-scratch index; radix-shared pages are never rewritten."""

import torch

from sglang_asynctls import reference as R
from sglang_asynctls.index import IndexPool, pages_to_rewrite, plan_extend

BS, HKV, D, DC = 16, 2, 32, 8


def paged_request(r2t, row, length, free_pages):
    """Give request `row` whole pages (page_size == block size), as SGLang's paged allocator does."""
    for j in range(-(-length // BS)):
        page = free_pages.pop(0)
        r2t[row, j * BS:(j + 1) * BS] = torch.arange(page * BS, (page + 1) * BS)


def test_pages_to_rewrite_skips_pages_inside_the_prefix():
    assert pages_to_rewrite([0], [40], BS) == [(0, 0), (0, 1), (0, 2)]
    assert pages_to_rewrite([32, 35], [40, 36], BS) == [(0, 2), (1, 2)]  # radix prefix 32 = two whole pages
    assert pages_to_rewrite([48], [48], BS) == []


def test_prefill_chunks_then_decode_match_a_fresh_index():
    g = torch.Generator().manual_seed(0)
    slots = 40 * BS
    k = torch.randn(slots, HKV, D, generator=g)
    r2t = torch.zeros(4, 256, dtype=torch.long)
    paged_request(r2t, 2, 120, list(range(3, 40, 2)))  # scattered pages
    channels = torch.stack([torch.randperm(D, generator=g)[:DC] for _ in range(HKV)])
    pool = IndexPool(1, slots, HKV, D, DC, BS, torch.float32, "cpu", channels[None])
    rpi = torch.tensor([2])
    for prefix, end in [(0, 37), (37, 100)]:  # chunked prefill
        plan = plan_extend(r2t, rpi, [prefix], [end], BS)
        pool.write_extend(0, k, r2t[2, prefix:end], plan)
    for n in range(101, 121):  # decode steps: the key of position n-1 was just written
        pool.write_decode(0, k, r2t[2, n - 1:n], torch.tensor([n]))
    seq_lens = torch.tensor([120])
    kmin, kmax, table, labels, scale = R.build_index(k, r2t, rpi, seq_lens, channels, BS)
    mine = pool.block_table(r2t, rpi, 8)
    for j in range(120 // BS):  # every complete block's min/max equals the fresh one
        assert torch.equal(pool.kmin[0][mine[0, j]], kmin[table[0, j]])
        assert torch.equal(pool.kmax[0][mine[0, j]], kmax[table[0, j]])
    used = r2t[2, :120]
    assert torch.equal(pool.labels[0][used], labels[used]) and torch.equal(pool.label_scale[0][used], scale[used])
    q = torch.randn(1, 4, D, generator=g)
    a = R.block_scores(q, pool.kmin[0], pool.kmax[0], mine, seq_lens, BS)
    b = R.block_scores(q, kmin, kmax, table, seq_lens, BS)
    torch.testing.assert_close(a, b)


def test_second_turn_reuses_the_shared_prefix_index():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(20 * BS, HKV, D, generator=g)
    r2t = torch.zeros(3, 128, dtype=torch.long)
    paged_request(r2t, 0, 70, [5, 2, 9, 11, 7])
    pool = IndexPool(1, 20 * BS, HKV, D, DC, BS, torch.float32, "cpu")
    pool.write_extend(0, k, r2t[0, :70], plan_extend(r2t, torch.tensor([0]), [0], [70], BS))
    before = pool.kmin[0].clone()
    # turn 2: the radix cache hands over the first 64 tokens (4 whole pages); new pages follow
    r2t[1, :64] = r2t[0, :64]
    r2t[1, 64:96] = torch.arange(13 * BS, 15 * BS)
    plan = plan_extend(r2t, torch.tensor([1]), [64], [96], BS)
    assert plan.num_pages == 2 and set(plan.page_ids.tolist()) == {13, 14}
    pool.write_extend(0, k, r2t[1, 64:96], plan)
    shared = [5, 2, 9, 11]
    assert torch.equal(pool.kmin[0][shared], before[shared])  # untouched, still right
    t1 = pool.block_table(r2t, torch.tensor([1]), 6)
    assert t1[0, :4].tolist() == shared


def test_channels_ranked_by_key_magnitude_without_a_calibration_file():
    k = torch.randn(16 * BS, HKV, D) * 0.1
    k[:, 0, 7] = 5.0
    k[:, 1, 3] = -6.0
    pool = IndexPool(2, 16 * BS, HKV, D, DC, BS, torch.float32, "cpu")
    r2t = torch.arange(16 * BS)[None]
    pool.write_extend(1, k, r2t[0, :40], plan_extend(r2t, torch.tensor([0]), [0], [40], BS))  # too short: wait
    assert pool.channels_ready == [False, False]
    pool.write_extend(1, k, r2t[0, :256], plan_extend(r2t, torch.tensor([0]), [0], [256], BS))
    assert pool.channels[1, 0, 0] == 7 and pool.channels[1, 1, 0] == 3
    assert pool.channels_ready == [False, True]


def test_per_request_rows_plan_every_block_of_the_request():
    """Page size 1 (max_blocks > 0): a prefill rewrites every block of its request, the radix-shared prefix's
    included, into rows req_pool_index * max_blocks + block; the page plan keeps skipping the prefix's pages."""
    assert pages_to_rewrite([40], [70], 16, whole_request=True) == [(0, j) for j in range(5)]
    r2t = torch.randperm(256).to(torch.int32).view(2, 128)  # scattered slots
    plan = plan_extend(r2t, torch.tensor([1]), [40], [70], 16, max_blocks=8)
    assert plan.page_ids.tolist() == [8, 9, 10, 11, 12]
    assert torch.equal(plan.page_slots[4, :6], r2t[1, 64:70].long()) and (plan.page_slots[4, 6:] == -1).all()
    pool = IndexPool(1, 256, 2, 4, 2, 16, torch.float32, "cpu", torch.zeros(1, 2, 2, dtype=torch.long),
                     request_rows=(2, 8))
    assert pool.kmin[0].shape[0] == 16
    assert pool.block_table(r2t, torch.tensor([1, 0]), 5).tolist() == [[8, 9, 10, 11, 12], [0, 1, 2, 3, 4]]
