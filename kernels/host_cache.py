"""Host-row cache lookup: which selected host-slot rows decode reads from the device cache, and which it fills.

One program per (batch row, KV head) of a long request. The cache of a (request row, KV head) is R lines in R / W
sets of W ways; a slot lives in set slot % (R / W). Hits are stamped with the step (the row's seq_len) first, so no
miss of this step can evict a line another token is about to read; then each set with misses offers its least
recently used line not stamped this step, and the miss with the highest entry index takes it (an atomic claim:
the result does not depend on program timing). Other misses of that set read over PCIe uncached this step.
With the prefetch (`fetched`), a hit on a line fetched ahead is counted apart and clears the line's flag.
Spec: `offload/reference.py::host_cache_lookup`.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl



@triton.jit
def _host_cache_lookup_kernel(token_slots, rows, seq_lens, active, tags, stamps, claims, cache_ref, counters,
                              fetched, host_from, K, stride_tb, stride_th, stride_ob, stride_oh,
                              HKV: tl.constexpr, R: tl.constexpr, W: tl.constexpr, BLOCK_K: tl.constexpr,
                              COUNT: tl.constexpr, C_ROWS: tl.constexpr,
                              C_HOST: tl.constexpr, C_HITS: tl.constexpr, C_FILLS: tl.constexpr,
                              C_STEPS: tl.constexpr, AHEAD: tl.constexpr, C_AHEAD: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs = tl.arange(0, BLOCK_K)
    in_k = offs < K
    is_active = tl.load(active + b) != 0
    slot = tl.load(token_slots + b * stride_tb + h * stride_th + offs, mask=in_k & is_active, other=-1)
    valid = slot >= 0
    host = valid & (slot >= host_from)
    out = cache_ref + b * stride_ob + h * stride_oh + offs
    hits = 0
    fills = 0
    ahead_hits = 0
    if R > 0:
        now = tl.load(seq_lens + b).to(tl.int32)
        base = (tl.load(rows + b).to(tl.int64) * HKV + h) * R  # this (request row, KV head)'s first line
        sets = R // W
        ways = tl.arange(0, W)
        first = tl.where(host, slot % sets, 0) * W  # first line of each token's set
        line_w = base + first[:, None] + ways[None, :]  # [BLOCK_K, W]
        tag_w = tl.load(tags + line_w, mask=host[:, None], other=-1)
        hit_w = (tag_w == slot[:, None]) & host[:, None]
        hit = tl.sum(hit_w.to(tl.int32), axis=1) > 0
        hit_line = first + tl.sum(tl.where(hit_w, ways[None, :], 0), axis=1)
        tl.store(stamps + base + hit_line, now, mask=hit)
        if AHEAD:  # a hit on a line the prefetch filled: counted once, then it is an ordinary line
            ahead_hits = tl.sum(tl.load(fetched + base + hit_line, mask=hit, other=0).to(tl.int64), axis=0)
            tl.store(fetched + base + hit_line, tl.zeros([BLOCK_K], tl.int8), mask=hit)
        tl.debug_barrier()
        # each missing token's candidate victim: its set's LRU line among those not stamped this step
        miss = host & ~hit
        st_w = tl.load(stamps + line_w, mask=miss[:, None], other=0)
        key = tl.where(st_w != now, (st_w + 1).to(tl.int64) * W + ways[None, :], 1 << 62)  # empty lines: stamp -1
        best = tl.min(key, axis=1)
        claim = miss & (best < (1 << 62))
        victim = first + (best % W).to(tl.int32)
        tl.atomic_max(claims + base + victim, offs, mask=claim)
        tl.debug_barrier()
        won = claim & (tl.load(claims + base + victim, mask=claim, other=-1) == offs)
        tl.store(tags + base + victim, slot, mask=won)
        tl.store(stamps + base + victim, now, mask=won)
        tl.store(claims + base + victim, -1, mask=won)  # claims stay -1 between steps
        if AHEAD:
            tl.store(fetched + base + victim, tl.zeros([BLOCK_K], tl.int8), mask=won)
        ref = tl.where(hit, base + hit_line, tl.where(won, -(base + victim) - 2, -1))
        tl.store(out, ref.to(tl.int32), mask=in_k)
        hits = tl.sum(hit.to(tl.int64), axis=0)
        fills = tl.sum(won.to(tl.int64), axis=0)
    else:
        tl.store(out, tl.full([BLOCK_K], -1, tl.int32), mask=in_k)
    if COUNT:
        tl.atomic_add(counters + C_ROWS, tl.sum(valid.to(tl.int64), axis=0))
        tl.atomic_add(counters + C_HOST, tl.sum(host.to(tl.int64), axis=0))
        tl.atomic_add(counters + C_HITS, hits)
        tl.atomic_add(counters + C_FILLS, fills)
        tl.atomic_add(counters + C_STEPS, (pid == 0).to(tl.int64))
        if AHEAD:
            tl.atomic_add(counters + C_AHEAD, ahead_hits)


def host_cache_lookup(token_slots: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                      tags: torch.Tensor, stamps: torch.Tensor, claims: torch.Tensor, host_from: int,
                      counters: Optional[torch.Tensor] = None, *, ways: int,
                      columns: Tuple[int, ...] = (0, 1, 2, 3, 4, 5), fetched: Optional[torch.Tensor] = None,
                      landed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See `sglang_asynctls.offload.reference.host_cache_lookup`. ways: lines per set. counters: an int64 vector
    added to in-kernel (no host sync); columns: where in it the valid rows, host rows, hits, fills, steps and
    (with fetched [NR, Hkv, R] int8) hits on lines fetched ahead go. landed must be None: every copy has landed
    before a lookup runs (stream order, offload/host_cache.py)."""
    b, hkv, k = token_slots.shape
    nr, hkv2, r = tags.shape
    assert hkv2 == hkv and stamps.shape == claims.shape == tags.shape and tags.is_contiguous()
    assert stamps.is_contiguous() and claims.is_contiguous() and token_slots.stride(2) == 1
    assert tags.dtype == stamps.dtype == claims.dtype == token_slots.dtype == torch.int32
    W = ways
    assert r % W == 0 and rows.shape == seq_lens.shape == active.shape == (b,)
    cache_ref = torch.empty(b, hkv, k, dtype=torch.int32, device=token_slots.device)
    if counters is not None:
        assert counters.dim() == 1 and counters.dtype == torch.int64 and counters.is_contiguous()
    assert landed is None, "the Triton lookup runs after every ahead copy it could see has landed"
    if fetched is not None:
        assert fetched.shape == tags.shape and fetched.dtype == torch.int8 and fetched.is_contiguous()
    _host_cache_lookup_kernel[(b * hkv,)](
        token_slots, rows, seq_lens, active, tags, stamps, claims, cache_ref,
        counters if counters is not None else cache_ref, fetched if fetched is not None else tags, host_from, k,
        token_slots.stride(0), token_slots.stride(1),
        cache_ref.stride(0), cache_ref.stride(1), HKV=hkv, R=r, W=W, BLOCK_K=triton.next_power_of_2(k),
        COUNT=counters is not None, C_ROWS=int(columns[0]), C_HOST=int(columns[1]), C_HITS=int(columns[2]),
        C_FILLS=int(columns[3]), C_STEPS=int(columns[4]), AHEAD=fetched is not None and r > 0,
        C_AHEAD=int(columns[5]) if fetched is not None else 0, num_warps=4)
    return cache_ref
