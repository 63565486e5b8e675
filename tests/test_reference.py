"""Properties of the pure-torch reference (the spec every kernel is held to)."""

import pytest
import torch

import kernel_cases
from sglang_asynctls import reference as R
from sglang_asynctls.calibrate import calibrate_channels
from sglang_asynctls.config import layer_budgets, layer_candidate_budgets


def make_cache(lens, hq, hkv, d, dv=None, dc=8, bs=16, mla=False, dtype=torch.float64, seed=0):
    """The kernel tests' permuted-slot cache, in float64 and 16-token blocks for exact reference checks."""
    return kernel_cases.make_cache(lens, hq, hkv, d, dv=dv, dc=dc, bs=bs, mla=mla, dtype=dtype, seed=seed)


def run(method, c, **budgets):
    kmin, kmax, table, labels, scale = c["index"]
    return R.METHODS[method](c["q"], c["k"], c["v"], c["r2t"], c["rows"], c["seq_lens"], kmin, kmax, table,
                             labels, scale, c["channels"], sm_scale=c["q"].shape[-1] ** -0.5, **budgets)


SHAPES = {"gqa": dict(hq=8, hkv=2, d=32), "mha": dict(hq=4, hkv=4, d=16),
          "mla": dict(hq=5, hkv=1, d=40, dv=32, dc=16, mla=True)}


def test_gemm_form_equals_quest_elementwise_form():
    c = make_cache([27, 61, 113], **SHAPES["gqa"])
    kmin, kmax, table, _, _ = c["index"]
    a = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16)
    b = R.quest_block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16)
    assert torch.equal(a.isinf(), b.isinf())
    torch.testing.assert_close(a[a.isfinite()], b[b.isfinite()], rtol=1e-12, atol=1e-9)
    assert a.isfinite().sum() == (c["seq_lens"] // 16).sum() * 2  # complete blocks x KV heads


def test_block_bound_is_never_below_the_true_max():
    c = make_cache([113, 64], **SHAPES["gqa"])
    kmin, kmax, table, _, _ = c["index"]
    scores = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16)
    for b, n in enumerate(c["seq_lens"].tolist()):
        for j in range(n // 16):
            keys = c["k"][c["r2t"][c["rows"][b], j * 16:(j + 1) * 16].long()]  # [BS, Hkv, D]
            qk = torch.einsum("hgd,thd->hgt", c["q"][b].view(2, 4, 32), keys)
            assert (scores[b, :, j] >= qk.amax(dim=2).sum(dim=1) - 1e-9).all()


def test_bound_slack_scales_the_half_range_term():
    c = make_cache([27, 61, 113], **SHAPES["gqa"])
    kmin, kmax, table, _, _ = c["index"]
    bound = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16)
    assert torch.equal(R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16, 1.0), bound)
    qg = c["q"].view(3, 2, 4, 1, 32)
    e = table.long().clamp(min=0)
    centre = ((kmax + kmin) / 2)[e].permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, NB, D]
    half = ((kmax - kmin) / 2)[e].permute(0, 2, 1, 3)[:, :, None]
    prev = bound
    for s in (0.75, 0.5, 0.0):
        got = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16, s)
        want = (qg * centre + s * qg.abs() * half).sum(dim=(2, 4))
        fin = got.isfinite()
        assert torch.equal(fin, bound.isfinite())
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-12, atol=1e-9)
        assert (got[fin] <= prev[fin] + 1e-12).all() and (got[fin] < prev[fin]).any()  # the slack only shrinks
        prev = got


def test_bound_slack_prefers_an_aligned_block_over_a_wide_envelope():
    # block 1 holds one key aligned with q; block 2 spans +-3 in every channel (its bound is larger, its keys
    # are not aligned); blocks 0 and 3 are forced (sink / open), one free block fits the budget
    q = torch.ones(1, 2, 8, dtype=torch.float64)
    k = torch.zeros(70, 1, 8, dtype=torch.float64)
    k[20, 0] = 2.5  # bound 8 * 2.5 = 20 < 24 = block 2's; at slack 0.5: 15 > 12
    k[32:48:2, 0] = torch.eye(8, dtype=torch.float64) * 3
    k[33:49:2, 0] = -torch.eye(8, dtype=torch.float64) * 3
    r2t, rows, lens = torch.arange(70, dtype=torch.int32)[None], torch.zeros(1, dtype=torch.long), torch.tensor([70])
    kmin, kmax, table, _, _ = R.build_index(k, r2t, rows, lens, torch.arange(8)[None], 16)
    budget = dict(block_size=16, block_budget=3, sink_tokens=1, local_window=1)
    exact = R.coarse_select(q, kmin, kmax, table, lens, **budget)[0, 0].tolist()
    slack = R.coarse_select(q, kmin, kmax, table, lens, bound_slack=0.5, **budget)[0, 0].tolist()
    assert sorted(exact) == [0, 2, 4] and sorted(slack) == [0, 1, 4]


