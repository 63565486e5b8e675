"""OffloadEngine: the one-step-lag schedule of AsyncTLS offload, per layer.

Step t of layer l attends over tokens of M_{t-1}, whose blocks were made resident by the copy issued at step t-1
(waited for, never read stale), then makes M_t resident: the update runs on the main stream (tiny; keeps the
state in program order), the gather of the missed blocks runs on the copy lane and overlaps the rest of the step.
With the Triton kernels a layer step is three launches and no other op: `resident_candidates` (+ NEEDED stamp),
`layer_update` (update, M_t's slots, copy list in pages, telemetry), `gather_blocks` (+ LANDED stamp).

    engine = OffloadEngine(resident, lane, telemetry, host_k, host_v, dev_k, dev_v, host_page_table, block_size)
    engine.prefetch(layer, rows, m_0)                 # at admission: M_0 from the prefill's last query
    o = engine.step(layer, rows, seq_lens, m_t, attend)  # each decode step and layer
    engine.end_step()                                 # after the last layer
"""

from __future__ import annotations

from typing import Callable, List

import torch

from sglang_asynctls.offload.resident_set import ResidentSet
from sglang_asynctls.offload.telemetry import OffloadTelemetry, Stamp


def _default_gather():
    if torch.cuda.is_available():
        from sglang_asynctls.kernels.gather_blocks import gather_blocks

        return gather_blocks
    from sglang_asynctls.offload.reference import gather_blocks

    return gather_blocks


class OffloadEngine:
    """host_k/host_v: per layer [S_host, Hkv, D] host stores (CUDA views of pinned memory on the GPU); dev_k/dev_v:
    per layer device KV buffers holding the resident pages; host_page_table [NR, NB] int32 host page of each
    logical block of each request row."""

    def __init__(self, resident: ResidentSet, lane, telemetry: OffloadTelemetry, host_k: List[torch.Tensor],
                 host_v: List[torch.Tensor], dev_k: List[torch.Tensor], dev_v: List[torch.Tensor],
                 host_page_table: torch.Tensor, block_size: int, gather_fn=None):
        self.resident, self.lane, self.telemetry = resident, lane, telemetry
        self.host_k, self.host_v, self.dev_k, self.dev_v = host_k, host_v, dev_k, dev_v
        self.host_page_table = host_page_table
        self.block_size = block_size
        self.gather_fn = gather_fn or _default_gather()

    def step(self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor, blocks: torch.Tensor,
             attend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """attend(positions, token_slots) over M_{t-1}'s resident tokens, then make M_t = blocks resident.
        The candidates are index arithmetic on state the main stream wrote (not the copied KV), so they are
        built before the wait; the attention, which reads the copies, after it."""
        tele = self.telemetry
        if not tele.device_stamps:
            tele.stamp(layer, Stamp.NEEDED)
        positions, token_slots = self.resident.candidates(
            layer, rows, seq_lens, self.block_size, needed=tele.stamps[layer] if tele.device_stamps else None)
        self.lane.wait(layer)
        out = attend(positions, token_slots)
        self._update(layer, rows, blocks, record_stall=True)
        return out

    def prefetch(self, layer: int, rows: torch.Tensor, blocks: torch.Tensor):
        """Update the resident set with `blocks` [B, Hkv, Kb] and queue the copies of its misses (admission)."""
        self._update(layer, rows, blocks, record_stall=False)

    def _update(self, layer: int, rows: torch.Tensor, blocks: torch.Tensor, record_stall: bool):
        tele = self.telemetry
        upd = self.resident.update(layer, rows, blocks, self.host_page_table, tele.counters[layer],
                                   tele.stamps[layer], record_stall)
        src, dst = upd.src_pages, upd.dst_pages
        args = (self.host_k[layer], self.host_v[layer], self.dev_k[layer], self.dev_v[layer], src, dst,
                self.block_size)

        def copy():
            if tele.device_stamps:  # the gather's last program stamps LANDED; misses bound each row's scan
                self.gather_fn(*args, landed=(tele.stamps[layer, Stamp.LANDED:Stamp.LANDED + 1],
                                              tele.tickets[layer:layer + 1]), counts=upd.misses)
            else:
                self.gather_fn(*args)
                tele.stamp(layer, Stamp.LANDED)

        self.lane.submit(layer, copy, src, dst, upd.misses)

    def end_step(self):
        self.resident.advance()
        self.lane.end_step()

    def release(self, rows: torch.Tensor) -> torch.Tensor:
        """Abort or finish: wait for in-flight copies (they may target these rows' pages), then forget the rows.
        Returns their device pages [n, R] to free; the caller frees their host pages as well."""
        self.lane.synchronize()
        return self.resident.release(rows)
