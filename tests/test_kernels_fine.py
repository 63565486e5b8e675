"""Fine level kernels vs reference: token_scores, select_tokens, fine_select (fused)."""

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.decode_step import fine_select, fine_select_candidates
from sglang_asynctls.kernels.select_tokens import select_token_slots, select_tokens
from sglang_asynctls.kernels.token_scores import token_scores

from kernel_cases import KEY_RTOL, SHAPES, assert_topk_set, make_cache

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SINK, WINDOW = 4, 6
# an MLA-like group wider than FOLD_COMBINE_MAX_GROUP (the default then recomputes the logits), with tl.dot labels
WIDE = dict(hq=20, hkv=1, d=80, dv=64, dc=32, mla=True)


def _candidates(c, budget):
    kmin, kmax, table, _, _ = c["index"]
    blocks = R.coarse_select(c["q"], kmin, kmax, table, c["seq_lens"], block_size=c["bs"], block_budget=budget,
                             sink_tokens=SINK, local_window=WINDOW)
    return blocks, R.candidate_positions(blocks, c["seq_lens"], c["bs"])


def _ref_scores(c, positions):
    _, _, _, labels, scale = c["index"]
    return R.token_scores(c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], positions, c["sm_scale"])


def _priority(scores, positions, seq_lens):
    lens = seq_lens[:, None, None]
    forced = (positions >= 0) & ((positions < SINK) | (positions >= lens - WINDOW))
    return scores.masked_fill(forced, float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ["gqa", "mha", "mla"])
def test_token_scores_match_reference(shape, dtype):
    c = make_cache([27, 61, 113], **SHAPES[shape], dtype=dtype, device=DEV)
    _, positions = _candidates(c, 5)
    positions = positions[..., torch.randperm(positions.shape[2], generator=torch.Generator().manual_seed(1))]
    _, _, _, labels, scale = c["index"]
    s = token_scores(c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], positions, c["sm_scale"])
    r = _ref_scores(c, positions)
    assert torch.equal(s.isinf(), r.isinf())
    torch.testing.assert_close(s[r.isfinite()], r[r.isfinite()], rtol=1e-4, atol=1e-6)
    out = torch.empty_like(s)
    token_scores(c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], positions, c["sm_scale"], out=out)
    assert torch.equal(out, s)


@pytest.mark.parametrize("key_bits", [16, 31])
@pytest.mark.parametrize("budget", [1, 9, 20, 300])
def test_select_tokens_is_a_top_k_with_forced_tokens(budget, key_bits):
    c = make_cache([27, 61, 2047], **SHAPES["gqa"], device=DEV)
    _, positions = _candidates(c, 12)
    scores = torch.round(_ref_scores(c, positions) * 64) / 64  # ties
    scores[0, 1] = -scores[0, 1]  # negative scores: the sign step of the search
    picked = select_tokens(scores, positions, c["seq_lens"], budget, SINK, WINDOW, key_bits=key_bits)
    assert picked.shape == (3, 2, budget) and picked.dtype == torch.int64
    assert_topk_set(picked, positions, _priority(scores, positions, c["seq_lens"]), budget,
                    rtol=KEY_RTOL if key_bits < 31 else 0.0)
    out = torch.empty_like(picked)
    assert select_tokens(scores, positions, c["seq_lens"], budget, SINK, WINDOW, out=out) is out


@pytest.mark.parametrize("shape", ["gqa", "mha", "mla"])
@pytest.mark.parametrize("budget", [7, 64])
def test_fine_select_picks_a_top_k_of_the_reference_scores(shape, budget):
    c = make_cache([27, 61, 113], **SHAPES[shape], device=DEV)
    blocks, positions = _candidates(c, 6)
    _, _, _, labels, scale = c["index"]
    kw = dict(token_budget=budget, sink_tokens=SINK, local_window=WINDOW, sm_scale=c["sm_scale"])
    args = (c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], c["seq_lens"])
    slots = fine_select(*args, positions, **kw)
    from_blocks = fine_select_candidates(*args, blocks, block_size=c["bs"], **kw)
    assert slots.dtype == torch.int32 and slots.shape == (3, positions.shape[1], budget)
    pri = _priority(_ref_scores(c, positions), positions, c["seq_lens"])
    cand_slots = R.positions_to_slots(positions, c["r2t"], c["rows"])
    assert_topk_set(slots, cand_slots, pri, budget, tol=1e-6)
    assert_topk_set(from_blocks, cand_slots, pri, budget, tol=1e-6)


@pytest.mark.parametrize("shape", ["gqa", "mha", "mla", "wide"])
def test_every_combine_picks_a_top_k_of_the_reference_scores(shape):
    """fine_select_candidates with the group-mean softmax folded into the top-Kt kernel or in `token_scores`' own
    launch: each a top-k of the reference scores."""
    c = make_cache([27, 61, 113], **(WIDE if shape == "wide" else SHAPES[shape]), device=DEV)
    blocks, positions = _candidates(c, 6)
    _, _, _, labels, scale = c["index"]
    kw = dict(token_budget=9, sink_tokens=SINK, local_window=WINDOW, sm_scale=c["sm_scale"], block_size=c["bs"])
    args = (c["q"], labels, scale, c["channels"], c["r2t"], c["rows"], c["seq_lens"], blocks)
    pri = _priority(_ref_scores(c, positions), positions, c["seq_lens"])
    cand_slots = R.positions_to_slots(positions, c["r2t"], c["rows"])
    for combine in (None, "fold", "logits"):
        assert_topk_set(fine_select_candidates(*args, combine=combine, **kw), cand_slots, pri, 9, tol=1e-6)


def test_select_token_slots_from_blocks_is_a_top_k():
    """The top-Kt with the slot lookup over candidates given as block ids."""
    c = make_cache([27, 61, 2047], **SHAPES["gqa"], device=DEV)
    blocks, positions = _candidates(c, 12)
    scores = _ref_scores(c, positions)
    slots = select_token_slots(scores, blocks, c["r2t"], c["rows"], c["seq_lens"], block_size=c["bs"],
                               token_budget=40, sink_tokens=SINK, local_window=WINDOW)
    cand_slots = R.positions_to_slots(positions, c["r2t"], c["rows"])
    assert_topk_set(slots, cand_slots, _priority(scores, positions, c["seq_lens"]), 40)
