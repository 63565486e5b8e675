"""Coarse level kernels vs reference: block_scores, select_blocks."""

import importlib

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.kernels.block_scores import block_scores
from sglang_asynctls.kernels.select_blocks import select_blocks

from kernel_cases import GPU_SHAPES, KEY_RTOL, SHAPES, TOL, assert_topk_set, make_cache

select_blocks_module = importlib.import_module("sglang_asynctls.kernels.select_blocks")  # NARROW_BITS

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("slack, group", [(1.0, "sum"), (0.5, "sum"), (1.0, "max"), (0.5, "max")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ["gqa", "mha", "mla"])
def test_block_scores_match_reference(shape, dtype, slack, group):
    c = make_cache([27, 61, 113], **SHAPES[shape], dtype=dtype, device=DEV)
    kmin, kmax, table, _, _ = c["index"]
    s = block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], slack, group)
    r = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], slack, group)
    assert torch.equal(s.isinf(), r.isinf())
    torch.testing.assert_close(s[r.isfinite()], r[r.isfinite()], rtol=1e-5, atol=1e-4)
    out = torch.empty_like(s)
    assert block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], slack, group, out=out) is out


def _check_block_scores(c, slack, group, **launch):
    kmin, kmax, table, _, _ = c["index"]
    s = block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], slack, group, **launch)
    r = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], slack, group)
    assert torch.equal(s.isinf(), r.isinf())
    torch.testing.assert_close(s[r.isfinite()], r[r.isfinite()], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_n", [8, 16, 0])
@pytest.mark.parametrize("slack, group", [(1.0, "sum"), (0.5, "sum"), (0.5, "max")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_block_scores_model_shapes_and_tile_widths(shape, dtype, slack, group, block_n):
    """Model head shapes (MLA latent 576 = 512 + 64 with 20 heads, Qwen3-8B GQA) with tiles of several widths (a
    last tile only partly filled) and lengths shorter than a block, ending on a block edge and inside one. Block
    size 8: 38 blocks."""
    c = make_cache([5, 61, 64, 300], **GPU_SHAPES[shape], dtype=dtype, device=DEV)
    _check_block_scores(c, slack, group, block_n=block_n)


def test_block_scores_launch_shape():
    """One 64-block tile per program: GQA at 8 warps, MLA at 4 in 128-channel chunks (the H100's measured shapes)."""
    module = importlib.import_module("sglang_asynctls.kernels.block_scores")
    assert module._launch_shape(128, 0, 0) == (64, 128, 8)
    assert module._launch_shape(576, 0, 0) == (64, 128, 4)

def test_block_scores_group_max_differs_from_sum_and_bounds_each_head():
    """"max" is not "sum" in disguise: per block it is the largest head's bound, so it never exceeds the sum of
    the (non-negative part of the) heads' bounds and is at least each head's own bound."""
    c = make_cache([61, 113], **SHAPES["gqa"], device=DEV)
    kmin, kmax, table, _, _ = c["index"]
    s_max = block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], 1.0, "max")
    s_sum = block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], 1.0, "sum")
    fin = s_sum.isfinite()
    assert not torch.allclose(s_max[fin], s_sum[fin])
    g = SHAPES["gqa"]["hq"] // SHAPES["gqa"]["hkv"]
    for h in range(g):  # one query head per group alone: its bound is below the group max
        q1 = c["q"].view(2, -1, g, c["q"].shape[2])[:, :, h:h + 1].reshape(2, -1, c["q"].shape[2])
        one = R.block_scores(q1, kmin, kmax, table, c["seq_lens"], c["bs"])
        assert bool((one[fin] <= s_max[fin] + 1e-4).all())


def _check_select_blocks(scores, seq_lens, bs, budget, sink, window, key_bits=16):
    ids = select_blocks(scores, seq_lens, bs, budget, sink, window, key_bits=key_bits)
    assert ids.shape == (*scores.shape[:2], budget) and ids.dtype == torch.int32
    nb = scores.shape[2]
    forced = R.forced_block_mask(seq_lens, nb, bs, sink, window)[:, None, :].expand_as(scores)
    pri = scores.masked_fill(forced, float("inf"))
    cand = torch.arange(nb, device=scores.device).expand_as(scores)
    assert_topk_set(ids, cand, pri, budget, rtol=KEY_RTOL if key_bits < 31 else 0.0)
    return ids


