"""Offload telemetry per layer, accumulated on the GPU without a host sync and read out on demand (at the log
interval): overlap |M_t ∩ M_{t-1}|, blocks selected, head-blocks and bytes copied, steps, stall time.

Stall is measured from two timestamps in stream order: when the copy of a layer's M_t landed (side stream, after
the gather) and when the next step first needed it (main stream, before its wait); stall = max(0, landed -
needed). Unlike a pair of stamps around the wait this carries no launch-gap bias when nothing stalls.

On the GPU the counters and stamps are written inside the engine's three kernels (no op of their own): NEEDED by
`resident_candidates` (launched right before the wait), LANDED by the last program of `gather_blocks` (a ticket per
layer), the counters and the stall by `layer_update` (after the attention: both stamps final). On the CPU
(`device_stamps` False) the engine stamps with the host clock around the same points.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Dict

import torch


class Counter(IntEnum):
    OVERLAP = 0  # sum over (row, KV head, step) of |M_t ∩ M_{t-1}|
    SELECTED = 1  # sum of |M_t| (valid entries): the overlap ratio's denominator
    COPIED = 2  # head-blocks copied host -> GPU
    STEPS = 3
    STALL_NS = 4


class Stamp(IntEnum):
    LANDED = 0
    NEEDED = 1


def _host_clock(out: torch.Tensor, index: int) -> None:
    out[index] = time.perf_counter_ns()


class OffloadTelemetry:
    """counters [L, len(Counter)] int64 and stamps [L, 2] int64 on `device`; `summary()` syncs, nothing else does."""

    def __init__(self, num_layers: int, bytes_per_block: int, device):
        self.bytes_per_block = bytes_per_block  # one KV head's K and V of one block
        self.counters = torch.zeros(num_layers, len(Counter), dtype=torch.int64, device=device)
        self.stamps = torch.zeros(num_layers, len(Stamp), dtype=torch.int64, device=device)
        self.tickets = torch.zeros(num_layers, dtype=torch.int32, device=device)  # gather_blocks' last-program count
        self.device_stamps = self.stamps.is_cuda  # stamps taken inside the kernels (GPU timer)

    def stamp(self, layer: int, which: Stamp):
        """Host-clock stamp (CPU path; on the GPU the kernels stamp)."""
        _host_clock(self.stamps[layer], int(which))

    def reset(self):
        self.counters.zero_()

    def summary(self) -> Dict:
        """Per-layer and total figures (host sync). overlap_ratio = sum |M_t ∩ M_{t-1}| / sum |M_t|, so a request's
        first step (nothing before it) counts as no overlap."""
        c = self.counters.cpu().double()
        layers = []
        for row in c:
            sel = max(row[Counter.SELECTED].item(), 1.0)
            layers.append({"overlap_ratio": row[Counter.OVERLAP].item() / sel,
                           "blocks_copied": int(row[Counter.COPIED]),
                           "bytes_copied": int(row[Counter.COPIED]) * self.bytes_per_block,
                           "steps": int(row[Counter.STEPS]), "stall_ms": row[Counter.STALL_NS].item() / 1e6})
        tot = c.sum(0)
        return {"layers": layers,
                "overlap_ratio": tot[Counter.OVERLAP].item() / max(tot[Counter.SELECTED].item(), 1.0),
                "blocks_copied": int(tot[Counter.COPIED]),
                "bytes_copied": int(tot[Counter.COPIED]) * self.bytes_per_block,
                "stall_ms": tot[Counter.STALL_NS].item() / 1e6}
