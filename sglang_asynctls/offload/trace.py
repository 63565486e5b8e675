"""Synthetic selection traces: random walks of M_t with a chosen overlap, for the offload tests and benchmark
(until a recorded trace from a served model replaces them; shared/MEASUREMENTS.md has the measured overlaps)."""

from typing import List, Sequence

import torch


def random_walk(num_steps: int, num_blocks: Sequence[int], num_kv_heads: int, block_budget: int, keep: float,
                seed: int, pad: float = 0.1, device="cpu") -> List[torch.Tensor]:
    """Selections [B, Hkv, Kb] int32 for rows with num_blocks[b] blocks each: every step keeps about `keep` of the
    previous step's blocks and draws the rest fresh (distinct ids); a share `pad` of entries is -1 padding."""
    g = torch.Generator().manual_seed(seed)
    cur = [[torch.randperm(n, generator=g)[:block_budget] for _ in range(num_kv_heads)] for n in num_blocks]
    out = []
    for _ in range(num_steps):
        for b, n in enumerate(num_blocks):
            for h in range(num_kv_heads):
                fresh = torch.randperm(n, generator=g)
                fresh = fresh[~torch.isin(fresh, cur[b][h])]
                drop = torch.rand(len(cur[b][h]), generator=g) > keep
                drop[drop.nonzero().flatten()[len(fresh):]] = False  # no fresh block left to draw
                cur[b][h][drop] = fresh[: int(drop.sum())]
        sel = torch.full((len(num_blocks), num_kv_heads, block_budget), -1, dtype=torch.int32)
        for b, row in enumerate(cur):
            for h, ids in enumerate(row):
                sel[b, h, : len(ids)] = ids.to(torch.int32)
        sel[torch.rand(sel.shape, generator=g) < pad] = -1
        out.append(sel.to(device))
    return out
