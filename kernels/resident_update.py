"""Resident-set update for the offload engine: one program per (batch row, KV head) assigns GPU-resident slots to
the blocks of M_t (hits keep theirs, misses evict the least recently used slots not in M_t) and emits the copy list.

All state stays on the device and every shape is static, so the update runs inside a captured decode graph. The
victim order is a rank over (last_used, slot) computed with an R x R comparison: R = r x k_b is at most a few
hundred, and a sort network would buy nothing at that size.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# keys of slots that hold a block of M_t (never victims) and of padding lanes (never anything); above any step
_KEY_PINNED = tl.constexpr(1 << 31)
_KEY_PAD = tl.constexpr((1 << 31) + 1)


@triton.jit
def _resident_update_kernel(tags, last_used, prev, rows, blocks, step, slots, copy_src, copy_dst, overlap, misses,
                            stride_tr, stride_th, stride_pr, stride_ph, stride_bb, stride_bh,
                            HKV: tl.constexpr, R: tl.constexpr, KB: tl.constexpr,
                            R_P2: tl.constexpr, KB_P2: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    row = tl.load(rows + b).to(tl.int64)
    offs_r = tl.arange(0, R_P2)
    offs_k = tl.arange(0, KB_P2)
    mask_r = offs_r < R
    mask_k = offs_k < KB
    t_ptr = tags + row * stride_tr + h * stride_th + offs_r
    lu_ptr = last_used + row * stride_tr + h * stride_th + offs_r
    p_ptr = prev + row * stride_pr + h * stride_ph + offs_k
    out = b * stride_bb + h * stride_bh + offs_k
    tag = tl.load(t_ptr, mask=mask_r, other=-1)
    lu = tl.load(lu_ptr, mask=mask_r, other=-1)
    blk = tl.load(blocks + out, mask=mask_k, other=-1)
    old = tl.load(p_ptr, mask=mask_k, other=-1)
    valid = blk >= 0

    match = (blk[:, None] == tag[None, :]) & valid[:, None] & mask_r[None, :]  # [KB, R]
    hit_any = tl.max(match.to(tl.int32), axis=1)
    hit = hit_any > 0
    in_m = tl.max(match.to(tl.int32), axis=0) > 0
    hit_slot = tl.sum(tl.where(match, offs_r[None, :], 0), axis=1)

    # victim order: rank of (last_used, slot) among all slots; M_t's slots and padding lanes rank last
    key = tl.where(in_m, _KEY_PINNED, lu.to(tl.int64))
    key = tl.where(mask_r, key, _KEY_PAD) * R_P2 + offs_r
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)  # [R]
    miss = valid & (hit_any == 0)
    miss_rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
    victim = tl.sum(tl.where(rank[None, :] == miss_rank[:, None], offs_r[None, :], 0), axis=1)
    slot = tl.where(hit, hit_slot, victim)
    slot = tl.where(valid, slot, -1)

    seen = tl.max(((blk[:, None] == old[None, :]) & valid[:, None] & mask_k[None, :]).to(tl.int32), axis=1)
    tl.store(slots + out, slot, mask=mask_k)
    tl.store(copy_src + out, tl.where(miss, blk, -1), mask=mask_k)
    tl.store(copy_dst + out, tl.where(miss, slot, -1), mask=mask_k)
    tl.store(overlap + pid, tl.sum(seen, axis=0))
    tl.store(misses + pid, tl.sum(miss.to(tl.int32), axis=0))

    at = slot[:, None] == offs_r[None, :]  # [KB, R]
    filled = tl.max((at & miss[:, None]).to(tl.int32), axis=0) > 0
    new_tag = tl.sum(tl.where(at & miss[:, None], blk[:, None], 0), axis=0)
    used = tl.max((at & valid[:, None]).to(tl.int32), axis=0) > 0
    tl.store(t_ptr, tl.where(filled, new_tag, tag), mask=mask_r)
    tl.store(lu_ptr, tl.where(used, tl.load(step), lu), mask=mask_r)
    tl.store(p_ptr, blk, mask=mask_k)


def resident_update(tags: torch.Tensor, last_used: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor,
                    blocks: torch.Tensor, step: torch.Tensor,
                    out: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, ...]:
    """See `sglang_asynctls.offload.reference.resident_update`. out=(slots, copy_src, copy_dst, overlap, misses)
    preallocated ([B, Hkv, Kb] x3, [B, Hkv] x2, int32) for CUDA-graph capture."""
    b, hkv, kb = blocks.shape
    r = tags.shape[2]
    assert tags.shape == last_used.shape and tags.shape[1] == hkv and prev.shape[1:] == (hkv, kb)
    assert tags.stride() == last_used.stride() and tags.stride(2) == 1 and prev.stride(2) == 1
    assert blocks.is_contiguous() and rows.shape == (b,) and step.numel() == 1
    assert tags.dtype == last_used.dtype == prev.dtype == blocks.dtype == step.dtype == torch.int32
    assert r >= kb, "a resident set smaller than the block budget cannot hold M_t"
    if out is None:
        out = tuple(torch.empty_like(blocks) for _ in range(3)) + tuple(
            torch.empty((b, hkv), dtype=torch.int32, device=blocks.device) for _ in range(2))
    slots, copy_src, copy_dst, overlap, misses = out
    assert all(t.is_contiguous() for t in out)
    r_p2 = triton.next_power_of_2(r)  # the R x R victim rank is the largest tile: more warps past 256 slots
    _resident_update_kernel[(b * hkv,)](
        tags, last_used, prev, rows, blocks, step, slots, copy_src, copy_dst, overlap, misses,
        tags.stride(0), tags.stride(1), prev.stride(0), prev.stride(1), blocks.stride(0), blocks.stride(1),
        HKV=hkv, R=r, KB=kb, R_P2=r_p2, KB_P2=triton.next_power_of_2(kb), num_warps=8 if r_p2 >= 256 else 4)
    return out
