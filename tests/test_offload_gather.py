"""Block gather (host store -> resident cache): the Triton kernel against the torch reference, byte-exact; entries
with src < 0 copy nothing; MLA copies K only (V is a view of it)."""

import pytest
import torch

from sglang_asynctls.kernels.gather_blocks import gather_blocks as kernel_gather
from sglang_asynctls.offload import reference as OR

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 1234.5  # never a randn value: a destination row that should not be written keeps it


def _case(bs, hkv, d, dv, dtype, mla=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_src, num_dst, b, kk = 9, 15, 3, 4
    # the host pool's "layer_first" layout [2, L, S, Hkv, D]: a layer's K is a strided view, as SGLang hands it out
    pool = torch.randn(2, 2, num_src * bs, hkv, d, generator=g).to(dtype)
    src_k = pool[0, 1]
    src_v = src_k[..., :dv] if mla else pool[1, 1][..., :dv]
    dst_k = torch.full((num_dst * bs, hkv, d), SENTINEL, dtype=dtype, device=DEV)
    dst_v = dst_k[..., :dv] if mla else torch.full((num_dst * bs, hkv, dv), SENTINEL, dtype=dtype, device=DEV)
    src = torch.randint(0, num_src, (b, hkv, kk), generator=g)
    src[torch.rand(src.shape, generator=g) < 0.3] = -1
    # distinct destinations per KV head (one writer each), as the resident-set update guarantees
    dst = torch.stack([torch.randperm(num_dst, generator=g)[: b * kk].view(b, kk) for _ in range(hkv)], dim=1)
    dst = torch.where(src >= 0, dst, -1)
    return src_k.to(DEV), src_v.to(DEV), dst_k, dst_v, src.int().to(DEV), dst.int().to(DEV)


@pytest.mark.parametrize("bs", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [dict(hkv=2, d=32, dv=32), dict(hkv=3, d=16, dv=16),
                                   dict(hkv=1, d=80, dv=64, mla=True)])
def test_kernel_copies_exactly_what_the_reference_copies(bs, dtype, shape):
    src_k, src_v, dst_k, dst_v, src, dst = _case(bs, dtype=dtype, **shape)
    want_k, want_v = dst_k.clone(), dst_v.clone()
    if shape.get("mla"):
        want_v = want_k[..., : shape["dv"]]
    OR.gather_blocks(src_k, src_v, want_k, want_v, src, dst, bs)
    kernel_gather(src_k, src_v, dst_k, dst_v, src, dst, bs)
    assert torch.equal(dst_k, want_k) and torch.equal(dst_v, want_v)


def test_reference_moves_each_listed_head_block_and_nothing_else():
    bs = 4
    src_k, src_v, dst_k, dst_v, src, dst = _case(bs, hkv=2, d=8, dv=8, dtype=torch.float32, seed=3)
    OR.gather_blocks(src_k, src_v, dst_k, dst_v, src, dst, bs)
    written = torch.zeros(dst_k.shape[:2], dtype=torch.bool, device=DEV)
    for b, h, j in (src >= 0).nonzero().tolist():
        s, t = int(src[b, h, j]), int(dst[b, h, j])
        assert torch.equal(dst_k[t * bs:(t + 1) * bs, h], src_k[s * bs:(s + 1) * bs, h])
        assert torch.equal(dst_v[t * bs:(t + 1) * bs, h], src_v[s * bs:(s + 1) * bs, h])
        written[t * bs:(t + 1) * bs, h] = True
    assert bool((dst_k[~written] == SENTINEL).all()) and bool((dst_v[~written] == SENTINEL).all())
    assert bool(written.any())


@pytest.mark.parametrize("max_programs", [2048, 8])
@pytest.mark.parametrize("compact", [False, True])
def test_strided_programs_and_the_last_program_ticket(monkeypatch, max_programs, compact):
    """With few programs each one copies entries q, q + P, ... (still exactly the reference's copy); a compacted
    list with its counts is read only up to them; with a ticket the last program to arrive writes the stamp (here:
    the arrival count, CPU-checkable) and resets the ticket."""
    from sglang_asynctls.kernels import gather_blocks as G

    monkeypatch.setattr(G, "MAX_PROGRAMS", max_programs)
    src_k, src_v, dst_k, dst_v, src, dst = _case(8, hkv=2, d=16, dv=16, dtype=torch.float32, seed=5)
    counts = None
    if compact:  # valid entries first, as the engine's update writes them; garbage past the counts is not read
        order = torch.sort((src < 0).int(), dim=-1, stable=True).indices
        src, dst = torch.gather(src, -1, order), torch.gather(dst, -1, order)
        counts = (src >= 0).sum(-1).int()
        keep = torch.arange(src.shape[-1], device=DEV) < counts[..., None]
    want_k, want_v = dst_k.clone(), dst_v.clone()
    OR.gather_blocks(src_k, src_v, want_k, want_v, src, dst, 8)
    stamp = torch.zeros(1, dtype=torch.int64, device=DEV)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEV)
    if compact:
        src, dst = torch.where(keep, src, 10 ** 6), torch.where(keep, dst, 10 ** 6)  # out of range: never read
    for _ in range(2):  # the ticket is reusable: back at 0 after each launch
        G.gather_blocks(src_k, src_v, dst_k, dst_v, src, dst, 8, landed=(stamp, ticket),
                        stamp_mode=1 if DEV == "cuda" else 2, counts=counts)
        assert int(ticket) == 0
        if DEV != "cuda":
            b, hkv, kk = src.shape
            assert int(stamp) == b * hkv * max(1, min(kk, max_programs // (b * hkv)))
    assert torch.equal(dst_k, want_k) and torch.equal(dst_v, want_v)
