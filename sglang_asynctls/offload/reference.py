"""Pure-torch reference of the host-row cache's lookup kernel (`kernels/host_cache.py`): the spec it is held to,
same name and signature.

Notations for shapes: see `sglang_asynctls/reference.py` (B batch rows, Hkv KV heads, K selected slots, NR request
rows of the pool, R cache lines per (row, KV head)).
"""

from __future__ import annotations

from typing import Tuple

import torch


def host_cache_lookup(token_slots: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                      tags: torch.Tensor, stamps: torch.Tensor, claims: torch.Tensor, host_from: int,
                      counters: torch.Tensor = None, *, ways: int,
                      columns: Tuple[int, int, int, int, int] = (0, 1, 2, 3, 4)) -> torch.Tensor:
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
    counters (optional, int64 vector) += valid rows, host rows, hits, fills, 1 step, at columns.
    """
    W = ways

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
    if counters is not None:
        seen = (token_slots >= 0) & active.bool()[:, None, None]
        for column, n in zip(columns, (seen.sum(), (host & seen).sum(), (ref >= 0).sum(), (ref <= -2).sum(),
                                       active.new_ones((), dtype=torch.int64))):
            counters[column] += int(n)
    return ref