def test_group_max_is_the_per_head_bound_maxed_and_never_below_the_true_max():
    c = make_cache([27, 113, 64], **SHAPES["gqa"])
    kmin, kmax, table, _, _ = c["index"]
    for s in (1.0, 0.5):
        got = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16, s, "max")
        per_head = [R.block_scores(c["q"][:, h::4].repeat_interleave(4, dim=1) / 4, kmin, kmax, table,
                                   c["seq_lens"], 16, s) for h in range(4)]  # each head alone, as a group of 4
        fin = got.isfinite()
        torch.testing.assert_close(got[fin], torch.stack(per_head).amax(0)[fin], rtol=1e-12, atol=1e-9)
    bound = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16, 1.0, "max")
    for b, n in enumerate(c["seq_lens"].tolist()):
        for j in range(n // 16):
            keys = c["k"][c["r2t"][c["rows"][b], j * 16:(j + 1) * 16].long()]
            qk = torch.einsum("hgd,thd->hgt", c["q"][b].view(2, 4, 32), keys)
            assert (bound[b, :, j] >= qk.amax(dim=(1, 2)) - 1e-9).all()
    with pytest.raises(ValueError, match="group_score"):
        R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], 16, 1.0, "mean")


def test_group_max_keeps_one_heads_needle_that_the_sum_outvotes():
    # head 0 sees 10 in block 1 and 6 in block 2, head 1 sees 0 and 6: the sum prefers block 2, the max block 1
    q = torch.zeros(1, 2, 8, dtype=torch.float64)
    q[0, 0, 0] = q[0, 1, 1] = 1.0
    k = torch.zeros(70, 1, 8, dtype=torch.float64)
    k[20, 0, 0] = 10.0
    k[36, 0, 0] = k[38, 0, 1] = 6.0
    r2t, rows, lens = torch.arange(70, dtype=torch.int32)[None], torch.zeros(1, dtype=torch.long), torch.tensor([70])
    kmin, kmax, table, _, _ = R.build_index(k, r2t, rows, lens, torch.arange(8)[None], 16)
    budget = dict(block_size=16, block_budget=3, sink_tokens=1, local_window=1)
    by_sum = R.coarse_select(q, kmin, kmax, table, lens, **budget)[0, 0].tolist()
    by_max = R.coarse_select(q, kmin, kmax, table, lens, group_score="max", **budget)[0, 0].tolist()
    assert sorted(by_sum) == [0, 2, 4] and sorted(by_max) == [0, 1, 4]


