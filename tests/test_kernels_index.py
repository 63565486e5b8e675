"""Index build kernels vs reference: quantize_labels, append_decode_index."""

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.kernels.quantize_labels import quantize_labels

DEV = "cuda" if torch.cuda.is_available() else "cpu"



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, hkv, d, dc", [(27, 2, 32, 8), (113, 1, 80, 16), (61, 4, 16, 4)])
def test_quantize_labels_matches_reference(n, hkv, d, dc, dtype):
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(n, hkv, d, generator=g)
    keys[3] = 0.0  # all-zero rows: scale 0, codes 8
    keys[5, :, :] = torch.arange(d, dtype=torch.float32) * 0.5 - 3.5  # exact halves: round-half-even
    keys = keys.to(dtype).to(DEV)
    channels = torch.stack([torch.randperm(d, generator=g)[:dc] for _ in range(hkv)]).to(DEV)
    packed, scale = quantize_labels(keys, channels)
    rp, rs = R.quantize_labels(keys, channels)
    _assert_labels_equal(packed, scale, rp, rs)
    out = (torch.empty_like(packed), torch.empty_like(scale))
    quantize_labels(keys, channels, out=out)
    _assert_labels_equal(*out, rp, rs)


def _assert_labels_equal(packed, scale, rp, rs):
    if DEV == "cpu":  # the kernel divides exactly (div_rn), as torch does on CPU: bit-identical
        assert torch.equal(packed, rp) and torch.equal(scale, rs)
        return
    # torch on CUDA divides by the scalar 7 as a multiply by 1/7 (an ulp away from a division), so a code
    # sitting on a rounding tie may move by one step
    torch.testing.assert_close(scale, rs, rtol=2e-7, atol=0)
    diff = torch.stack([(packed & 15).int() - (rp & 15).int(), (packed >> 4).int() - (rp >> 4).int()])
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3


