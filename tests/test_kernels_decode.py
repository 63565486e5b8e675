"""Whole GPU decode steps vs reference: asynctls (fused chain), quest, token-only, dense."""

import importlib

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls import decode_step as K
from sglang_asynctls.kernels.candidate_slots import candidate_slots

from kernel_cases import GPU_SHAPES, SHAPES, TOL, assert_topk_set, make_cache, method_args

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BUDGETS = dict(block_budget=5, token_budget=20, sink_tokens=4, local_window=6)


def _kw(c, **budgets):
    return dict(block_size=c["bs"], sm_scale=c["sm_scale"], **{**BUDGETS, **budgets})


def _check_asynctls(c, kw, tol):
    """The chain's slots are a valid two-level selection and its output is exact attention over them."""
    args = method_args(c)
    q, kmin, kmax, table = c["q"], *c["index"][:3]
    lens, bs = c["seq_lens"], c["bs"]
    sel = dict(block_size=bs, block_budget=kw["block_budget"], sink_tokens=kw["sink_tokens"],
               local_window=kw["local_window"])
    blocks = K.coarse_select(q, kmin, kmax, table, lens, **sel)
    scores = R.block_scores(q, kmin, kmax, table, lens, bs)
    forced = R.forced_block_mask(lens, scores.shape[2], bs, kw["sink_tokens"], kw["local_window"])
    cand = torch.arange(scores.shape[2], device=q.device).expand_as(scores)
    assert_topk_set(blocks, cand, scores.masked_fill(forced[:, None], float("inf")), kw["block_budget"], tol=1e-3)
    slots = K.asynctls_select(q, *args[3:12], candidate_blocks=None, token_budget=kw["token_budget"],
                              sm_scale=kw["sm_scale"], **sel)
    positions = R.candidate_positions(blocks, lens, bs)
    ts = R.token_scores(q, *c["index"][3:], c["channels"], c["r2t"], c["rows"], positions, c["sm_scale"])
    inwin = (positions >= 0) & ((positions < kw["sink_tokens"]) | (positions >= lens[:, None, None]
                                                                    - kw["local_window"]))
    assert_topk_set(slots, R.positions_to_slots(positions, c["r2t"], c["rows"]),
                    ts.masked_fill(inwin, float("inf")), kw["token_budget"], tol=1e-5)
    o = K.asynctls_decode(*args, **kw)
    torch.testing.assert_close(o, R.sparse_decode(q, c["k"], c["v"], slots, c["sm_scale"]), **tol)


@pytest.mark.parametrize("shape", ["gqa", "mha", "mla"])
def test_asynctls_decode_is_attention_over_a_valid_two_level_selection(shape):
    c = make_cache([27, 61, 113], **SHAPES[shape], device=DEV)
    _check_asynctls(c, _kw(c), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["asynctls", "quest", "token_only", "dense"])
def test_budgets_covering_the_context_equal_dense(method, dtype):
    c = make_cache([27, 61, 113], **SHAPES["gqa"], dtype=dtype, device=DEV)
    o = K.METHODS[method](*method_args(c), **_kw(c, block_budget=16, token_budget=128))
    r = R.dense_decode(c["q"], c["k"], c["v"], c["r2t"], c["rows"], c["seq_lens"], c["sm_scale"])
    torch.testing.assert_close(o, r, **TOL[dtype])


@pytest.mark.parametrize("method", ["quest", "asynctls", "token_only"])
def test_candidate_blocks_override_and_out(method):
    c = make_cache([61, 113], **SHAPES["mla"], device=DEV)
    blocks = torch.tensor([[[0, 3, 7, -1, 5]], [[13, 1, 2, 4, 9]]], dtype=torch.int32, device=DEV)
    out = torch.empty(2, 5, 64, device=DEV)
    o = K.METHODS[method](*method_args(c), **_kw(c), candidate_blocks=blocks, out=out)
    r = R.METHODS[method](*method_args(c), **_kw(c), candidate_blocks=blocks)
    assert o is out
    torch.testing.assert_close(o, r, **TOL[torch.float32])


def test_candidate_slots_matches_reference():
    c = make_cache([27, 61, 113], **SHAPES["gqa"], device=DEV)
    blocks = R.coarse_select(c["q"], *c["index"][:3], c["seq_lens"], block_size=c["bs"], **{
        k: BUDGETS[k] for k in ("block_budget", "sink_tokens", "local_window")})
    slots = candidate_slots(blocks, c["r2t"], c["rows"], c["seq_lens"], c["bs"])
    ref = R.positions_to_slots(R.candidate_positions(blocks, c["seq_lens"], c["bs"]), c["r2t"], c["rows"])
    assert torch.equal(slots, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["gqa", "mla"])
@pytest.mark.parametrize("lens, block_budget, token_budget", [([1000], 8, 128), ([4099, 3001, 777], 16, 256),
                                                               ([8192, 5000], 64, 1024)])
def test_gpu_bf16_asynctls_matches_reference(shape, lens, block_budget, token_budget):
    c = make_cache(lens, **GPU_SHAPES[shape], bs=64, dtype=torch.bfloat16, device="cuda", seed=len(lens))
    kw = dict(block_size=64, sm_scale=c["sm_scale"], block_budget=block_budget, token_budget=token_budget,
              sink_tokens=64, local_window=128)
    _check_asynctls(c, kw, TOL[torch.bfloat16])
    # Quest over the kernel's own block set (checked a valid top-k above): the kernels break near-ties at
    # bfloat16 resolution, so the reference's exact top-k may swap a tied block
    kmin, kmax, table = c["index"][:3]
    blocks = K.coarse_select(c["q"], kmin, kmax, table, c["seq_lens"], block_size=64, block_budget=block_budget,
                             sink_tokens=64, local_window=128)
    for method in ("quest", "dense"):
        extra = dict(candidate_blocks=blocks) if method == "quest" else {}
        o = K.METHODS[method](*method_args(c), **kw, **extra)
        torch.testing.assert_close(o, R.METHODS[method](*method_args(c), **kw, **extra), **TOL[torch.bfloat16])


# the two block searches of select_blocks: the narrow one (the default, measured faster on the H100) and the
# full one it falls back to; each must give a valid two-level selection and exact attention in bf16 on the GPU
BLOCK_SEARCHES = {"narrow": 8, "full_search": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("search", list(BLOCK_SEARCHES))
@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_gpu_bf16_block_searches_match_reference(shape, search, monkeypatch):
    monkeypatch.setattr(importlib.import_module("sglang_asynctls.kernels.select_blocks"), "NARROW_BITS",
                        BLOCK_SEARCHES[search])
    c = make_cache([8192, 5000, 777], **GPU_SHAPES[shape], bs=64, dtype=torch.bfloat16, device="cuda", seed=5)
    kw = dict(block_size=64, sm_scale=c["sm_scale"], block_budget=64, token_budget=1024, sink_tokens=64,
              local_window=128)
    _check_asynctls(c, kw, TOL[torch.bfloat16])
