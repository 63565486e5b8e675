"""Index build: per-channel min/max of the keys of complete blocks, read straight from SGLang's KV pool."""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _block_minmax_kernel(k_buffer, block_slots, kmin, kmax,
                         stride_ks, stride_kh, stride_bm, stride_om, stride_oh,
                         D: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    slots = tl.load(block_slots + m * stride_bm + tl.arange(0, BS)).to(tl.int64)
    keys = tl.load(k_buffer + slots[:, None] * stride_ks + h * stride_kh + offs_d[None, :], mask=mask_d[None, :])
    out = m * stride_om + h * stride_oh + offs_d
    tl.store(kmin + out, tl.min(keys, axis=0), mask=mask_d)
    tl.store(kmax + out, tl.max(keys, axis=0), mask=mask_d)


def block_minmax(k_buffer: torch.Tensor, block_slots: torch.Tensor,
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of each block's keys (see `reference.block_minmax`).

    k_buffer: [S, Hkv, D]; block_slots: [M, BS] int32/int64 (BS a power of two).
    Returns kmin, kmax: [M, Hkv, D] in k_buffer's dtype (written into `out` when given).
    """
    s, hkv, d = k_buffer.shape
    m, bs = block_slots.shape
    assert k_buffer.stride(2) == 1 and block_slots.stride(1) == 1
    assert bs & (bs - 1) == 0, "block_size must be a power of two"
    kmin, kmax = out if out is not None else (k_buffer.new_empty(m, hkv, d), k_buffer.new_empty(m, hkv, d))
    for t in (kmin, kmax):
        assert t.shape == (m, hkv, d) and t.dtype == k_buffer.dtype and t.stride(2) == 1
    assert kmin.stride() == kmax.stride()
    if m == 0:
        return kmin, kmax
    block_d = min(128, triton.next_power_of_2(d))
    _block_minmax_kernel[(m, hkv, triton.cdiv(d, block_d))](
        k_buffer, block_slots, kmin, kmax, k_buffer.stride(0), k_buffer.stride(1), block_slots.stride(0),
        kmin.stride(0), kmin.stride(1), D=d, BS=bs, BLOCK_D=block_d, num_warps=4)
    return kmin, kmax
