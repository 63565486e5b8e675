"""Host-tier read counts per layer, accumulated on the GPU without a host sync and read out at SGLang's decode log
interval: selected token rows read, how many of them sit in host slots (read over PCIe), how many of those the
device-side hot-token cache served, rows written into that cache, decode steps; with the prefetch, rows copied
ahead and how many of them a later step read; and the coarse selection's block overlap with the previous step.

With `--asynctls-host-kv-gib` a layer's KV buffer is one address range, GPU rows [0, gpu_rows) then host rows; a
selected slot >= gpu_rows is a host read unless the cache serves it. The Triton `host_cache_lookup` adds into
`counters` inline (atomics, no op of its own, CUDA-graph safe: the tensor is allocated once and never replaced);
`count_reads` is the same counting in torch ops, which its reference (offload/reference.py) counts with. `snapshot()` is the only host sync; patches/host_read_stats.py calls it at the
decode log interval and exports the interval's figures to the log and to Prometheus.

The backend registers the live stats object of its scheduler process with `register(stats)` (one per process, like
host_tier's plan); the export hook finds it with `current()` and does nothing while there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import List, Optional

import torch


COUNTERS_DTYPE = torch.int64


class Column(IntEnum):
    """Columns of `HostReadStats.counters` ([num_layers, len(Column)] int64)."""
    ROWS = 0  # selected token rows read, counted per KV head (a slot read for 8 KV heads counts 8)
    HOST_ROWS = 1  # of ROWS, those in host slots (slot >= gpu_rows)
    CACHE_HITS = 2  # of HOST_ROWS, those served from the device cache (not read over PCIe)
    CACHE_FILLS = 3  # rows written into the device cache by decode (on a miss, as it reads the row)
    STEPS = 4  # decode steps counted: +1 per layer step
    PREFETCH_HITS = 5  # of CACHE_HITS, the first read of a line the prefetch filled
    PREFETCH_ROWS = 6  # host rows copied into the cache ahead of use (host_prefetch, on the side stream)
    OVERLAP = 7  # sum over (long request, KV head) of |M_t n M_t-1|: coarse blocks the previous step selected too
    OVERLAP_BLOCKS = 8  # sum of |M_t| over the same (request, KV head)s (those with a previous step)


# In-kernel reads of random host rows, per PCIe direction (benchmarks/results/host_read_cost_h100.json: 12.2-16.2
# GB/s for 1 to 9 requests of k_t 1,024 at host shares 0.25-1, H100): what the stall estimate divides late bytes by.
HOST_READ_GBPS = 16.0


def counters_bytes(num_layers: int) -> int:
    """Device bytes of `HostReadStats.counters` (int64): the KV sizing hook charges them with the host tier."""
    return num_layers * len(Column) * torch.empty(0, dtype=COUNTERS_DTYPE).element_size()


def row_bytes(head_dim: int, v_head_dim: int, kv_elem_bytes: int) -> int:
    """K + V bytes of one KV head's row of one token: (head_dim + v_head_dim) x element size. MLA: one latent row is
    both key and value, so head_dim = kv_lora_rank + qk_rope_head_dim and v_head_dim = 0 (host_tier's convention).
    Qwen3-8B bf16: (128 + 128) x 2 = 512."""
    return (head_dim + v_head_dim) * kv_elem_bytes


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0  # an interval with no decode step (or no host row) reports zeros


@dataclass(frozen=True)
class ReadCounts:
    """Counts over some span (all layers or one; since start or since the last snapshot) and the figures derived
    from them. `steps` is the number of decode steps the span covers, not summed over layers."""
    rows: int
    host_rows: int
    cache_hits: int
    cache_fills: int
    steps: int
    bytes_per_row: int
    prefetch_hits: int = 0
    prefetch_rows: int = 0
    overlap: int = 0
    overlap_blocks: int = 0

    @property
    def host_bytes(self) -> int:
        """Bytes read over PCIe inside the step: the late rows'."""
        return self.late_rows * self.bytes_per_row

    @property
    def host_bytes_per_step(self) -> float:
        return _ratio(self.host_bytes, self.steps)

    @property
    def rows_per_step(self) -> float:
        return _ratio(self.rows, self.steps)

    @property
    def host_share(self) -> float:
        return _ratio(self.host_rows, self.rows)

    @property
    def cache_hit_rate(self) -> float:
        return _ratio(self.cache_hits, self.host_rows)

    @property
    def late_rows(self) -> int:
        """Host rows the attention read over PCIe inside the step (not in the cache when it ran): the rows a
        prefetch came too late for, or never predicted. Their bytes are `host_bytes`."""
        return self.host_rows - self.cache_hits

    @property
    def late_rows_per_step(self) -> float:
        return _ratio(self.late_rows, self.steps)

    @property
    def prefetch_rows_per_step(self) -> float:
        return _ratio(self.prefetch_rows, self.steps)

    @property
    def prefetch_bytes_per_step(self) -> float:
        """Bytes copied host -> cache ahead of use a step (side stream: off the step's critical path)."""
        return _ratio(self.prefetch_rows * self.bytes_per_row, self.steps)

    @property
    def prefetch_hit_rate(self) -> float:
        """Share of the rows fetched ahead that a later step read from the cache."""
        return _ratio(self.prefetch_hits, self.prefetch_rows)

    @property
    def block_overlap(self) -> float:
        """|M_t n M_t-1| / |M_t|, averaged over long requests, KV heads, layers and steps (block-weighted)."""
        return _ratio(self.overlap, self.overlap_blocks)

    @property
    def stall_ms_per_step(self) -> float:
        """An estimate, not a measurement: late bytes a step at HOST_READ_GBPS (the GPU A/B measures the stall
        share against an all-resident run, docs/offload.md)."""
        return self.host_bytes_per_step / (HOST_READ_GBPS * 1e9) * 1e3

    def summary_line(self) -> str:
        # the first part is what benchmarks/offload_capacity.py has always parsed; the prefetch figures follow it
        return (f"asynctls host reads: rows/step {self.rows_per_step:,.0f}, host share {self.host_share:.3f}, "
                f"cache hit {self.cache_hit_rate:.3f}, PCIe MB/step {self.host_bytes_per_step / 1e6:.2f} "
                f"({self.steps} steps); late rows/step {self.late_rows_per_step:,.0f}, "
                f"ahead rows/step {self.prefetch_rows_per_step:,.0f} ({self.prefetch_bytes_per_step / 1e6:.2f} "
                f"MB), ahead used {self.prefetch_hit_rate:.3f}, block overlap {self.block_overlap:.3f}, "
                f"stall est ms/step {self.stall_ms_per_step:.2f}")


def _counts(per_layer: torch.Tensor, bytes_per_row: int) -> ReadCounts:
    """per_layer: [L, len(Column)] int64 on the CPU. A decode step runs every layer once, so the span's steps are
    the most any layer counted (a layer that counts nothing, e.g. one without the counter, does not dilute it)."""
    tot = per_layer.sum(0).tolist()
    steps = int(per_layer[:, Column.STEPS].max()) if len(per_layer) else 0
    return ReadCounts(tot[Column.ROWS], tot[Column.HOST_ROWS], tot[Column.CACHE_HITS], tot[Column.CACHE_FILLS],
                      steps, bytes_per_row, tot[Column.PREFETCH_HITS], tot[Column.PREFETCH_ROWS],
                      tot[Column.OVERLAP], tot[Column.OVERLAP_BLOCKS])


@dataclass(frozen=True)
class HostReadSnapshot:
    total: ReadCounts  # all layers, since the stats were created
    delta: ReadCounts  # all layers, since the previous snapshot
    layers: List[ReadCounts]  # per layer, since the previous snapshot


class HostReadStats:
    """counters [num_layers, len(Column)] int64 on `device`; kernels add into it, `snapshot()` reads it.

    Example (CPU; on the GPU `host_cache_lookup` does the counting)::

        stats = HostReadStats(num_layers=2, bytes_per_row=row_bytes(128, 128, 2), device="cpu")
        slots = torch.tensor([[[3, 900, -1]]])  # [B=1, Hkv=1, K=3]; -1 = not selected
        count_reads(slots, 512, counters=stats.counters, layer=0)
        stats.snapshot().delta.host_bytes  # 512: slot 900 is a host row
    """

    def __init__(self, num_layers: int, bytes_per_row: int, device):
        assert num_layers > 0 and bytes_per_row > 0
        self.bytes_per_row = bytes_per_row
        self.counters = torch.zeros(num_layers, len(Column), dtype=COUNTERS_DTYPE, device=device)
        self._last = torch.zeros(num_layers, len(Column), dtype=torch.int64)  # host copy at the last snapshot

    def snapshot(self) -> HostReadSnapshot:
        """Totals since creation and the delta since the previous snapshot (host sync). The counters are never
        reset: a reset would be a device op outside the step, and a captured graph keeps adding into them."""
        now = self.counters.to("cpu", copy=True)  # .cpu() of a CPU tensor is the tensor itself
        delta, self._last = now - self._last, now
        return HostReadSnapshot(total=_counts(now, self.bytes_per_row), delta=_counts(delta, self.bytes_per_row),
                                layers=[_counts(row[None], self.bytes_per_row) for row in delta])


def count_reads(token_slots: torch.Tensor, gpu_rows: int, cache_hit_mask: Optional[torch.Tensor] = None, *,
                counters: torch.Tensor, layer: int) -> None:
    """Add one layer step's reads to counters[layer] with torch ops (no host sync).

    token_slots: [B, Hkv, K] int, the selected KV slots (-1 = not selected), as `sparse_decode` takes them.
    gpu_rows: the first host slot (host_tier: the plan's device tokens + SGLang's padding page).
    cache_hit_mask: [B, Hkv, K] bool or None; True where the device cache served the row (counted only on host
    slots). counters: `HostReadStats.counters`. The Triton kernels do the same counting inline, per program, with
    atomic adds into the same tensor; CACHE_FILLS is added by whatever fills the cache, not here.
    """
    valid = token_slots >= 0
    host = token_slots >= gpu_rows
    hits = host & cache_hit_mask if cache_hit_mask is not None else torch.zeros_like(host)
    one = torch.ones((), dtype=torch.int64, device=counters.device)
    add = torch.stack([valid.sum(), host.sum(), hits.sum(), torch.zeros_like(one), one])
    counters[layer, :len(add)] += add


_live: Optional[HostReadStats] = None


def register(stats: Optional[HostReadStats]) -> None:
    """Make `stats` the one the decode-log export reads in this process (None: stop exporting)."""
    global _live
    _live = stats


def current() -> Optional[HostReadStats]:
    return _live