@pytest.mark.parametrize("key_bits", [16, 31])
@pytest.mark.parametrize("budget", [1, 3, 7, 40])
def test_select_blocks_is_a_top_k_with_forced_blocks(budget, key_bits):
    lens = torch.tensor([27, 61, 113, 2047])
    g = torch.Generator().manual_seed(budget)
    scores = torch.round(torch.randn(4, 2, 2047 // 8 + 1, generator=g) * 4) / 4  # many ties
    scores = scores.masked_fill(torch.arange(scores.shape[2]) >= (lens // 8)[:, None, None], float("-inf"))
    _check_select_blocks(scores.to(DEV), lens.to(DEV), 8, budget, 4, 12, key_bits)


def test_select_blocks_at_the_benchmark_scale():
    """Top-128 of 1,536 blocks of 64 (96k tokens), sink 64 and window 128 forced; a row ending inside a block."""
    lens = torch.tensor([98304, 50017])
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 1, 1536, generator=g) * 30 + 300
    scores = scores.masked_fill(torch.arange(1536) >= (lens // 64)[:, None, None], float("-inf"))
    ids = _check_select_blocks(scores.to(DEV), lens.to(DEV), 64, 128, 64, 128)
    assert bool((ids >= 0).all()) and bool((ids[0, 0] == 1535).any()) and bool((ids[1, 0] == 50017 // 64).any())


def _keyed_top_k(scores, forced, budget, key_bits):
    """The kernel's documented choice: keys at key_bits + 1 bits (forced = +inf), the `budget` largest valid keys,
    ties to the lower block id; sorted ids per row."""
    bits = scores.float().cpu().contiguous().view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> (31 - key_bits)
    key = key.long().masked_fill(forced.cpu(), 1 << 40)
    valid = forced.cpu() | (scores.cpu() > float("-inf"))
    out = []
    for k, v in zip(key.view(-1, key.shape[-1]), valid.view(-1, key.shape[-1])):
        out.append(sorted(sorted((i for i in range(len(k)) if v[i]), key=lambda i: (-int(k[i]), i))[:budget]))
    return out


@pytest.mark.parametrize("narrow_bits", [0, 8])
@pytest.mark.parametrize("key_bits", [16, 31])
@pytest.mark.parametrize("regime", ["narrow_ties", "span_254", "span_255", "wide", "all_forced"])
def test_select_blocks_is_exactly_the_keyed_top_k(regime, key_bits, narrow_bits, monkeypatch):
    """Rows whose scores span few key steps take a shorter threshold search (select_blocks.NARROW_BITS); the set
    must be the same as the full search's: scores in [256, 512) are one key step apart every 1.0 at 16 bits, so
    span_254 is the widest row searched narrowly and span_255 the narrowest searched in full."""
    nb, bs = 300, 8
    lens = torch.tensor([nb * bs, nb * bs - 5, 37, 3])
    g = torch.Generator().manual_seed(7)
    if regime == "narrow_ties":
        scores = 300 + torch.round(torch.randn(4, 2, nb, generator=g) * 8) / 4
    elif regime.startswith("span"):
        scores = 256 + (torch.randperm(nb, generator=g) % (int(regime[-3:]) + 1)).float().expand(4, 2, nb)
    elif regime == "wide":
        scores = torch.randn(4, 2, nb, generator=g) * 100
    else:
        scores = torch.full((4, 2, nb), float("-inf"))
    scores = scores.masked_fill(torch.arange(nb) >= (lens // bs)[:, None, None], float("-inf"))
    sink, window = (16, 32) if regime != "all_forced" else (nb * bs, 0)
    forced = R.forced_block_mask(lens, nb, bs, sink, window)[:, None, :].expand_as(scores)
    monkeypatch.setattr(select_blocks_module, "NARROW_BITS", narrow_bits)  # 0: the full search only
    for budget in (1, 7, 40):
        ids = select_blocks(scores.to(DEV), lens.to(DEV), bs, budget, sink, window, key_bits=key_bits).cpu()
        got = [sorted(i for i in row.tolist() if i >= 0) for row in ids.view(-1, budget)]
        assert got == _keyed_top_k(scores, forced, budget, key_bits), (regime, budget)


def test_select_blocks_budget_covering_everything_keeps_every_block():
    c = make_cache([27, 61, 113], **SHAPES["gqa"], device=DEV)
    kmin, kmax, table, _, _ = c["index"]
    s = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"])
    ids = _check_select_blocks(s, c["seq_lens"], c["bs"], 20, 4, 8)
    nblocks = -(-c["seq_lens"] // c["bs"])
    assert torch.equal((ids >= 0).sum(dim=2).cpu(), nblocks[:, None].expand(-1, 2).cpu())
    out = torch.empty_like(ids)
    assert select_blocks(s, c["seq_lens"], c["bs"], 20, 4, 8, out=out) is out and torch.equal(out, ids)


@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_coarse_select_with_slack_and_group_max_is_a_top_k_of_those_scores(shape):
    """The server passes --asynctls-bound-slack / --asynctls-group-score down to the kernels' coarse stage."""
    from sglang_asynctls.decode_step import coarse_select

    c = make_cache([61, 113, 2047], **SHAPES[shape], device=DEV)
    kmin, kmax, table, _, _ = c["index"]
    blocks = coarse_select(c["q"], kmin, kmax, table, c["seq_lens"], block_size=c["bs"], block_budget=9,
                           sink_tokens=4, local_window=8, bound_slack=0.5, group_score="max")
    scores = R.block_scores(c["q"], kmin, kmax, table, c["seq_lens"], c["bs"], 0.5, "max")
    forced = R.forced_block_mask(c["seq_lens"], scores.shape[2], c["bs"], 4, 8)[:, None, :].expand_as(scores)
    cand = torch.arange(scores.shape[2], device=scores.device).expand_as(scores)
    assert_topk_set(blocks, cand, scores.masked_fill(forced, float("inf")), 9, tol=1e-4)

