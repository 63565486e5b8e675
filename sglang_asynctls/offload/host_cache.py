"""The host-row cache (`--asynctls-host-cache-tokens R`): selected host-slot rows kept on the GPU for later steps.

With the KV host tier, decode reads each long request's k_t selected rows per KV head from wherever their slots
are; rows in host slots cross PCIe every step. Consecutive steps select mostly the same tokens (on SmolLM2 the
selections overlap heavily, `offload_token_locality_smollm2.json`), so each (request row, layer, KV head) keeps R
lines in HBM: R / W sets of W ways, LRU within a set. `host_cache_lookup` (one launch a layer) marks which selected
host rows are cached and which miss takes which line; `sparse_decode` then reads hits from the cache and writes
each filled miss into its line as it reads it, so filling costs no extra pass. The attention is exact either way:
a line holds a copy of its slot's K/V, and a request row's lines are dropped whenever the row is prefilled (a new
request, or a chunk), the only time a row's slots can change owner.

The lookup also counts the layer's rows, host rows, hits and fills into `HostReadStats.counters` (host_stats.py).
With R = 0 it only counts.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from sglang_asynctls.config import HOST_CACHE_WAYS
from sglang_asynctls.offload.host_stats import Column

# where the lookup adds its counts in HostReadStats.counters
COLUMNS = (Column.ROWS, Column.HOST_ROWS, Column.CACHE_HITS, Column.CACHE_FILLS, Column.STEPS)


def _lookup_fn(impl: str) -> Callable:
    if impl == "triton":
        from sglang_asynctls.kernels.host_cache import host_cache_lookup
    else:
        from sglang_asynctls.offload.reference import host_cache_lookup
    return host_cache_lookup


def cache_shapes(num_layers: int, request_rows: int, kv_heads: int, lines: int, k_dim: int, v_dim: int,
                 v_is_k: bool, dtype: torch.dtype) -> dict:
    """`HostRowCache`'s tensors, name -> (shape, dtype, count): the tags / stamps / claims tables [L, NR, Hkv, R]
    int32 and each layer's cached K rows [NR * Hkv * R, D] and V rows [NR * Hkv * R, Dv] (none when v_is_k)."""
    n = request_rows * kv_heads * lines
    shapes = {"tables": ((num_layers, request_rows, kv_heads, lines), torch.int32, 3),
              "k": ((n, k_dim), dtype, num_layers)}
    if not v_is_k:
        shapes["v"] = ((n, v_dim), dtype, num_layers)
    return shapes


def cache_bytes(num_layers: int, request_rows: int, kv_heads: int, lines: int, k_dim: int, v_dim: int,
                v_is_k: bool, dtype: torch.dtype) -> int:
    """HBM the cache takes: what `HostRowCache` allocates and the KV sizing hook charges."""
    shapes = cache_shapes(num_layers, request_rows, kv_heads, lines, k_dim, v_dim, v_is_k, dtype)
    return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() * count
               for shape, dt, count in shapes.values())


class HostRowCache:
    """Per layer: tags / stamps / claims [NR, Hkv, R] int32 and the cached rows, K [NR * Hkv * R, D] and V
    [NR * Hkv * R, Dv] (V is K's first Dv columns when v_is_k: MLA's latent row is both)."""

    def __init__(self, num_layers: int, request_rows: int, kv_heads: int, lines: int, k_dim: int, v_dim: int,
                 v_is_k: bool, dtype: torch.dtype, device, host_from: int,
                 counters: Optional[torch.Tensor] = None, impl: str = "reference"):
        if lines % HOST_CACHE_WAYS:
            raise ValueError(f"host-row cache: {lines} lines is not a multiple of {HOST_CACHE_WAYS} ways")
        self.lines, self.host_from, self.counters, self.v_is_k = lines, host_from, counters, v_is_k
        shapes = cache_shapes(num_layers, request_rows, kv_heads, lines, k_dim, v_dim, v_is_k, dtype)
        table = shapes["tables"][0]
        self.tags = torch.full(table, -1, dtype=torch.int32, device=device)
        self.stamps = torch.full(table, -1, dtype=torch.int32, device=device)
        self.claims = torch.full(table, -1, dtype=torch.int32, device=device)  # lookup scratch, -1 between steps
        self.k: List[torch.Tensor] = [torch.zeros(shapes["k"][0], dtype=dtype, device=device)
                                      for _ in range(num_layers)]
        self.v: List[torch.Tensor] = (self.k if v_is_k else [torch.zeros(shapes["v"][0], dtype=dtype, device=device)
                                                             for _ in range(num_layers)])
        self._lookup = _lookup_fn(impl)  # "triton" or "reference", as the backend's decode path

    def nbytes(self) -> int:
        rows = sum(t.numel() * t.element_size() for t in self.k)
        if not self.v_is_k:
            rows += sum(t.numel() * t.element_size() for t in self.v)
        return rows + 3 * self.tags.numel() * 4

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Drop every line of these request rows (all layers): called for each prefill batch's rows."""
        if self.lines:
            r = rows.long()
            self.tags[:, r] = -1
            self.stamps[:, r] = -1

    def for_layer(self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor,
                  active: torch.Tensor) -> Callable[[torch.Tensor], Optional[tuple]]:
        """slots [B, Hkv, K] -> sparse_decode's cache tuple for this layer (None with R = 0: counting only)."""
        counters = self.counters[layer] if self.counters is not None else None

        def lookup(slots: torch.Tensor) -> Optional[tuple]:
            ref = self._lookup(slots, rows, seq_lens, active, self.tags[layer], self.stamps[layer],
                               self.claims[layer], self.host_from, counters, ways=HOST_CACHE_WAYS, columns=COLUMNS)
            return (self.k[layer], self.v[layer], ref) if self.lines else None

        return lookup
