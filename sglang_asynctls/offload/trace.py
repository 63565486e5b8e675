"""Synthetic selection traces: random walks of M_t with a chosen overlap, for the offload tests and benchmark
(until a recorded trace from a served model replaces them; shared/MEASUREMENTS.md has the measured overlaps).

On SmolLM2 most blocks that leave M_t come back within a few steps (k_b = 16: overlap 0.86, but an LRU cache of
2 x k_b hits 0.975), so a replacement is drawn, with probability `revisit`, from the blocks dropped recently."""

from typing import List, Sequence

import torch


def _step(cur: torch.Tensor, recent: torch.Tensor, n: int, keep: float, revisit: float, g: torch.Generator):
    """One (row, head): replace about (1 - keep) of cur; returns the new selection and the recently-dropped list."""
    drop = torch.rand(len(cur), generator=g) > keep
    back = torch.unique(recent[~torch.isin(recent, cur)])  # a block dropped twice comes back once
    back = back[torch.randperm(len(back), generator=g)]
    n_back = min(int((torch.rand(int(drop.sum()), generator=g) < revisit).sum()), len(back))
    fresh = torch.randperm(n, generator=g)
    fresh = fresh[~torch.isin(fresh, cur) & ~torch.isin(fresh, back[:n_back])]
    new = torch.cat([back[:n_back], fresh])
    drop[drop.nonzero().flatten()[len(new):]] = False  # no block left to draw
    dropped = cur[drop]
    cur = cur.clone()
    cur[drop] = new[: int(drop.sum())]
    return cur, torch.cat([dropped, recent])[: 2 * len(cur)]


def random_walk(num_steps: int, num_blocks: Sequence[int], num_kv_heads: int, block_budget: int, keep: float,
                seed: int, pad: float = 0.1, revisit: float = 0.0, device="cpu") -> List[torch.Tensor]:
    """Selections [B, Hkv, Kb] int32 for rows with num_blocks[b] blocks each: every step keeps about `keep` of the
    previous step's blocks; a replacement comes back from the last 2 x Kb dropped blocks with probability
    `revisit`, else fresh (ids stay distinct); a share `pad` of entries is -1 padding."""
    g = torch.Generator().manual_seed(seed)
    cur = [[torch.randperm(n, generator=g)[:block_budget] for _ in range(num_kv_heads)] for n in num_blocks]
    recent = [[torch.zeros(0, dtype=torch.long) for _ in range(num_kv_heads)] for _ in num_blocks]
    out = []
    for _ in range(num_steps):
        for b, n in enumerate(num_blocks):
            for h in range(num_kv_heads):
                cur[b][h], recent[b][h] = _step(cur[b][h], recent[b][h], n, keep, revisit, g)
        sel = torch.full((len(num_blocks), num_kv_heads, block_budget), -1, dtype=torch.int32)
        for b, row in enumerate(cur):
            for h, ids in enumerate(row):
                sel[b, h, : len(ids)] = ids.to(torch.int32)
        sel[torch.rand(sel.shape, generator=g) < pad] = -1
        out.append(sel.to(device))
    return out
