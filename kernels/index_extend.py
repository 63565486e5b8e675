"""Index build after prefill: one launch labels the new keys and recomputes the block bounds of the pages they fall in.

The torch form of the same update (`reference.index_extend`) gathers every touched page's keys into a copy and
reduces it with ~12 kernels a layer; this reads each key once from the pool.
"""

import torch
import triton
import triton.language as tl

from .quantize_labels import _pack_labels


@triton.jit
def _index_extend_kernel(k_buffer, page_slots, page_ids, label_slots, channels, labels, label_scale, kmin, kmax,
                         stride_ks, stride_kh, stride_pm, stride_ch, stride_ls, stride_lh, stride_ss, stride_sh,
                         stride_mp, stride_mh, D: tl.constexpr, DCH: tl.constexpr, HALF_DC: tl.constexpr,
                         BS: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = tl.arange(0, BS)
    slot = tl.load(page_slots + m * stride_pm + offs_t)
    valid = slot >= 0
    rows = k_buffer + tl.maximum(slot, 0).to(tl.int64)[:, None] * stride_ks + h * stride_kh
    page = tl.load(page_ids + m).to(tl.int64)
    out = page * stride_mp + h * stride_mh
    # bounds over the page's written slots (every planned page has one), channel chunk by chunk (MLA: 576 wide)
    for c0 in tl.static_range(0, D, DCH):
        offs_d = c0 + tl.arange(0, DCH)
        mask = valid[:, None] & (offs_d < D)[None, :]
        key = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, key, float("inf")), axis=0)
        hi = tl.max(tl.where(mask, key, float("-inf")), axis=0)
        tl.store(kmin + out + offs_d, lo.to(kmin.dtype.element_ty), mask=offs_d < D)
        tl.store(kmax + out + offs_d, hi.to(kmax.dtype.element_ty), mask=offs_d < D)
    # labels of the new tokens only (a page may start with reused prefix slots, labelled already)
    lab = tl.load(label_slots + m * stride_pm + offs_t)
    new = lab >= 0
    offs_c = tl.arange(0, HALF_DC)
    ch_lo = tl.load(channels + h * stride_ch + 2 * offs_c).to(tl.int64)
    ch_hi = tl.load(channels + h * stride_ch + 2 * offs_c + 1).to(tl.int64)
    lo = tl.load(rows + ch_lo[None, :], mask=new[:, None], other=0.0).to(tl.float32)
    hi = tl.load(rows + ch_hi[None, :], mask=new[:, None], other=0.0).to(tl.float32)
    byte, sc = _pack_labels(lo, hi)
    dst = tl.maximum(lab, 0).to(tl.int64)
    tl.store(labels + dst[:, None] * stride_ls + h * stride_lh + offs_c[None, :], byte, mask=new[:, None])
    tl.store(label_scale + dst * stride_ss + h * stride_sh, sc, mask=new)


def index_extend(k_buffer: torch.Tensor, page_slots: torch.Tensor, page_ids: torch.Tensor,
                 label_slots: torch.Tensor, channels: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor,
                 kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    """In place, as `reference.index_extend` (same arguments)."""
    m, bs = page_slots.shape
    _, hkv, d = k_buffer.shape
    dc = channels.shape[1]
    assert label_slots.shape == page_slots.shape and label_slots.stride() == page_slots.stride()
    assert page_slots.stride(1) == 1 and page_ids.shape == (m,) and bs & (bs - 1) == 0
    assert channels.shape[0] == hkv and channels.stride(1) == 1 and k_buffer.stride(2) == 1
    assert (dc // 2) & (dc // 2 - 1) == 0 and dc % 2 == 0, "label_channels / 2 must be a power of two"
    assert labels.shape[1:] == (hkv, dc // 2) and labels.dtype == torch.uint8 and labels.stride(2) == 1
    assert label_scale.dtype == torch.float32 and kmin.shape[1:] == (hkv, d) and kmin.stride() == kmax.stride()
    assert kmin.dtype == k_buffer.dtype and kmin.stride(2) == 1
    if m == 0:
        return
    _index_extend_kernel[(m, hkv)](
        k_buffer, page_slots, page_ids, label_slots, channels, labels, label_scale, kmin, kmax,
        k_buffer.stride(0), k_buffer.stride(1), page_slots.stride(0), channels.stride(0), labels.stride(0),
        labels.stride(1), label_scale.stride(0), label_scale.stride(1), kmin.stride(0), kmin.stride(1),
        D=d, DCH=min(128, triton.next_power_of_2(d)), HALF_DC=dc // 2, BS=bs, num_warps=4)
