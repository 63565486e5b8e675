"""Pure-torch references of the host-row cache's kernels: the specs they are held to, same names and signatures.

    host_cache_lookup   kernels/host_cache.py      which selected host rows decode reads from the cache, which it fills
    host_prefetch       kernels/host_prefetch.py   copy predicted (and lag) host rows into free lines ahead of use
    block_overlap       kernels/block_overlap.py   |M_t n M_t-1| per (request, KV head), M_t kept for the next step

Notations for shapes: see `sglang_asynctls/reference.py` (B batch rows, Hkv KV heads, K selected slots, NR request
rows of the pool, R cache lines per (row, KV head)); P rows predicted per (row, KV head), KBM blocks kept per row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def host_cache_lookup(token_slots: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                      tags: torch.Tensor, stamps: torch.Tensor, claims: torch.Tensor, host_from: int,
                      counters: torch.Tensor = None, *, ways: int,
                      columns: Tuple[int, ...] = (0, 1, 2, 3, 4, 5), fetched: Optional[torch.Tensor] = None,
                      landed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Host-row cache lookup (offload/host_cache.py); updates tags and stamps in place, claims stay -1.

    token_slots [B, Hkv, K] int32 (-1 = none); rows, seq_lens [B]; active [B] bool (long requests: the only rows
    the cache serves); tags, stamps, claims [NR, Hkv, R] int32: slot held by each line (-1 empty), the step (a row's
    seq_len) it was last used, and scratch (-1). A (row, KV head)'s R lines form R / W sets of W = ways lines;
    slot s lives in set s % (R / W), lines set * W + way.
    For each active (b, h), with now = seq_lens[b], over the selected host slots (>= host_from):
      hits   slots held by a line of their set; those lines get stamp now;
      fills  per set with misses: the line with the lowest (stamp, way) among those whose stamp != now (hit
             lines are never victims), taken by the miss of the highest entry index: tag = slot, stamp = now;
      other misses are read from the host slot and not cached.
    Returns cache_ref [B, Hkv, K] int32: c >= 0 reads cache line c, -(c + 2) reads the slot and fills line c,
    -1 reads the slot; c = (rows[b] * Hkv + h) * R + line (a row of the cache buffers [NR * Hkv * R, D]).
    counters (optional, int64 vector) += valid rows, host rows, hits, fills, 1 step, and (with fetched) hits on
    lines fetched ahead, at columns.
    fetched [NR, Hkv, R] int8 (with the prefetch, `host_prefetch`): 1 on a line filled ahead and not read since; a
    hit counts it and clears it, a fill clears it.
    landed [NR, Hkv, R] bool (this reference only; None = all): False on a line whose ahead copy is still in flight.
    Such a line is neither hit nor victim, so its slot is read from host memory, never from the unfinished copy.
    The kernel needs no mask: HostRowCache orders every copy before the next lookup (stream order), i.e. all landed.
    """
    W = ways

    b, hkv, k = token_slots.shape
    r = tags.shape[2]
    ref = torch.full_like(token_slots, -1)
    host = (token_slots >= host_from) & active.bool()[:, None, None]
    ahead_hits = 0
    for i in range(b if r else 0):
        if not bool(active[i]):
            continue
        row, now = int(rows[i]), int(seq_lens[i])
        for h in range(hkv):
            t, st = tags[row, h], stamps[row, h]  # views: updated in place
            ok = landed[row, h] if landed is not None else torch.ones(r, dtype=torch.bool)
            base = (row * hkv + h) * r
            idx = host[i, h].nonzero().flatten().tolist()
            misses = {}
            for j in idx:
                s = int(token_slots[i, h, j])
                first = (s % (r // W)) * W
                held = ((t[first:first + W] == s) & ok[first:first + W]).nonzero().flatten()
                if len(held):
                    line = first + int(held[0])
                    st[line] = now
                    ref[i, h, j] = base + line
                    if fetched is not None:
                        ahead_hits += int(fetched[row, h, line])
                        fetched[row, h, line] = 0
                else:
                    misses.setdefault(first, []).append(j)
            for first, js in misses.items():
                free = [(int(st[first + w]), w) for w in range(W) if int(st[first + w]) != now and ok[first + w]]
                if not free:
                    continue
                line = first + min(free)[1]
                j = max(js)
                t[line], st[line] = token_slots[i, h, j], now
                if fetched is not None:
                    fetched[row, h, line] = 0
                ref[i, h, j] = -(base + line) - 2
    if counters is not None:
        seen = (token_slots >= 0) & active.bool()[:, None, None]
        counts = [seen.sum(), (host & seen).sum(), (ref >= 0).sum(), (ref <= -2).sum(), 1]
        if fetched is not None:
            counts.append(ahead_hits)
        for column, n in zip(columns, counts):
            counters[column] += int(n)
    return ref


def host_prefetch(ahead_slots: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                  tags: torch.Tensor, stamps: torch.Tensor, claims: torch.Tensor, fetched: torch.Tensor,
                  host_from: int, k_buffer: torch.Tensor, v_buffer: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, counters: torch.Tensor = None, *, ways: int, column: int = 6,
                  token_slots: Optional[torch.Tensor] = None, cache_ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copy predicted host rows into the host-row cache ahead of use; updates tags, stamps, fetched and the cache
    rows in place, claims (scratch) stay -1 (offload/host_cache.py).

    ahead_slots [B, Hkv, P] int32 (-1 = none): the slots step t predicts for step t + 1 (`reference.select_ahead`);
    token_slots, cache_ref [B, Hkv, K] int32 (optional, together): this step's selection and its lookup's verdict;
    the selected slots it read uncached (cache_ref -1) are entries P .. P + K - 1 (the one-step lag), the others
    none. Entries are distinct within a (b, h). rows, seq_lens, active, tags, stamps, claims as `host_cache_lookup`;
    fetched [NR, Hkv, R] int8; k_buffer [S, Hkv, D], v_buffer [S, Hkv, Dv] (a view of k_buffer's first Dv channels
    for MLA: then only K rows are copied and cache_v is cache_k); cache_k [NR * Hkv * R, D], cache_v [.., Dv].
    For each active (b, h), with now = seq_lens[b], over its entries that are host slots (>= host_from) and not held
    by a line of their set: by descending entry index, the k-th such entry of a set takes the set's k-th line in
    (stamp, way) order among those whose stamp != now (lines hit or filled at this step are being read and are never
    taken); entries past the set's free lines are not fetched. A taken line gets the slot's K (and V) row,
    tag = slot, stamp = now, fetched = 1.
    Returns ahead_ref [B, Hkv, P (+ K)] int32: the cache row c = (rows[b] * Hkv + h) * R + line an entry was copied
    to, -1 where none (GPU slot, already held, no free line, inactive row). counters[column] += rows copied.
    """
    W = ways
    b, hkv, p = ahead_slots.shape
    entries = ahead_slots
    if token_slots is not None:
        entries = torch.cat([ahead_slots, torch.where(cache_ref == -1, token_slots, -1)], dim=2)
    r = tags.shape[2]
    sets = r // W
    v_is_k = v_buffer.data_ptr() == k_buffer.data_ptr()
    out = torch.full_like(entries, -1)
    for i in range(b):
        if not bool(active[i]):
            continue
        row, now = int(rows[i]), int(seq_lens[i])
        for h in range(hkv):
            t, st = tags[row, h], stamps[row, h]
            base = (row * hkv + h) * r
            taken = {}  # first line of a set -> its uncached entries seen so far
            for j in reversed(range(entries.shape[2])):
                s = int(entries[i, h, j])
                first = (s % sets) * W
                if s < host_from or bool((t[first:first + W] == s).any()):
                    continue
                free = sorted((int(st[first + w]), w) for w in range(W) if int(st[first + w]) != now)
                k = taken.get(first, 0)
                taken[first] = k + 1
                if k < len(free):
                    out[i, h, j] = base + first + free[k][1]
            for j in (out[i, h] >= 0).nonzero().flatten().tolist():  # decided on the tags as they were: now write
                c, s = int(out[i, h, j]), int(entries[i, h, j])
                cache_k[c] = k_buffer[s, h]
                if not v_is_k:
                    cache_v[c] = v_buffer[s, h]
                t[c - base], st[c - base], fetched[row, h, c - base] = s, now, 1
    if counters is not None:
        counters[column] += int((out >= 0).sum())
    return out


def block_overlap(blocks: torch.Tensor, rows: torch.Tensor, active: torch.Tensor, prev: torch.Tensor,
                  counters: torch.Tensor = None, *, columns: Tuple[int, int] = (7, 8)) -> None:
    """|M_t n M_t-1| of each long request's KV heads, and M_t kept as the next step's M_t-1 (in place).

    blocks [B, Hkv, Kb] int32 (-1 = none): this step's coarse selection M_t; rows, active [B] as `host_cache_lookup`;
    prev [NR, Hkv, KBM] int32, KBM >= Kb: each request row's previous selection, -1 padded (all -1: none yet, as
    after the row's prefill). For each active (b, h) whose prev row holds a selection: counters[columns[0]] +=
    |M_t n M_t-1| and counters[columns[1]] += |M_t| (valid ids; their ratio is the block overlap). Then every active
    row's prev = M_t, -1 padded.
    """
    b, hkv, kb = blocks.shape
    num = den = 0
    for i in range(b):
        if not bool(active[i]):
            continue
        row = int(rows[i])
        for h in range(hkv):
            cur = blocks[i, h][blocks[i, h] >= 0]
            old = prev[row, h][prev[row, h] >= 0]
            if len(old):
                num += int(torch.isin(cur, old).sum())
                den += len(cur)
            prev[row, h] = -1
            prev[row, h, :kb] = blocks[i, h]
    if counters is not None:
        counters[columns[0]] += num
        counters[columns[1]] += den
