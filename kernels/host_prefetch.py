"""Host-row prefetch: copy the host rows predicted for the next step into free lines of the host-row cache.

One program per (batch row, KV head) of a long request, one launch a layer, on a side stream (offload/host_cache.py
orders it: after this step's lookup of the layer, before the next one). Its entries are the predicted slots (the
fine stage's next P candidates below the k_t cut-off) followed, with LAG, by this step's selected slots that the
lookup left uncached (cache_ref -1: one fill per set and step; the paper's one-step lag). Those that are host slots
and not held by a line of their set take free lines: in W claim rounds, the r-th least recently used line of each
set not stamped this step goes to its highest-index entry still without one (an atomic claim: deterministic).
Lines hit or filled at this step are being read by this step's attention, so they are never taken. Each taken line
then gets its slot's K (and V) row, read over PCIe in one gather of all the program's rows (column chunks of DCH),
and its tag, stamp and `fetched` flag. Spec: `offload/reference.py::host_prefetch`.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

# a line key no evictable line reaches: lines stamped this step
_NEVER = tl.constexpr(1 << 62)


@triton.jit
def _host_prefetch_kernel(ahead_slots, token_slots, cache_ref, rows, seq_lens, active, tags, stamps, claims, fetched,
                          ahead_ref, k_buffer, v_buffer, cache_k, cache_v, counters, host_from, P, K, stride_ab,
                          stride_ah, stride_tb, stride_th, stride_ks, stride_kh, stride_vs, stride_vh, stride_ob,
                          stride_oh,
                          HKV: tl.constexpr, R: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                          LAG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DCH: tl.constexpr,
                          V_IS_K: tl.constexpr, COUNT: tl.constexpr, C_FETCHED: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    is_active = tl.load(active + b) != 0
    now = tl.load(seq_lens + b).to(tl.int32)
    base = (tl.load(rows + b).to(tl.int64) * HKV + h) * R  # this (request row, KV head)'s first line
    sets = R // W
    ways = tl.arange(0, W)
    offs = tl.arange(0, BLOCK)  # entries: P predicted slots, then (LAG) the step's K selected slots
    slot = tl.load(ahead_slots + b * stride_ab + h * stride_ah + offs, mask=(offs < P) & is_active, other=-1)
    if LAG:
        in_k = (offs >= P) & (offs < P + K) & is_active
        sel = tl.load(token_slots + b * stride_tb + h * stride_th + offs - P, mask=in_k, other=-1)
        uncached = tl.load(cache_ref + b * stride_tb + h * stride_th + offs - P, mask=in_k, other=0) == -1
        slot = tl.where(in_k & uncached, sel, slot)
    host = slot >= host_from
    first = tl.where(host, slot % sets, 0) * W
    line_w = base + first[:, None] + ways[None, :]  # [BLOCK, W]
    tag_w = tl.load(tags + line_w, mask=host[:, None], other=-1)
    miss = host & (tl.sum((tag_w == slot[:, None]).to(tl.int32), axis=1) == 0)
    # each set's lines by (stamp, way), lines stamped now last (never taken): age[i, w] = rank of way w in i's set
    st_w = tl.load(stamps + line_w, mask=miss[:, None], other=0)
    # keys are distinct (way in the low bits), so the ages of a set's lines are a permutation of 0 .. W-1
    key = tl.where(st_w != now, (st_w + 1).to(tl.int64) * W, _NEVER) + ways[None, :]  # empty lines: stamp -1
    age = tl.zeros([BLOCK, W], dtype=tl.int32)
    for w in tl.static_range(W):
        key_w = tl.sum(tl.where(ways[None, :] == w, key, 0), axis=1)
        age += (key_w[:, None] < key).to(tl.int32)
    line = tl.full([BLOCK], -1, tl.int32)
    pending = miss
    for r in tl.static_range(W):  # round r: the set's r-th line goes to its highest-index entry still pending
        way_r = tl.sum(tl.where(age == r, ways[None, :], 0), axis=1)
        key_r = tl.sum(tl.where(age == r, key, 0), axis=1)
        claim = pending & (key_r < _NEVER)
        target = claims + base + first + way_r
        tl.atomic_max(target, offs, mask=claim)
        tl.debug_barrier()
        won = claim & (tl.load(target, mask=claim, other=-1) == offs)
        tl.debug_barrier()
        tl.store(target, -1, mask=won)  # claims stay -1 between launches
        line = tl.where(won, first + way_r, line)
        pending = pending & ~won
    took = line >= 0
    crow = tl.where(took, base + line, -1)
    tl.store(ahead_ref + b * stride_ob + h * stride_oh + offs, crow.to(tl.int32), mask=offs < P + K)  # K: 0 or K
    srow = tl.where(took, slot, 0).to(tl.int64)
    for d0 in tl.static_range(0, D, DCH):
        cols = d0 + tl.arange(0, DCH)
        m = took[:, None] & (cols[None, :] < D)
        k = tl.load(k_buffer + srow[:, None] * stride_ks + h * stride_kh + cols[None, :], mask=m, other=0.0)
        tl.store(cache_k + crow[:, None] * D + cols[None, :], k, mask=m)
    if not V_IS_K:
        for d0 in tl.static_range(0, DV, DCH):
            cols = d0 + tl.arange(0, DCH)
            m = took[:, None] & (cols[None, :] < DV)
            v = tl.load(v_buffer + srow[:, None] * stride_vs + h * stride_vh + cols[None, :], mask=m, other=0.0)
            tl.store(cache_v + crow[:, None] * DV + cols[None, :], v, mask=m)
    # the next lookup of this layer runs after this kernel has finished (stream order), so the order of these
    # stores against the copies above does not matter
    tl.store(tags + base + line, slot, mask=took)
    tl.store(stamps + base + line, now, mask=took)
    tl.store(fetched + base + line, tl.full([BLOCK], 1, tl.int8), mask=took)
    if COUNT:
        tl.atomic_add(counters + C_FETCHED, tl.sum(took.to(tl.int64), axis=0))


def host_prefetch(ahead_slots: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                  tags: torch.Tensor, stamps: torch.Tensor, claims: torch.Tensor, fetched: torch.Tensor,
                  host_from: int, k_buffer: torch.Tensor, v_buffer: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, counters: Optional[torch.Tensor] = None, *, ways: int, column: int = 6,
                  token_slots: Optional[torch.Tensor] = None, cache_ref: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See `sglang_asynctls.offload.reference.host_prefetch`. ways: lines per set; counters: an int64 vector added to
    in-kernel at `column` (rows copied). Returns ahead_ref [B, Hkv, P (+ K)] int32 (into out when given)."""
    b, hkv, p = ahead_slots.shape
    nr, hkv2, r = tags.shape
    d, dv = k_buffer.shape[2], v_buffer.shape[2]
    lag = token_slots is not None
    kk = token_slots.shape[2] if lag else 0
    assert hkv2 == hkv and stamps.shape == claims.shape == fetched.shape == tags.shape and r % ways == 0 and r > 0
    assert tags.is_contiguous() and stamps.is_contiguous() and claims.is_contiguous() and fetched.is_contiguous()
    assert tags.dtype == stamps.dtype == claims.dtype == ahead_slots.dtype == torch.int32
    assert fetched.dtype == torch.int8 and rows.shape == seq_lens.shape == active.shape == (b,)
    assert ahead_slots.stride(2) == 1
    if lag:
        assert token_slots.shape[:2] == (b, hkv) and cache_ref.shape == token_slots.shape
        assert cache_ref.stride() == token_slots.stride() and token_slots.stride(2) == 1
        assert token_slots.dtype == cache_ref.dtype == torch.int32
    assert k_buffer.shape[1] == v_buffer.shape[1] == hkv and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    v_is_k = v_buffer.data_ptr() == k_buffer.data_ptr()
    assert cache_k.shape == (nr * hkv * r, d) and cache_k.is_contiguous() and cache_k.dtype == k_buffer.dtype
    assert v_is_k or (cache_v.shape == (nr * hkv * r, dv) and cache_v.is_contiguous()
                      and cache_v.dtype == v_buffer.dtype)
    if out is None:
        out = torch.empty(b, hkv, p + kk, dtype=torch.int32, device=ahead_slots.device)
    assert out.shape == (b, hkv, p + kk) and out.dtype == torch.int32 and out.stride(2) == 1
    if counters is not None:
        assert counters.dim() == 1 and counters.dtype == torch.int64 and counters.is_contiguous()
    block = triton.next_power_of_2(max(p + kk, 1))
    dch = max(16, min(64, 8192 // block))  # the [entries, DCH] copy tile stays at most 8,192 elements
    sel = token_slots if lag else ahead_slots
    _host_prefetch_kernel[(b * hkv,)](
        ahead_slots, sel, cache_ref if lag else sel, rows, seq_lens, active, tags, stamps, claims, fetched, out,
        k_buffer, v_buffer, cache_k, cache_k if v_is_k else cache_v, counters if counters is not None else out,
        host_from, p, kk, ahead_slots.stride(0), ahead_slots.stride(1), sel.stride(0), sel.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1), out.stride(0),
        out.stride(1), HKV=hkv, R=r, W=ways, BLOCK=block, LAG=lag, D=d, DV=dv, DCH=dch, V_IS_K=v_is_k,
        COUNT=counters is not None, C_FETCHED=int(column), num_warps=4 if block <= 256 else 8)
    return out