def test_kmin_kmax_bracket_every_key():
    c = make_cache([61], **SHAPES["mha"])
    kmin, kmax, table, _, _ = c["index"]
    for j in range(61 // 16):
        keys = c["k"][c["r2t"][1, j * 16:(j + 1) * 16].long()]
        e = int(table[0, j])
        assert torch.equal(keys.amin(0), kmin[e]) and torch.equal(keys.amax(0), kmax[e])
    assert (table[0, 61 // 16:] == -1).all()  # the open block has no entry


@pytest.mark.parametrize("budget", [4, 5, 9])
def test_block_selection_respects_budget_and_forces_sink_window_open(budget):
    c = make_cache([27, 113, 200], **SHAPES["gqa"])
    kmin, kmax, table, _, _ = c["index"]
    sink, window, bs = 16, 20, 16
    scores = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], bs)
    ids = R.select_blocks(scores, c["seq_lens"], bs, budget, sink, window)
    assert ids.shape == (3, 2, budget)
    forced = R.forced_block_mask(c["seq_lens"], scores.shape[2], bs, sink, window)
    for b, n in enumerate(c["seq_lens"].tolist()):
        nblocks = -(-n // bs)
        for h in range(2):
            got = [i for i in ids[b, h].tolist() if i >= 0]
            assert len(got) == len(set(got)) == min(budget, nblocks)
            must = set(forced[b].nonzero().flatten().tolist())
            assert must <= set(got)
            assert {0, nblocks - 1} <= set(got)  # sink block and open block
            rest = [j for j in got if j not in must]
            others = [j for j in range(nblocks) if j not in got and j not in must]
            if rest and others:  # every kept free block outscores every dropped one
                assert min(scores[b, h, rest]) >= max(scores[b, h, others])


def test_token_selection_respects_budget_and_forces_sinks_and_window():
    c = make_cache([113, 200], **SHAPES["gqa"])
    kmin, kmax, table, labels, scale = c["index"]
    sink, window, budget = 5, 11, 40
    blocks = R.coarse_select(c["q"], kmin, kmax, table, c["seq_lens"], block_size=16, block_budget=6,
                             sink_tokens=sink, local_window=window)
    pos = R.candidate_positions(blocks, c["seq_lens"], 16)
    scores = R.token_scores(c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], pos, 32 ** -0.5)
    picked = R.select_tokens(scores, pos, c["seq_lens"], budget, sink, window)
    for b, n in enumerate(c["seq_lens"].tolist()):
        for h in range(2):
            got = [p for p in picked[b, h].tolist() if p >= 0]
            assert len(got) == len(set(got)) == budget
            assert set(range(sink)) | set(range(n - window, n)) <= set(got)
            assert all(0 <= p < n for p in got)
            cand = set(pos[b, h].tolist()) - {-1}
            assert set(got) <= cand


def test_token_scores_are_a_group_mean_of_distributions():
    c = make_cache([113], **SHAPES["gqa"])
    _, _, _, labels, scale = c["index"]
    pos = R.all_positions(c["seq_lens"], 2)
    s = R.token_scores(c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], pos, 0.3)
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 2, dtype=torch.float32))
    assert (s >= 0).all()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("method", ["quest", "token_only", "asynctls"])
def test_budgets_covering_the_context_equal_dense(shape, method):
    c = make_cache([27, 61, 113], **SHAPES[shape])
    budgets = dict(block_size=16, block_budget=8, token_budget=8 * 16, sink_tokens=3, local_window=7)
    dense = run("dense", c, **budgets)
    torch.testing.assert_close(run(method, c, **budgets), dense, rtol=1e-10, atol=1e-10)


def test_mla_shapes_values_read_from_the_latent():
    c = make_cache([61, 27], **SHAPES["mla"])
    budgets = dict(block_size=16, block_budget=3, token_budget=20, sink_tokens=2, local_window=4)
    out = run("asynctls", c, **budgets)
    assert out.shape == (2, 5, 32) and out.dtype == torch.float64
    assert c["v"].data_ptr() == c["k"].data_ptr()  # values are a view of the latent keys
    assert not torch.allclose(out, run("dense", c, **budgets))  # a real budget changes the result


def test_sparse_finds_a_planted_needle():
    c = make_cache([500], hq=4, hkv=1, d=32, dc=8, bs=16, seed=3)
    # plant a key aligned with the (shared) query at position 333, far from sink and window
    c["q"][0] = c["q"][0, 0]
    slot = int(c["r2t"][1, 333])
    c["k"][slot, 0] = c["q"][0, 0] * 2
    c["v"][slot, 0] = 50.0
    c["index"] = R.build_index(c["k"], c["r2t"], c["rows"], c["seq_lens"], c["channels"], 16)
    budgets = dict(block_size=16, block_budget=6, token_budget=40, sink_tokens=4, local_window=16)
    dense, sparse = run("dense", c, **budgets), run("asynctls", c, **budgets)
    assert (dense > 45).all()  # the needle dominates dense attention...
    torch.testing.assert_close(sparse, dense, rtol=0.02, atol=0.5)  # ...and the two-level selection keeps it


def test_int4_labels_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(257, 3, 64, generator=g) * torch.logspace(-2, 1, 64)
    keys[5] = 0.0  # an all-zero row must not divide by zero
    channels = torch.stack([torch.randperm(64, generator=g)[:32] for _ in range(3)])
    packed, scale = R.quantize_labels(keys, channels)
    assert packed.dtype == torch.uint8 and packed.shape == (257, 3, 16) and scale.shape == (257, 3)
    deq = R.dequantize_labels(packed, scale)
    want = torch.gather(keys, 2, channels[None].expand(257, -1, -1))
    assert ((deq - want).abs() <= scale[..., None] / 2 + 1e-6).all()
    assert (deq[5] == 0).all()