def _decode_index_state(s, hkv, d, dc, bs, dtype, g):
    """Index tensors as IndexPool lays them out (labels head-major behind [S, Hkv, ...] views)."""
    labels = torch.randint(0, 255, (hkv, s, dc // 2), generator=g, dtype=torch.uint8).transpose(0, 1)
    scale = torch.rand(hkv, s, generator=g).t()
    pages = -(-s // bs)
    kmin = torch.randn(pages, hkv, d, generator=g).to(dtype)
    kmax = torch.randn(pages, hkv, d, generator=g).to(dtype)
    return [t.to(DEV) for t in (labels, scale, kmin, kmax)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hkv, d, dc", [(2, 32, 8), (1, 80, 16), (3, 16, 4)])
def test_append_decode_index_matches_reference_over_steps(hkv, d, dc, dtype):
    """Several decode steps of 3 requests whose pages open at different steps: labels, scales and page bounds
    equal the reference after every step, and a page filled by decode equals block_minmax of its keys."""
    from sglang_asynctls.kernels.index_append import append_decode_index

    bs, steps = 8, 11
    g = torch.Generator().manual_seed(d)
    s = 16 * bs
    k = torch.randn(s, hkv, d, generator=g).to(dtype).to(DEV)
    channels = torch.stack([torch.randperm(d, generator=g)[:dc] for _ in range(hkv)]).to(DEV)
    ours = _decode_index_state(s, hkv, d, dc, bs, dtype, g)
    ref = [t.clone() for t in ours]
    start_lens = torch.tensor([5, 8, 13])  # next tokens at page offsets 5, 0 (opens a page) and 5
    first_page = torch.tensor([3, 7, 11])
    for t in range(steps):
        lens = start_lens + t + 1
        loc = (first_page * bs + (start_lens % bs) + t).to(DEV)
        append_decode_index(k, loc, lens.to(DEV), channels, *ours, block_size=bs)
        R.append_decode_index(k, loc, lens.to(DEV), channels, *ref, block_size=bs)
        _assert_labels_equal(ours[0], ours[1], ref[0], ref[1])
        assert torch.equal(ours[2], ref[2]) and torch.equal(ours[3], ref[3]), t
    # request 1 opened page 7 at its first step and filled it over 8 steps
    page_slots = torch.arange(7 * bs, 8 * bs, device=DEV)[None]
    rmin, rmax = R.block_minmax(k, page_slots)
    assert torch.equal(ours[2][7], rmin[0]) and torch.equal(ours[3][7], rmax[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_decode_index_per_request_rows_matches_reference(dtype):
    """Page size 1: scattered slots, bounds folded into rows given per request (req row * max_blocks + block),
    across block boundaries; equal to the reference after every step."""
    from sglang_asynctls.kernels.index_append import append_decode_index

    bs, steps, hkv, d, dc, max_blocks = 8, 11, 2, 32, 8, 4
    g = torch.Generator().manual_seed(3)
    s = 16 * bs
    k = torch.randn(s, hkv, d, generator=g).to(dtype).to(DEV)
    channels = torch.stack([torch.randperm(d, generator=g)[:dc] for _ in range(hkv)]).to(DEV)
    ours = _decode_index_state(s, hkv, d, dc, bs, dtype, g)
    ref = [t.clone() for t in ours]
    start_lens, req_rows = torch.tensor([5, 8, 13]), torch.tensor([0, 2, 1])
    slots = torch.randperm(s, generator=g)[: 3 * steps].view(steps, 3)
    for t in range(steps):
        lens = start_lens + t + 1
        rows = (req_rows * max_blocks + (lens - 1) // bs).to(DEV)
        append_decode_index(k, slots[t].to(DEV), lens.to(DEV), channels, *ours, block_size=bs, rows=rows)
        R.append_decode_index(k, slots[t].to(DEV), lens.to(DEV), channels, *ref, block_size=bs, rows=rows)
        _assert_labels_equal(ours[0], ours[1], ref[0], ref[1])
        assert torch.equal(ours[2], ref[2]) and torch.equal(ours[3], ref[3]), t
    # request 1 (req row 2) opened block 1 at its first step (length 9) and filled it over 8 steps
    rmin, rmax = R.block_minmax(k, slots[:8, 1].to(DEV)[None])
    assert torch.equal(ours[2][2 * max_blocks + 1], rmin[0]) and torch.equal(ours[3][2 * max_blocks + 1], rmax[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hkv, d, dc", [(2, 32, 8), (1, 80, 16), (1, 576, 16)])
def test_index_extend_matches_reference(hkv, d, dc, dtype):
    """Pages with a reused prefix (labels kept), a partial last page, per-request rows: labels of the new slots
    only, bounds of every planned page, nothing else touched; the kernel equals the reference."""
    from sglang_asynctls.index import plan_extend
    from sglang_asynctls.kernels.index_extend import index_extend

    bs = 8
    g = torch.Generator().manual_seed(d + dc)
    s = 40 * bs
    k = torch.randn(s, hkv, d, generator=g).to(dtype).to(DEV)
    channels = torch.stack([torch.randperm(d, generator=g)[:dc] for _ in range(hkv)]).to(DEV)
    pages = torch.randperm(s // bs, generator=g)[: 3 * 12].view(3, 12, 1)  # whole pages, as at page size 64
    r2t = (pages * bs + torch.arange(bs)).view(3, 12 * bs).to(torch.int32).to(DEV)
    rpi = torch.tensor([2, 0], device=DEV)
    for max_blocks in (0, 12):
        plan = plan_extend(r2t, rpi, [13, 0], [45, 30], bs, max_blocks=max_blocks)
        state = _decode_index_state(s, hkv, d, dc, bs, dtype, g)
        if max_blocks:  # bounds per request row: room for 3 rows of 12 blocks
            state[2:] = [torch.randn(3 * 12, hkv, d, generator=g).to(dtype).to(DEV) for _ in range(2)]
        ours, ref = [t.clone() for t in state], [t.clone() for t in state]
        index_extend(k, plan.page_slots, plan.page_ids, plan.label_slots, channels, *ours)
        R.index_extend(k, plan.page_slots, plan.page_ids, plan.label_slots, channels, *ref)
        _assert_labels_equal(ours[0], ours[1], ref[0], ref[1])
        assert torch.equal(ours[2], ref[2]) and torch.equal(ours[3], ref[3])
        new = torch.cat([r2t[2, 13:45], r2t[0, :30]]).long()
        untouched = torch.ones(s, dtype=torch.bool, device=DEV)
        untouched[new] = False
        assert torch.equal(ref[0][untouched], state[0][untouched])  # the reused prefix keeps its labels
        rmin, rmax = R.block_minmax(k, plan.page_slots[-1:, :6])  # request 1's last page: 6 of 8 slots written
        assert torch.equal(ref[2][plan.page_ids[-1]], rmin[0]) and torch.equal(ref[3][plan.page_ids[-1]], rmax[0])
