"""Index build at decode: one launch labels every request's new key and folds it into its block's Kmin/Kmax.

The torch form of the same update (`reference.append_decode_index`) is ~20 small kernels per layer; inside a
CUDA-graph decode step those launches, not bytes, were the cost.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .quantize_labels import _pack_labels


@triton.jit
def _append_decode_index_kernel(k_buffer, new_loc, seq_lens, channels, labels, label_scale, kmin, kmax, rows,
                                stride_ks, stride_kh, stride_ch, stride_ls, stride_lh, stride_ss, stride_sh,
                                stride_mp, stride_mh, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                HALF_DC: tl.constexpr, BS: tl.constexpr, HAS_ROWS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    loc = tl.load(new_loc + b).to(tl.int64)
    n = tl.load(seq_lens + b).to(tl.int64)
    row = k_buffer + loc * stride_ks + h * stride_kh
    # labels: exactly reference.quantize_labels on one key (a [1, HALF_DC] tile of the shared packer)
    offs_c = tl.arange(0, HALF_DC)
    lo = tl.load(row + tl.load(channels + h * stride_ch + 2 * offs_c).to(tl.int64)).to(tl.float32)
    hi = tl.load(row + tl.load(channels + h * stride_ch + 2 * offs_c + 1).to(tl.int64)).to(tl.float32)
    byte, sc = _pack_labels(lo[None, :], hi[None, :])
    tl.store(labels + loc * stride_ls + h * stride_lh + offs_c[None, :], byte)
    tl.store(label_scale + loc * stride_ss + h * stride_sh + tl.arange(0, 1), sc)
    # running block bound; the token that opens a block restarts it
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    key = tl.load(row + offs_d, mask=mask_d)
    entry = tl.load(rows + b).to(tl.int64) if HAS_ROWS else loc // BS  # per-request rows (page size 1) or page
    out = entry * stride_mp + h * stride_mh + offs_d
    opens = (n - 1) % BS == 0
    old_min = tl.load(kmin + out, mask=mask_d)
    old_max = tl.load(kmax + out, mask=mask_d)
    tl.store(kmin + out, tl.where(opens, key, tl.minimum(old_min, key)), mask=mask_d)
    tl.store(kmax + out, tl.where(opens, key, tl.maximum(old_max, key)), mask=mask_d)


def append_decode_index(k_buffer: torch.Tensor, new_loc: torch.Tensor, seq_lens: torch.Tensor,
                        channels: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor,
                        kmin: torch.Tensor, kmax: torch.Tensor, block_size: int,
                        rows: Optional[torch.Tensor] = None) -> None:
    """In place, as `reference.append_decode_index` (same arguments; any strides with a unit last stride)."""
    b = new_loc.shape[0]
    s, hkv, d = k_buffer.shape
    dc = channels.shape[1]
    assert channels.shape[0] == hkv and k_buffer.stride(2) == 1 and channels.stride(1) == 1
    assert (dc // 2) & (dc // 2 - 1) == 0 and dc % 2 == 0, "label_channels / 2 must be a power of two"
    assert labels.shape[1:] == (hkv, dc // 2) and labels.dtype == torch.uint8 and labels.stride(2) == 1
    assert label_scale.dtype == torch.float32 and kmin.shape[1:] == (hkv, d) and kmin.stride() == kmax.stride()
    assert kmin.dtype == k_buffer.dtype and kmin.stride(2) == 1 and block_size & (block_size - 1) == 0
    if b == 0:
        return
    _append_decode_index_kernel[(b, hkv)](
        k_buffer, new_loc, seq_lens, channels, labels, label_scale, kmin, kmax, new_loc if rows is None else rows,
        k_buffer.stride(0), k_buffer.stride(1), channels.stride(0), labels.stride(0), labels.stride(1),
        label_scale.stride(0), label_scale.stride(1), kmin.stride(0), kmin.stride(1),
        D=d, BLOCK_D=triton.next_power_of_2(d), HALF_DC=dc // 2, BS=block_size, HAS_ROWS=rows is not None,
        num_warps=4)
