"""Attention kernel vs reference: sparse_decode (split-K, GQA sharing, MLA latent)."""

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.kernels.sparse_decode import sparse_decode

from kernel_cases import SHAPES, TOL, make_cache

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _random_slots(c, k, seed):
    """[B, Hkv, k] slots of each request in random order, some -1 holes (k may exceed a request's length)."""
    g = torch.Generator().manual_seed(seed)
    hkv = c["k"].shape[1]
    rows = []
    for b, n in enumerate(c["seq_lens"].tolist()):
        heads = []
        for _ in range(hkv):
            pos = torch.randperm(n, generator=g)[:k]
            s = c["r2t"][c["rows"][b], pos.to(DEV)].cpu()
            s = torch.cat([s, s.new_full((k - len(s),), -1)])
            s[torch.rand(k, generator=g) < 0.1] = -1
            heads.append(s)
        rows.append(torch.stack(heads))
    return torch.stack(rows).to(torch.int32).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ["gqa", "mha", "mla"])
@pytest.mark.parametrize("k, splits", [(27, 0), (113, 3)])
def test_sparse_decode_matches_reference(shape, dtype, k, splits):
    c = make_cache([27, 61, 113], **SHAPES[shape], dtype=dtype, device=DEV)
    slots = _random_slots(c, k, seed=k)
    o = sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"], num_splits=splits)
    r = R.sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"])
    assert o.dtype == dtype and o.shape == r.shape
    torch.testing.assert_close(o, r, **TOL[dtype])


@pytest.mark.parametrize("shape", ["gqa", "mla"])
@pytest.mark.parametrize("dv_chunks, block_n", [(2, 16), (4, 32)])
def test_sparse_decode_split_over_value_columns_matches_reference(shape, dv_chunks, block_n):
    """Programs that each write Dv / dv_chunks output columns (and recompute the scores) give the reference."""
    c = make_cache([27, 61, 113], **SHAPES[shape], device=DEV)
    slots = _random_slots(c, 113, seed=7)
    o = sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"], num_splits=3, dv_chunks=dv_chunks,
                      block_n=block_n, num_warps=4)
    torch.testing.assert_close(o, R.sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"]),
                               **TOL[torch.float32])


def test_sparse_decode_empty_selection_gives_zeros_and_out_is_written():
    c = make_cache([27, 61], **SHAPES["gqa"], device=DEV)
    slots = _random_slots(c, 16, seed=3)
    slots[1] = -1
    out = torch.full((2, 8, 32), 7.0, device=DEV)
    assert sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"], out=out) is out
    torch.testing.assert_close(out, R.sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))



@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_out_rows_writes_only_the_flagged_rows(shape):
    """The backend hands its dense output as out and the long requests as out_rows: the other rows keep the
    dense kernel's values."""
    c = make_cache([27, 61, 113], **SHAPES[shape], device=DEV)
    slots = _random_slots(c, 113, seed=5)
    full = sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"], num_splits=3)
    out = torch.full_like(full, 7.0)
    rows = torch.tensor([True, False, True], device=DEV)
    sparse_decode(c["q"], c["k"], c["v"], slots, c["sm_scale"], out=out, out_rows=rows, num_splits=3)
    assert torch.equal(out[rows], full[rows])
    assert torch.equal(out[1], torch.full_like(out[1], 7.0))
