"""ResidentSet: which logical blocks of each request are held on the GPU, per layer and KV head, and where.

A request row owns R resident slots (R = r x k_b); slot c of row n is the device KV page `cache_pages[n, c]` —
pages taken from SGLang's own KV pool at admission, so the resident copies live in the same k/v buffers that
`sparse_decode` already reads, and attention needs no second buffer. Each KV head selects its own blocks, so the
same page holds different logical blocks in different head columns. Per layer the state is tags / last_used
[NR, Hkv, R], M_{t-1} (prev) and its slots (prev_slots) [NR, Hkv, Kb], all int32 on the device.
Per layer and step: `candidates` and `update` are one kernel launch each (`kernels/resident_candidates.py`,
`kernels/resident_update.py::layer_update`), torch references in `offload/reference.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from sglang_asynctls.offload import reference as OR


class Update(NamedTuple):
    """One layer's update: slots [B, Hkv, Kb]; src_pages/dst_pages [B, Hkv, Kb] (host page -> device page of each
    miss, compacted: the misses of (b, h) first, -1 after); overlap, misses [B, Hkv]."""

    slots: torch.Tensor
    src_pages: torch.Tensor
    dst_pages: torch.Tensor
    overlap: torch.Tensor
    misses: torch.Tensor


def kernels(name: Optional[str] = None):
    """(layer_update, resident_candidates): "triton" (one launch each), "reference" (torch), None: triton on a
    GPU machine, the references otherwise."""
    if name is None:
        name = "triton" if torch.cuda.is_available() else "reference"
    if name == "triton":
        from sglang_asynctls.kernels.resident_candidates import resident_candidates
        from sglang_asynctls.kernels.resident_update import layer_update

        return layer_update, resident_candidates
    assert name == "reference", name
    return OR.layer_update, OR.resident_candidates


class ResidentSet:
    def __init__(self, num_layers: int, num_rows: int, num_kv_heads: int, num_slots: int, block_budget: int,
                 device, impl: Optional[str] = None):
        assert num_slots >= block_budget, "the resident set must hold at least one selection (R >= k_b)"
        self.impl = impl or ("triton" if torch.cuda.is_available() else "reference")
        self.update_fn, self.candidates_fn = kernels(self.impl)
        full = dict(dtype=torch.int32, device=device)
        self.tags = torch.full((num_layers, num_rows, num_kv_heads, num_slots), -1, **full)
        self.last_used = torch.full_like(self.tags, -1)
        self.prev = torch.full((num_layers, num_rows, num_kv_heads, block_budget), -1, **full)
        self.prev_slots = torch.full_like(self.prev, -1)
        self.cache_pages = torch.full((num_rows, num_slots), -1, **full)
        self.step = torch.zeros(1, **full)  # LRU clock, a device tensor so that captured graphs read it
        # telemetry sinks for callers without an OffloadTelemetry
        self._counters = torch.zeros(num_layers, 5, dtype=torch.int64, device=device)
        self._stamps = torch.zeros(num_layers, 2, dtype=torch.int64, device=device)
        self.slot_limits: Optional[list] = None

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

    def limit_slots(self, per_layer: Sequence[int]):
        """Give layer l only its first per_layer[l] slots, so that layers with different budgets keep R_l = r x
        k_b(l) inside the uniform tensors. The other slots hold no block (tag -2) and carry a last_used above every
        step but below the kernel's PINNED mark (which it turns back into the step), so they sort after every
        victim and are never chosen while R_l >= k_b(l). Kept across admit and release."""
        limits = [int(n) for n in per_layer]
        if len(limits) != self.tags.shape[0] or not all(1 <= n <= self.tags.shape[-1] for n in limits):
            raise ValueError(f"limit_slots: one limit in [1, {self.tags.shape[-1]}] per layer, got {limits}")
        self.slot_limits = limits
        self._apply_limits(slice(None))

    def _apply_limits(self, r):
        for layer, n in enumerate(self.slot_limits or ()):
            self.tags[layer, r, :, n:] = -2
            self.last_used[layer, r, :, n:] = OR.DISABLED

    def _clear(self, rows: torch.Tensor):
        r = rows.long()
        for t in (self.tags, self.last_used, self.prev, self.prev_slots):
            t[:, r] = -1
        self._apply_limits(r)

    def update(self, layer: int, rows: torch.Tensor, blocks: torch.Tensor, host_page_table: torch.Tensor,
               counters: Optional[torch.Tensor] = None, stamps: Optional[torch.Tensor] = None,
               record_stall: bool = False) -> Update:
        """Make M_t = blocks [B, Hkv, Kb] resident for `layer`: slots, the copies in pages (host_page_table
        [NR, NB] int32: host page of each logical block) and the layer's telemetry counters [5] / stamps [2]
        (OffloadTelemetry rows; `layer_update` says what is added). One launch with the Triton kernels."""
        counters = self._counters[layer] if counters is None else counters
        stamps = self._stamps[layer] if stamps is None else stamps
        return Update(*self.update_fn(self.tags[layer], self.last_used[layer], self.prev[layer],
                                      self.prev_slots[layer], rows, blocks, self.step, self.cache_pages,
                                      host_page_table, counters, stamps, record_stall))

    def advance(self):
        """Once per decode step, after every layer's update."""
        self.step += 1

    def candidates(self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                   needed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens of M_{t-1} for step t: positions [B, Hkv, Kb * BS] int64 (-1 invalid) and the device KV slots of
        their resident copies [B, Hkv, Kb * BS] int32 (-1 invalid). needed: the layer's stamps row, stamped by the
        kernel (GPU)."""
        args = (self.prev[layer], self.prev_slots[layer], self.cache_pages, rows, seq_lens, block_size)
        return self.candidates_fn(*args, needed=needed) if needed is not None else self.candidates_fn(*args)
