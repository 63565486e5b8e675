"""Pure-torch reference of the offload engine's kernels: the spec `kernels/resident_update.py` (resident_update,
layer_update), `kernels/resident_candidates.py` and `kernels/gather_blocks.py` are held to (same names, same
signatures; the kernels take optional extras: `out=`, and the device-clock stamps that only the GPU can take).

Notations for shapes (see also `sglang_asynctls/reference.py`):
    B    batch rows        Hkv  num_kv_heads       Kb  block_budget (|M_t|)     BS  block_size (= page_size)
    NR   request rows of the pool (req_pool_indices index them)                  R   resident slots per (row, head)
    S    token slots of a KV buffer ([S, Hkv, D]; block n of it is rows [n * BS, (n + 1) * BS))

Semantics of the resident-set update (per batch row b = request row rows[b], KV head h):
    state   tags [NR, Hkv, R] int32 (logical block id held by each slot, -1 empty), last_used [NR, Hkv, R] int32
            (step of the last selection that used the slot, -1 empty), prev [NR, Hkv, Kb] int32 (M_{t-1}).
    hits    valid entries of M_t (>= 0) whose block is in tags.
    victims the m slots (m = number of misses) first in (last_used, slot) ascending order among the slots whose tag
            is not in M_t: empty slots first, then least recently used. M_t's blocks are never victims, so no entry
            of M_t can evict another one (needs R >= Kb).
    misses  valid non-hit entries of M_t; the i-th miss in entry order takes the i-th victim in slot order (which
            victim takes which miss does not change the set; slot order is what a prefix sum gives the kernel).
    after   tags[victim] = block, last_used[slot of every valid entry] = step, prev = M_t.
Returns slots [B, Hkv, Kb] int32 (the slot of every valid entry, -1 padded), copy_src / copy_dst [B, Hkv, Kb] int32
(block id -> slot for misses, -1 elsewhere; static shape so that CUDA graphs can capture it), overlap [B, Hkv]
int32 = |M_t ∩ M_{t-1}| and misses [B, Hkv] int32.

One engine step of one layer is three launches (docs/offload.md): `resident_candidates` (M_{t-1}'s tokens and
their resident KV slots, before the copy wait), `layer_update` (resident_update + M_t's slots + the copy list in
pages + telemetry counters, after attention) and `gather_blocks` (the copies, on the copy lane).
"""

from __future__ import annotations

from typing import Tuple

import torch

from sglang_asynctls import reference as _R

# a last_used value above every real step: slots holding M_t's blocks sort after every victim
_PINNED = torch.iinfo(torch.int32).max
# last_used of a slot a layer does not use (ResidentSet.limit_slots): after every victim, never a pinned mark
DISABLED = _PINNED - 1


