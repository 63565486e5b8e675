"""Index build: INT4 heavy-channel labels of keys (packing exactly as `reference.quantize_labels`)."""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    # torch.round rounds halves to even; floor(x + 0.5) alone would round them up
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _pack_labels(lo, hi):
    """lo, hi [T, HALF_DC] float32: channels 2i and 2i+1 of T keys -> (codes [T, HALF_DC] uint8 with channel 2i in
    the low nibble, scale [T] = absmax / 7), exactly as `reference.quantize_labels`."""
    amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
    sc = tl.math.div_rn(amax, 7.0)
    safe = tl.where(sc > 0, sc, 1.0)
    q_lo = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(lo, safe[:, None])), -7.0), 7.0) + 8.0
    q_hi = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(hi, safe[:, None])), -7.0), 7.0) + 8.0
    return (q_lo.to(tl.int32) | (q_hi.to(tl.int32) << 4)).to(tl.uint8), sc


@triton.jit
def _quantize_labels_kernel(keys, channels, packed, scale, N,
                            stride_kn, stride_kh, stride_ch, stride_pn, stride_ph, stride_sn, stride_sh,
                            HALF_DC: tl.constexpr, BLOCK_T: tl.constexpr):
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    offs_c = tl.arange(0, HALF_DC)
    ch_lo = tl.load(channels + h * stride_ch + 2 * offs_c).to(tl.int64)
    ch_hi = tl.load(channels + h * stride_ch + 2 * offs_c + 1).to(tl.int64)
    row = keys + offs_t.to(tl.int64)[:, None] * stride_kn + h * stride_kh
    lo = tl.load(row + ch_lo[None, :], mask=mask_t[:, None], other=0.0).to(tl.float32)
    hi = tl.load(row + ch_hi[None, :], mask=mask_t[:, None], other=0.0).to(tl.float32)
    byte, sc = _pack_labels(lo, hi)
    out = packed + offs_t.to(tl.int64)[:, None] * stride_pn + h * stride_ph + offs_c[None, :]
    tl.store(out, byte, mask=mask_t[:, None])
    tl.store(scale + offs_t * stride_sn + h * stride_sh, sc, mask=mask_t)


def quantize_labels(keys: torch.Tensor, channels: torch.Tensor,
                    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """INT4 labels of keys [N, Hkv, D] at channels [Hkv, Dc] (see `reference.quantize_labels`).

    Returns packed [N, Hkv, Dc // 2] uint8 (low nibble = channels[:, 2i], value q + 8) and scale [N, Hkv] float32
    (absmax / 7). `out` = (packed, scale) to write in place, e.g. rows of the per-slot label pool.
    """
    n, hkv, _ = keys.shape
    dc = channels.shape[1]
    assert channels.shape[0] == hkv and dc % 2 == 0 and keys.stride(2) == 1 and channels.stride(1) == 1
    assert (dc // 2) & (dc // 2 - 1) == 0, "label_channels / 2 must be a power of two"
    if out is None:
        out = (torch.empty(n, hkv, dc // 2, dtype=torch.uint8, device=keys.device),
               torch.empty(n, hkv, dtype=torch.float32, device=keys.device))
    packed, scale = out
    assert packed.shape == (n, hkv, dc // 2) and packed.dtype == torch.uint8 and packed.stride(2) == 1
    assert scale.shape == (n, hkv) and scale.dtype == torch.float32
    if n == 0:
        return packed, scale
    block_t = 64
    _quantize_labels_kernel[(triton.cdiv(n, block_t), hkv)](
        keys, channels, packed, scale, n, keys.stride(0), keys.stride(1), channels.stride(0),
        packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
        HALF_DC=dc // 2, BLOCK_T=block_t, num_warps=4)
    return packed, scale
