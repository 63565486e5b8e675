"""ResidentSet: which logical blocks of each request are held on the GPU, per layer and KV head, and where.

A request row owns R resident slots (R = r x k_b); slot c of row n is the device KV page `cache_pages[n, c]` —
pages taken from SGLang's own KV pool at admission, so the resident copies live in the same k/v buffers that
`sparse_decode` already reads, and attention needs no second buffer. Each KV head selects its own blocks, so the
same page holds different logical blocks in different head columns. Per layer the state is tags / last_used
[NR, Hkv, R], M_{t-1} (prev) and its slots (prev_slots) [NR, Hkv, Kb], all int32 on the device.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from sglang_asynctls import reference as R
from sglang_asynctls.offload import reference as OR


class Update(NamedTuple):
    """One layer's update: slots [B, Hkv, Kb]; copy_src/copy_dst [B, Hkv, Kb] (block id -> slot, -1 = none);
    overlap, misses [B, Hkv]."""

    slots: torch.Tensor
    copy_src: torch.Tensor
    copy_dst: torch.Tensor
    overlap: torch.Tensor
    misses: torch.Tensor


def _default_update():
    if torch.cuda.is_available():
        from sglang_asynctls.kernels.resident_update import resident_update

        return resident_update
    return OR.resident_update


class ResidentSet:
    def __init__(self, num_layers: int, num_rows: int, num_kv_heads: int, num_slots: int, block_budget: int,
                 device, update_fn=None):
        assert num_slots >= block_budget, "the resident set must hold at least one selection (R >= k_b)"
        self.update_fn = update_fn or _default_update()
        full = dict(dtype=torch.int32, device=device)
        self.tags = torch.full((num_layers, num_rows, num_kv_heads, num_slots), -1, **full)
        self.last_used = torch.full_like(self.tags, -1)
        self.prev = torch.full((num_layers, num_rows, num_kv_heads, block_budget), -1, **full)
        self.prev_slots = torch.full_like(self.prev, -1)
        self.cache_pages = torch.full((num_rows, num_slots), -1, **full)
        self.step = torch.zeros(1, **full)  # LRU clock, a device tensor so that captured graphs read it

    def admit(self, rows: torch.Tensor, cache_pages: torch.Tensor):
        """New requests at `rows` [n] get device pages [n, R] for their resident slots and an empty set."""
        self._clear(rows)
        self.cache_pages[rows.long()] = cache_pages.to(torch.int32)

    def release(self, rows: torch.Tensor) -> torch.Tensor:
        """Forget `rows`; returns their device pages [n, R] for the caller to free (after in-flight copies)."""
        pages = self.cache_pages[rows.long()].clone()
        self._clear(rows)
        self.cache_pages[rows.long()] = -1
        return pages

    def _clear(self, rows: torch.Tensor):
        r = rows.long()
        for t in (self.tags, self.last_used, self.prev, self.prev_slots):
            t[:, r] = -1

    def update(self, layer: int, rows: torch.Tensor, blocks: torch.Tensor) -> Update:
        """Make M_t = blocks [B, Hkv, Kb] resident for `layer` (slots, and the copies that will make it so)."""
        out = Update(*self.update_fn(self.tags[layer], self.last_used[layer], self.prev[layer], rows, blocks,
                                     self.step))
        self.prev_slots[layer][rows.long()] = out.slots
        return out

    def advance(self):
        """Once per decode step, after every layer's update."""
        self.step += 1

    def copy_pages(self, rows: torch.Tensor, upd: Update, host_page_table: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The copy list in pages: host page of each missed block (host_page_table [NR, NB] int32) -> device page."""
        r = rows.long()[:, None, None]
        src = torch.where(upd.copy_src >= 0, host_page_table[r, upd.copy_src.long().clamp(min=0)], -1)
        dst = torch.where(upd.copy_dst >= 0, self.cache_pages[r, upd.copy_dst.long().clamp(min=0)], -1)
        return src.to(torch.int32).contiguous(), dst.to(torch.int32).contiguous()

    def candidates(self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor,
                   block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens of M_{t-1} for step t: positions [B, Hkv, Kb * BS] int64 (-1 invalid) and the device KV slots of
        their resident copies [B, Hkv, Kb * BS] int32 (-1 invalid)."""
        r = rows.long()
        blocks, slots = self.prev[layer][r], self.prev_slots[layer][r]
        positions = R.candidate_positions(blocks, seq_lens, block_size)
        pages = self.cache_pages[r[:, None, None], slots.long().clamp(min=0)]  # [B, Hkv, Kb]
        off = torch.arange(block_size, device=pages.device)
        token_slots = (pages.long()[..., None] * block_size + off).flatten(2)
        return positions, torch.where(positions >= 0, token_slots, -1).to(torch.int32)
