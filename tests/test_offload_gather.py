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
