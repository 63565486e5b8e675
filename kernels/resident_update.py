"""Resident-set update for the offload engine: one program per (batch row, KV head) assigns GPU-resident slots to
the blocks of M_t (hits keep theirs, misses evict the least recently used slots not in M_t) and emits the copy list.

All state stays on the device and every shape is static, so the update runs inside a captured decode graph.

Latency, not work, is what a per-layer op pays for (batch 1: 8 programs), so the kernel is built to have few
*dependent* block-wide steps:
- hits and the overlap: [Kb, 32] comparison tiles against chunks of the tags / M_{t-1} read from memory, each
  reduced along its chunk (independent chunks); whole [Kb, R] / [Kb, Kb] tiles cost 1.4-5 us each (H100
  ablation, below);
- M_t's hit slots are marked in `last_used` itself (INT32_MAX, the reference's pinned key), then one barrier;
- victims: the rank of every slot in the (last_used, slot) order is *counted* ([R, 32] tiles of pairwise
  comparisons, read back from memory in chunks; no dependency between chunks), and the victims are the slots of
  rank < misses. The previous kernel found them by `_topk`'s bitwise threshold search over -last_used: 32 counts in
  a dependent chain. H100 device time of the update, Kb 128, b1 r1 / b1 r2 / b32 r2: that kernel 58 / 70 / 340 us;
  counting ranks with whole hit/overlap tiles 6.7 / 10.9 / 19.2 us (ablation: without either whole tile 1.4-5 us
  less each); with the chunked tiles 5.7 / 9.8 / 13.1 us;
- matching (i-th miss in entry order -> i-th victim in slot order): two prefix sums, and the victims' slots are
  passed through the first entries of the copy_dst row (scatter, barrier, gather) instead of a [Kb, R] tile; new
  tags are scattered to the victims' slots.
`layer_update` is the same kernel with the engine's glue fused in (FUSED): prev_slots, the copy list in host/device
pages (compacted: the misses of (b, h) first; both page lookups issued at the start, the victims' device pages
passed with their slots), and the layer's telemetry counters (atomics). Spec:
`offload/reference.py` (`resident_update`, `layer_update`).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

PINNED = tl.constexpr(2147483647)  # last_used key of M_t's slots: after every victim (the reference's _PINNED)
CHUNK = 32  # slots compared per rank tile
NUM_WARPS = None  # override of the launcher's choice (experiments)


@triton.jit
def _resident_update_kernel(tags, last_used, prev, rows, blocks, step, slots, copy_src, copy_dst, overlap, misses,
                            prev_slots, cache_pages, page_table, counters, stamps,
                            stride_tr, stride_th, stride_pr, stride_ph, stride_bb, stride_bh, stride_cr, stride_pt,
                            HKV: tl.constexpr, R: tl.constexpr, KB: tl.constexpr, R_P2: tl.constexpr,
                            KB_P2: tl.constexpr, RC: tl.constexpr, KC: tl.constexpr, FUSED: tl.constexpr,
                            RECORD_STALL: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    row = tl.load(rows + b).to(tl.int64)
    now = tl.load(step)
    offs_r = tl.arange(0, R_P2)
    offs_k = tl.arange(0, KB_P2)
    mask_r = offs_r < R
    mask_k = offs_k < KB
    state = row * stride_tr + h * stride_th  # tags / last_used row of (row, h)
    lu_ptr = last_used + state + offs_r
    p_off = row * stride_pr + h * stride_ph + offs_k  # prev / prev_slots
    out_row = b * stride_bb + h * stride_bh  # outputs [B, Hkv, Kb]
    lu = tl.load(lu_ptr, mask=mask_r, other=-1)
    blk = tl.load(blocks + out_row + offs_k, mask=mask_k, other=-1)
    valid = blk >= 0
    if FUSED:  # page lookups up front, off the dependent chain: host page of each entry, device page of each slot
        src_page = tl.load(page_table + row * stride_pt + blk, mask=valid, other=-1)
        slot_page = tl.load(cache_pages + row * stride_cr + offs_r, mask=mask_r, other=-1)

    # hits and overlap from [Kb, 32] comparison tiles of tags / M_{t-1} chunks read from memory, reduced along the
    # chunk (H100: whole [Kb, R] and [Kb, Kb] tiles cost 1.4-5 us each). Tags of a (row, head) are distinct and
    # empty slots hold -1, so a valid block matches at most one slot.
    hit_slot = tl.full([KB_P2], -1, dtype=tl.int32)
    for c in tl.static_range(0, R_P2, RC):
        offs_c = c + tl.arange(0, RC)
        tc = tl.load(tags + state + offs_c, mask=offs_c < R, other=-1)
        hit_slot = tl.maximum(hit_slot, tl.max(tl.where(blk[:, None] == tc[None, :], offs_c[None, :], -1), axis=1))
    seen = tl.zeros([KB_P2], dtype=tl.int32)
    for c in tl.static_range(0, KB_P2, KC):
        offs_c = c + tl.arange(0, KC)
        pc = tl.load(prev + row * stride_pr + h * stride_ph + offs_c, mask=offs_c < KB, other=-1)
        seen = tl.maximum(seen, tl.max((blk[:, None] == pc[None, :]).to(tl.int32), axis=1))
    hit_slot = tl.where(valid, hit_slot, -1)
    seen = tl.where(valid, seen, 0)
    hit = hit_slot >= 0
    miss = valid & ~hit
    num_miss = tl.sum(miss.to(tl.int32), axis=0)
    miss_rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1

    # pin M_t's slots: their key becomes PINNED (sorts after every victim candidate)
    tl.store(last_used + state + hit_slot, tl.full([KB_P2], PINNED, tl.int32), mask=hit)
    tl.debug_barrier()
    key = tl.load(lu_ptr, mask=mask_r, other=PINNED)
    rank = tl.zeros([R_P2], dtype=tl.int32)  # place of each slot in (key, slot) order
    for c in tl.static_range(0, R_P2, RC):
        offs_c = c + tl.arange(0, RC)
        kc = tl.load(last_used + state + offs_c, mask=offs_c < R, other=PINNED)
        before = (kc[None, :] < key[:, None]) | ((kc[None, :] == key[:, None]) & (offs_c[None, :] < offs_r[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
    # R >= Kb: at least num_miss slots are not pinned, so the num_miss first are never M_t's
    victim = (rank < num_miss) & mask_r
    vrank = tl.cumsum(victim.to(tl.int32), axis=0) - 1

    # victims in slot order -> misses in entry order, through the first num_miss entries of the copy_dst row (and
    # the victims' device pages through the copy_src row)
    scratch = copy_dst + out_row
    tl.store(scratch + vrank, offs_r, mask=victim)
    if FUSED:
        tl.store(copy_src + out_row + vrank, slot_page, mask=victim)
    tl.debug_barrier()
    victim_slot = tl.load(scratch + miss_rank, mask=miss, other=-1)
    if FUSED:
        dst = tl.load(copy_src + out_row + miss_rank, mask=miss, other=-1)
    tl.debug_barrier()
    slot = tl.where(hit, hit_slot, tl.where(miss, victim_slot, -1))

    tl.store(tags + state + slot, blk, mask=miss)
    tl.store(lu_ptr, tl.where(victim | (key == PINNED), now, lu), mask=mask_r)
    tl.store(prev + p_off, blk, mask=mask_k)
    tl.store(slots + out_row + offs_k, slot, mask=mask_k)
    n_seen = tl.sum(seen, axis=0)
    tl.store(overlap + pid, n_seen)
    tl.store(misses + pid, num_miss)
    if FUSED:
        tl.store(prev_slots + p_off, slot, mask=mask_k)
        tail = mask_k & (offs_k >= num_miss)
        tl.store(copy_src + out_row + offs_k, tl.full([KB_P2], -1, tl.int32), mask=tail)
        tl.store(copy_dst + out_row + offs_k, tl.full([KB_P2], -1, tl.int32), mask=tail)
        tl.store(copy_src + out_row + miss_rank, src_page, mask=miss)
        tl.store(copy_dst + out_row + miss_rank, dst, mask=miss)
        # counters: OVERLAP, SELECTED, COPIED, STEPS, STALL_NS (offload/telemetry.py Counter); relaxed: nothing
        # is ordered by them (the default acq_rel puts a fence around each)
        tl.atomic_add(counters + 0, n_seen.to(tl.int64), sem="relaxed")
        tl.atomic_add(counters + 1, tl.sum(valid.to(tl.int32), axis=0).to(tl.int64), sem="relaxed")
        tl.atomic_add(counters + 2, num_miss.to(tl.int64), sem="relaxed")
        if pid == 0:
            tl.atomic_add(counters + 3, num_miss.to(tl.int64) * 0 + 1, sem="relaxed")
            if RECORD_STALL:  # stamps: LANDED, NEEDED (Stamp)
                tl.atomic_add(counters + 4, tl.maximum(tl.load(stamps + 0) - tl.load(stamps + 1), 0),
                              sem="relaxed")
    else:
        tl.store(copy_src + out_row + offs_k, tl.where(miss, blk, -1), mask=mask_k)
        tl.store(copy_dst + out_row + offs_k, tl.where(miss, slot, -1), mask=mask_k)


def _check(tags, last_used, prev, rows, blocks, step):
    b, hkv, kb = blocks.shape
    r = tags.shape[2]
    assert tags.shape == last_used.shape and tags.shape[1] == hkv and prev.shape[1:] == (hkv, kb)
    assert tags.stride() == last_used.stride() and tags.stride(2) == 1 and prev.stride(2) == 1
    assert blocks.is_contiguous() and rows.shape == (b,) and step.numel() == 1
    assert tags.dtype == last_used.dtype == prev.dtype == blocks.dtype == step.dtype == torch.int32
    assert r >= kb, "a resident set smaller than the block budget cannot hold M_t"
    return b, hkv, kb, r


def _outputs(blocks, out):
    b, hkv, _ = blocks.shape
    if out is None:
        out = tuple(torch.empty_like(blocks) for _ in range(3)) + tuple(
            torch.empty((b, hkv), dtype=torch.int32, device=blocks.device) for _ in range(2))
    assert all(t.is_contiguous() for t in out) and out[0].shape == blocks.shape
    return out


def _launch(tags, last_used, prev, rows, blocks, step, out, fused, fused_args, record_stall):
    b, hkv, kb, r = _check(tags, last_used, prev, rows, blocks, step)
    prev_slots, cache_pages, page_table, counters, stamps = fused_args
    tensors = (tags, last_used, prev, rows, blocks, step, prev_slots, cache_pages, page_table, counters, stamps)
    assert len({t.device.type for t in tensors}) == 1, "one device for all"
    r_p2, kb_p2 = triton.next_power_of_2(r), triton.next_power_of_2(kb)
    # H100, device time at Kb 128 (update alone), 8 / 4 warps: 5.8 / 6.8 us at b1 r1, 9.8 / 14.1 at b1 r2, 13.1 /
    # 17.2 at b32 r2
    warps = NUM_WARPS or (8 if max(r_p2, kb_p2) >= 128 else 4)
    _resident_update_kernel[(b * hkv,)](
        tags, last_used, prev, rows, blocks, step, *out, prev_slots, cache_pages, page_table, counters, stamps,
        tags.stride(0), tags.stride(1), prev.stride(0), prev.stride(1), blocks.stride(0), blocks.stride(1),
        cache_pages.stride(0), page_table.stride(0), HKV=hkv, R=r, KB=kb, R_P2=r_p2, KB_P2=kb_p2,
        RC=min(CHUNK, r_p2), KC=min(CHUNK, kb_p2), FUSED=fused, RECORD_STALL=record_stall, num_warps=warps)
    return out


def resident_update(tags: torch.Tensor, last_used: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor,
                    blocks: torch.Tensor, step: torch.Tensor,
                    out: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, ...]:
    """See `sglang_asynctls.offload.reference.resident_update`. out=(slots, copy_src, copy_dst, overlap, misses)
    preallocated ([B, Hkv, Kb] x3, [B, Hkv] x2, int32) for CUDA-graph capture."""
    out = _outputs(blocks, out)
    # unused fused-only pointers: any int tensors of the right kind (never read with FUSED off)
    return _launch(tags, last_used, prev, rows, blocks, step, out, False, (prev, prev, prev, step, step), False)


def layer_update(tags: torch.Tensor, last_used: torch.Tensor, prev: torch.Tensor, prev_slots: torch.Tensor,
                 rows: torch.Tensor, blocks: torch.Tensor, step: torch.Tensor, cache_pages: torch.Tensor,
                 host_page_table: torch.Tensor, counters: torch.Tensor, stamps: torch.Tensor, record_stall: bool,
                 out: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, ...]:
    """See `sglang_asynctls.offload.reference.layer_update` (one launch). out=(slots, src_pages, dst_pages,
    overlap, misses) as for `resident_update`."""
    assert prev_slots.shape == prev.shape and prev_slots.stride() == prev.stride() and prev_slots is not prev
    assert cache_pages.stride(1) == 1 and host_page_table.stride(1) == 1
    assert cache_pages.dtype == host_page_table.dtype == prev_slots.dtype == torch.int32
    assert counters.shape == (5,) and counters.dtype == torch.int64 and counters.is_contiguous()
    assert stamps.shape == (2,) and stamps.dtype == torch.int64 and stamps.is_contiguous()
    out = _outputs(blocks, out)
    return _launch(tags, last_used, prev, rows, blocks, step, out, True,
                   (prev_slots, cache_pages, host_page_table, counters, stamps), record_stall)
