"""Shared inputs for the offload tests: random walks of block selections M_t."""

import torch


def walk(num_steps, num_blocks, hkv, kb, keep, seed, pad=0.1, device="cpu"):
    """Selections [B, Hkv, Kb] int32 for rows with num_blocks[b] blocks each: every step keeps about `keep` of the
    previous step's blocks and draws the rest fresh (distinct ids); a share `pad` of entries is -1 padding."""
    g = torch.Generator().manual_seed(seed)
    cur = [[torch.randperm(n, generator=g)[:kb] for _ in range(hkv)] for n in num_blocks]
    out = []
    for _ in range(num_steps):
        for b, n in enumerate(num_blocks):
            for h in range(hkv):
                fresh = torch.randperm(n, generator=g)
                fresh = fresh[~torch.isin(fresh, cur[b][h])]
                drop = torch.rand(kb, generator=g) > keep
                drop[drop.nonzero().flatten()[len(fresh):]] = False  # no fresh block left to draw
                cur[b][h][drop] = fresh[: int(drop.sum())]
        sel = torch.stack([torch.stack(row) for row in cur]).to(torch.int32)
        sel[torch.rand(sel.shape, generator=g) < pad] = -1
        out.append(sel.to(device))
    return out