def test_int4_nibble_layout():
    keys = torch.zeros(1, 1, 4)
    keys[0, 0] = torch.tensor([7.0, -7.0, 1.0, 0.0])
    packed, scale = R.quantize_labels(keys, torch.tensor([[0, 1, 2, 3]]))
    assert scale.item() == 1.0
    assert packed[0, 0].tolist() == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]


def test_calibration_picks_planted_heavy_channels():
    q_absmax = torch.ones(6, 16)
    k_absmax = torch.ones(2, 16)
    q_absmax[0:3, 5] = 10  # group 0's heads
    k_absmax[0, 9] = 4
    q_absmax[3, 2] = 30    # only one head of group 1: the group mean still ranks it first
    chosen = calibrate_channels(q_absmax, k_absmax, 2)
    assert chosen[0].tolist() == [5, 9] and chosen[1, 0].item() == 2


def test_candidate_blocks_override_is_used():
    c = make_cache([200], **SHAPES["gqa"])
    kmin, kmax, table, labels, scale = c["index"]
    budgets = dict(block_size=16, block_budget=4, token_budget=40, sink_tokens=2, local_window=4)
    blocks = R.coarse_select(c["q"], kmin, kmax, table, c["seq_lens"], block_size=16, block_budget=4,
                             sink_tokens=2, local_window=4)
    same = run("asynctls", c, **budgets, candidate_blocks=blocks)
    torch.testing.assert_close(same, run("asynctls", c, **budgets))
    other = torch.full_like(blocks, -1)
    other[..., 0] = 12  # only the open block: attends over its 8 tokens alone
    assert not torch.allclose(run("asynctls", c, **budgets, candidate_blocks=other), same)


def test_layer_budgets_move_budget_between_layers_at_the_same_mean():
    assert layer_budgets(256, 4, {}) == [256] * 4
    assert layer_budgets(256, 4, {0: 2.5}) == [640, 128, 128, 128]  # (1024 - 640) / 3
    budgets = layer_budgets(100, 30, {0: 4, 2: 1.5})
    assert budgets[0] == 400 and budgets[2] == 150 and sum(budgets) <= 3000 and sum(budgets) > 3000 - 28
    # a schedule changes only the k_t a layer's call gets: with k_t = every candidate, AsyncTLS is Quest's kept set
    c = make_cache([113, 64], **SHAPES["gqa"])
    budgets = dict(block_size=16, block_budget=4, sink_tokens=4, local_window=8)
    full = run("asynctls", c, token_budget=64, **budgets)
    torch.testing.assert_close(full, run("quest", c, token_budget=64, **budgets), rtol=1e-9, atol=1e-9)


def test_fidelity_budget_gives_asynctls_alone_its_per_layer_budgets():
    from sglang_asynctls import fidelity as fd

    budget = fd.Budget.fraction_of(2048, 8, layer_scale={0: 4}, num_layers=30)  # k_t 256, k_b 16
    assert budget.layer_budgets[0] == (1024, 64) and budget.layer_budgets[5] == ((30 * 256 - 1024) // 29, 14)
    assert sum(kt for kt, _ in budget.layer_budgets) <= 30 * 256
    more = fd.Budget.fraction_of(2048, 8, candidate_scale={3: 2}, num_layers=30)
    assert more.kwargs("asynctls", 3)["block_budget"] == 32 and more.kwargs("asynctls", 4)["block_budget"] == 16
    assert more.kwargs("asynctls", 3)["token_budget"] == more.kwargs("asynctls", 4)["token_budget"] == 256
    assert layer_candidate_budgets([16, 16, 14], {1: 2, 2: 1.5}) == [16, 32, 21]
    assert (budget.kwargs("asynctls", 0)["token_budget"], budget.kwargs("asynctls", 0)["block_budget"]) == (1024, 64)
    assert budget.kwargs("asynctls", 5)["token_budget"] == (30 * 256 - 1024) // 29
    assert budget.kwargs("asynctls")["token_budget"] == 256  # no layer: the average
    assert budget.kwargs("token_only", 0)["token_budget"] == budget.kwargs("quest", 0)["token_budget"] == 256