def resident_update(tags: torch.Tensor, last_used: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor,
                    blocks: torch.Tensor, step: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Assign resident slots to M_t (see the module docstring); updates tags, last_used and prev in place.

    tags, last_used: [NR, Hkv, R] int32; prev: [NR, Hkv, Kb] int32; rows: [B] int; blocks: [B, Hkv, Kb] int32
    (distinct valid ids, -1 padded); step: [1] int32 (a device tensor, so a captured graph sees each step's value).
    """
    r = rows.long()
    t, lu, p = tags[r], last_used[r], prev[r]  # [B, Hkv, R], [B, Hkv, R], [B, Hkv, Kb]
    valid = blocks >= 0
    match = (blocks[..., :, None] == t[..., None, :]) & valid[..., :, None]  # [B, Hkv, Kb, R]
    hit = match.any(-1)
    in_m = match.any(-2)  # slot holds a block of M_t
    key = torch.where(in_m, torch.full_like(lu, _PINNED), lu).long() * t.shape[-1]
    key = key + torch.arange(t.shape[-1], device=t.device)  # ties to the lower slot
    miss = valid & ~hit
    lru_rank = key.argsort(-1).argsort(-1)  # [B, Hkv, R]: place of each slot in the victim order
    chosen = lru_rank < miss.sum(-1, keepdim=True)
    slot_ids = torch.arange(t.shape[-1], device=t.device)
    victims = torch.where(chosen, slot_ids, slot_ids + t.shape[-1]).argsort(-1)  # the chosen first, by slot
    miss_rank = miss.long().cumsum(-1) - 1
    victim = torch.gather(victims, -1, miss_rank.clamp(min=0))  # [B, Hkv, Kb]
    slots = torch.where(hit, match.long().argmax(-1), victim)
    slots = torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)
    copy_src = torch.where(miss, blocks, torch.full_like(blocks, -1))
    copy_dst = torch.where(miss, slots, torch.full_like(slots, -1))
    overlap = ((blocks[..., :, None] == p[..., None, :]) & valid[..., :, None]).any(-1).sum(-1)
    onehot = (slots.long()[..., :, None] == torch.arange(t.shape[-1], device=t.device)) & valid[..., :, None]
    filled = (onehot & miss[..., :, None]).any(-2)  # [B, Hkv, R]
    t = torch.where(filled, (onehot.long() * blocks[..., :, None]).sum(-2).to(t.dtype), t)
    lu = torch.where(onehot.any(-2), step.to(lu.dtype).expand_as(lu), lu)
    tags[r], last_used[r], prev[r] = t, lu, blocks
    return slots, copy_src, copy_dst, overlap.to(torch.int32), miss.sum(-1).to(torch.int32)


# telemetry counters (offload/telemetry.py Counter) and stamps (Stamp), repeated here so the kernels need no import
OVERLAP, SELECTED, COPIED, STEPS, STALL_NS = range(5)
LANDED, NEEDED = range(2)


def layer_update(tags: torch.Tensor, last_used: torch.Tensor, prev: torch.Tensor, prev_slots: torch.Tensor,
                 rows: torch.Tensor, blocks: torch.Tensor, step: torch.Tensor, cache_pages: torch.Tensor,
                 host_page_table: torch.Tensor, counters: torch.Tensor, stamps: torch.Tensor,
                 record_stall: bool) -> Tuple[torch.Tensor, ...]:
    """One layer's update as the engine needs it, in one op: `resident_update`, then prev_slots[rows] = slots,
    the copy list in pages, compacted (the i-th miss of (b, h) in entry order at [b, h, i], -1 after the last:
    host page host_page_table[row, block] -> device page cache_pages[row, slot]), and the layer's telemetry:
    counters [5] int64 += (sum overlap, valid entries, misses, 1 step, stall), stall = max(0, stamps[LANDED] -
    stamps[NEEDED]) when record_stall (a decode step, after the wait: both stamps final), else 0.

    prev_slots [NR, Hkv, Kb] int32; cache_pages [NR, R] int32; host_page_table [NR, NB] int32; counters [5] int64;
    stamps [2] int64 (one layer's rows of OffloadTelemetry). Returns slots, src_pages, dst_pages [B, Hkv, Kb] int32,
    overlap, misses [B, Hkv] int32.
    """
    slots, copy_src, copy_dst, overlap, misses = resident_update(tags, last_used, prev, rows, blocks, step)
    r = rows.long()
    prev_slots[r] = slots
    miss = copy_src >= 0
    src = torch.where(miss, host_page_table[r[:, None, None], copy_src.long().clamp(min=0)], -1)
    dst = torch.where(miss, cache_pages[r[:, None, None], copy_dst.long().clamp(min=0)], -1)
    kb = blocks.shape[-1]
    at = torch.where(miss, miss.long().cumsum(-1) - 1, kb)  # compacted position; kb = a spill column
    src_pages = torch.full(blocks.shape[:-1] + (kb + 1,), -1, dtype=torch.int32, device=blocks.device)
    dst_pages = torch.full_like(src_pages, -1)
    src_pages.scatter_(-1, at, src.to(torch.int32))
    dst_pages.scatter_(-1, at, dst.to(torch.int32))
    stall = (stamps[LANDED] - stamps[NEEDED]).clamp(min=0) if record_stall else torch.zeros_like(stamps[0])
    counters += torch.stack([overlap.sum(), (blocks >= 0).sum(), misses.sum(), torch.ones_like(stall),
                             stall]).to(counters.dtype)
    src_pages, dst_pages = src_pages[..., :kb].contiguous(), dst_pages[..., :kb].contiguous()
    return slots, src_pages, dst_pages, overlap, misses


def resident_candidates(prev: torch.Tensor, prev_slots: torch.Tensor, cache_pages: torch.Tensor, rows: torch.Tensor,
                        seq_lens: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokens of M_{t-1} for step t: positions [B, Hkv, Kb * BS] int64 (-1 invalid: no block, or at/after
    seq_lens[b]) and the device KV slots of their resident copies [B, Hkv, Kb * BS] int32 (-1 invalid), from
    prev / prev_slots [NR, Hkv, Kb] (M_{t-1} and its resident slots) and cache_pages [NR, R] (device page of each
    slot)."""
    r = rows.long()
    blocks, slots = prev[r], prev_slots[r]
    positions = _R.candidate_positions(blocks, seq_lens, block_size)
    pages = cache_pages[r[:, None, None], slots.long().clamp(min=0)]  # [B, Hkv, Kb]
    off = torch.arange(block_size, device=pages.device)
    token_slots = (pages.long()[..., None] * block_size + off).flatten(2)
    return positions, torch.where(positions >= 0, token_slots, -1).to(torch.int32)


def gather_blocks(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                  src_blocks: torch.Tensor, dst_blocks: torch.Tensor, block_size: int) -> None:
    """Copy head-blocks: for every entry (b, h, j) with src_blocks >= 0, rows [n * BS, (n + 1) * BS) of KV head h,
    n = src_blocks[b, h, j], of src_k / src_v go to block dst_blocks[b, h, j] of dst_k / dst_v (same head).

    src_k: [S_src, Hkv, D], src_v: [S_src, Hkv, Dv] (the host store; a CUDA view of pinned memory on the GPU);
    dst_k, dst_v: [S_dst, Hkv, D] / [S_dst, Hkv, Dv]; src_blocks, dst_blocks: [B, Hkv, K] int32 (-1 = skip).
    Valid destinations must be distinct (one writer per destination head-block).
    """
    ok = src_blocks >= 0
    heads = torch.arange(src_k.shape[1], device=src_blocks.device)[None, :, None].expand_as(src_blocks)[ok]
    off = torch.arange(block_size, device=src_blocks.device)
    src_rows = (src_blocks[ok].long()[:, None] * block_size + off).flatten()
    dst_rows = (dst_blocks[ok].long()[:, None] * block_size + off).flatten()
    h = heads.long().repeat_interleave(block_size)
    for src, dst in ((src_k, dst_k), (src_v, dst_v)):
        dst[dst_rows.to(dst.device), h.to(dst.device)] = src[src_rows.to(src.device), h.to(src.device)].to(dst.device)


def host_cache_lookup(token_slots: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                      tags: torch.Tensor, stamps: torch.Tensor, claims: torch.Tensor, host_from: int,
                      counters: torch.Tensor = None) -> torch.Tensor:
    """Host-row cache lookup (offload/host_cache.py); updates tags and stamps in place, claims stay -1.

    token_slots [B, Hkv, K] int32 (-1 = none); rows, seq_lens [B]; active [B] bool (long requests: the only rows
    the cache serves); tags, stamps, claims [NR, Hkv, R] int32: slot held by each line (-1 empty), the step (a row's
    seq_len) it was last used, and scratch (-1). A (row, KV head)'s R lines form R / W sets of W ways
    (W = config.HOST_CACHE_WAYS); slot s lives in set s % (R / W), lines set * W + way.
    For each active (b, h), with now = seq_lens[b], over the selected host slots (>= host_from):
      hits   slots held by a line of their set; those lines get stamp now;
      fills  per set with misses: the line with the lowest (stamp, way) among those whose stamp != now (hit
             lines are never victims), taken by the miss of the highest entry index: tag = slot, stamp = now;
      other misses are read from the host slot and not cached.
    Returns cache_ref [B, Hkv, K] int32: c >= 0 reads cache line c, -(c + 2) reads the slot and fills line c,
    -1 reads the slot; c = (rows[b] * Hkv + h) * R + line (a row of the cache buffers [NR * Hkv * R, D]).
    counters (optional, [len(host_stats.Column)] int64) += valid rows, host rows, hits, fills, 1 step.
    """
    from sglang_asynctls.config import HOST_CACHE_WAYS as W

    b, hkv, k = token_slots.shape
    r = tags.shape[2]
    ref = torch.full_like(token_slots, -1)
    host = (token_slots >= host_from) & active.bool()[:, None, None]
    for i in range(b if r else 0):
        if not bool(active[i]):
            continue
        row, now = int(rows[i]), int(seq_lens[i])
        for h in range(hkv):
            t, st = tags[row, h], stamps[row, h]  # views: updated in place
            base = (row * hkv + h) * r
            idx = host[i, h].nonzero().flatten().tolist()
            misses = {}
            for j in idx:
                s = int(token_slots[i, h, j])
                first = (s % (r // W)) * W
                held = (t[first:first + W] == s).nonzero().flatten()
                if len(held):
                    line = first + int(held[0])
                    st[line] = now
                    ref[i, h, j] = base + line
                else:
                    misses.setdefault(first, []).append(j)
            for first, js in misses.items():
                free = [(int(st[first + w]), w) for w in range(W) if int(st[first + w]) != now]
                if not free:
                    continue
                line = first + min(free)[1]
                j = max(js)
                t[line], st[line] = token_slots[i, h, j], now
                ref[i, h, j] = -(base + line) - 2
    if counters is not None:  # the counting spec is host_stats.count_reads; fills are the cache's own column
        from sglang_asynctls.offload.host_stats import Column, count_reads

        seen = torch.where(active.bool()[:, None, None], token_slots, torch.full_like(token_slots, -1))
        count_reads(seen, host_from, ref >= 0, counters=counters[None], layer=0)
        counters[Column.CACHE_FILLS] += int((ref <= -2).sum())
    return ref
