"""The KV host tier (`--asynctls-host-kv-gib`): SGLang's KV pool grows by host slots that share its address range.

Each layer's K and V buffer becomes one `SplitRange` (vmm.py): rows [0, device_rows) in HBM, the rest in pinned host
RAM. SGLang's allocator, radix cache, kernels and our index see one pool of device_tokens + host_tokens slots; only
reads and writes of host slots are slower (PCIe). The allocator hands out low slot numbers first, so a pool that is
not full keeps its KV in HBM. Sizing (patches/kv_host_tier.py) happens in the scheduler process before the buffers
are built; the plan is kept here for the buffer hook that follows in the same process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from sglang_asynctls.config import FLAGS, AsyncTLSConfigError


@dataclass(frozen=True)
class HostTierPlan:
    device_tokens: int  # KV slots in HBM (SGLang's padding page comes on top)
    host_tokens: int    # KV slots in pinned host memory, after them

    @property
    def total_tokens(self) -> int:
        return self.device_tokens + self.host_tokens


_plan: Optional[HostTierPlan] = None


def set_plan(plan: Optional[HostTierPlan]) -> None:
    global _plan
    _plan = plan


def current_plan() -> Optional[HostTierPlan]:
    return _plan


def plan_host_tokens(host_bytes: int, cell_bytes: int, page_size: int) -> int:
    """Whole pages of KV (cell_bytes per token, all layers) that fit in host_bytes."""
    if cell_bytes <= 0:
        raise ValueError(f"{FLAGS['host_kv_gib']}: this model's KV pool has no per-token size to extend")
    return host_bytes // cell_bytes // page_size * page_size


def check_host_memory(gib_per_rank: float, ranks: int, meminfo: str = "/proc/meminfo", margin_gib: float = 4.0):
    """Refuse a launch whose host tiers cannot be pinned: pinning past MemAvailable ends in the OOM killer, mid-load."""
    if not os.path.exists(meminfo):
        return
    with open(meminfo) as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    available = int(fields.get("MemAvailable", "0 kB").split()[0]) * 1024 / 2**30
    need = gib_per_rank * ranks
    if need + margin_gib > available:
        raise AsyncTLSConfigError(
            f"{FLAGS['host_kv_gib']} {gib_per_rank:g} x {ranks} GPU(s) = {need:.1f} GiB of pinned host memory, but "
            f"this host has {available:.1f} GiB available and the server needs about {margin_gib:g} GiB more; lower "
            f"{FLAGS['host_kv_gib']}")


def split_buffers(shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, device_rows: int, dev: int,
                  make_range: Optional[Callable] = None) -> Tuple[List[torch.Tensor], list]:
    """One zeroed [rows, ...] tensor per shape whose first device_rows rows are in HBM and the rest in host RAM.
    Returns (tensors, ranges); the ranges own the mappings and must live as long as the tensors."""
    if make_range is None:
        from sglang_asynctls.offload.vmm import SplitRange as make_range
    elem = torch.empty(0, dtype=dtype).element_size()
    tensors, ranges = [], []
    try:
        for shape in shapes:
            row_bytes = math.prod(shape[1:]) * elem
            rows_on_device = min(device_rows, shape[0])
            rng = make_range(rows_on_device * row_bytes, (shape[0] - rows_on_device) * row_bytes, dev)
            ranges.append(rng)
            t = rng.view(shape, dtype)
            t.zero_()  # SGLang's pools start zeroed; the padding page is read by padded decode rows
            tensors.append(t)
    except Exception:
        for rng in ranges:
            rng.close()
        raise
    return tensors, ranges
