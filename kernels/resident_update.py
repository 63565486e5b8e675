"""Resident-set update for the offload engine: one program per (batch row, KV head) assigns GPU-resident slots to
the blocks of M_t (hits keep theirs, misses evict the least recently used slots not in M_t) and emits the copy list.

All state stays on the device and every shape is static, so the update runs inside a captured decode graph. No
serial loop over Kb or R: hits are one [Kb, R] comparison tile; the m victims are the m largest keys -last_used
(slots of M_t excluded) found by `_topk.topk_compact`'s bitwise threshold search (31 reductions over R), which
breaks ties towards the lower slot, exactly the reference's (last_used, slot) order; the i-th miss takes the i-th
victim in slot order, matched by one prefix sum over the entries. The first version ranked slots with an R x R
comparison and int64 keys: 72-600 us on the H100 (benchmarks/results/offload_engine_h100.json), for an op that
runs once per layer per step.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._topk import INVALID, topk_compact


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

    # tags of a (row, head) are distinct and empty slots hold -1, so a valid block matches at most one slot
    match = (blk[:, None] == tag[None, :]) & valid[:, None]  # [KB, R]
    hit = tl.max(match.to(tl.int32), axis=1) > 0
    in_m = tl.max(match.to(tl.int32), axis=0) > 0
    hit_slot = tl.sum(tl.where(match, offs_r[None, :], 0), axis=1)
    miss = valid & ~hit
    num_miss = tl.sum(miss.to(tl.int32), axis=0)

    # victims: the num_miss least recently used slots outside M_t (largest -last_used; ties to the lower slot)
    key = tl.where(in_m | ~mask_r, INVALID, -lu)
    victim, vrank, _ = topk_compact(key, num_miss, 31)  # exact int keys; vrank: rank among victims in slot order
    miss_rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
    take = (vrank[None, :] == miss_rank[:, None]) & victim[None, :] & miss[:, None]  # [KB, R]: miss -> victim
    slot = tl.where(hit, hit_slot, tl.sum(tl.where(take, offs_r[None, :], 0), axis=1))
    slot = tl.where(valid, slot, -1)

    seen = tl.max(((blk[:, None] == old[None, :]) & valid[:, None]).to(tl.int32), axis=1)
    tl.store(slots + out, slot, mask=mask_k)
    tl.store(copy_src + out, tl.where(miss, blk, -1), mask=mask_k)
    tl.store(copy_dst + out, tl.where(miss, slot, -1), mask=mask_k)
    tl.store(overlap + pid, tl.sum(seen, axis=0))
    tl.store(misses + pid, num_miss)

    new_tag = tl.sum(tl.where(take, blk[:, None], 0), axis=0)
    tl.store(t_ptr, tl.where(victim, new_tag, tag), mask=mask_r)
    tl.store(lu_ptr, tl.where(victim | in_m, tl.load(step), lu), mask=mask_r)
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
    assert len({t.device.type for t in (tags, last_used, prev, rows, blocks, step)}) == 1, "one device for all"
    if out is None:
        out = tuple(torch.empty_like(blocks) for _ in range(3)) + tuple(
            torch.empty((b, hkv), dtype=torch.int32, device=blocks.device) for _ in range(2))
    slots, copy_src, copy_dst, overlap, misses = out
    assert all(t.is_contiguous() for t in out)
    r_p2, kb_p2 = triton.next_power_of_2(r), triton.next_power_of_2(kb)
    # the [Kb, R] tiles are the largest: 128 of their elements a thread (128 x 128 -> 4 warps, 128 x 256 -> 8)
    warps = min(16, max(4, kb_p2 * r_p2 // 4096))
    _resident_update_kernel[(b * hkv,)](
        tags, last_used, prev, rows, blocks, step, slots, copy_src, copy_dst, overlap, misses,
        tags.stride(0), tags.stride(1), prev.stride(0), prev.stride(1), blocks.stride(0), blocks.stride(1),
        HKV=hkv, R=r, KB=kb, R_P2=r_p2, KB_P2=kb_p2, num_warps=warps)
    return out
