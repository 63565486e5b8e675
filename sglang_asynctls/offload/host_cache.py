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

Prefetch (`--asynctls-host-prefetch-rows P`): the fine stage also emits, per (request, KV head), the slots of the
next P candidates below the k_t cut-off (`select_token_slots(..., ahead=)`), the likeliest newcomers of the next
step. After the layer's lookup, `host_prefetch` (one launch a layer, on a side stream that forks from the current
one there) copies those, and this step's selected rows the lookup could not cache (one fill per set and step: the
one-step lag), that are host rows and not cached into free lines: lines hit or filled at this step are
never taken, so it runs beside this step's attention, which reads and fills exactly those lines. The next lookup of
the layer must see only landed copies: the step's last layer joins the side stream back (the current stream waits
for the fork's last event), so the next step, its lookups and any prefill's `reset_rows` run after every copy. A
CUDA graph replay has to end with its forks joined, and an event recorded in one replay cannot be waited for in the
next, so the join at the step's end is the wait; copies of layer l overlap layers l..L-1 of the step. No host sync.
A line tagged by a copy is valid from then on; `fetched` marks it until its first read (counted as a prefetch hit).
Every layer also counts |M_t n M_t-1| (`block_overlap`, the coarse selection's locality) for the telemetry.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from sglang_asynctls.config import HOST_CACHE_WAYS
from sglang_asynctls.offload.host_stats import Column

# where the lookup adds its counts in HostReadStats.counters
COLUMNS = (Column.ROWS, Column.HOST_ROWS, Column.CACHE_HITS, Column.CACHE_FILLS, Column.STEPS,
           Column.PREFETCH_HITS)


def _kernels(impl: str) -> dict:
    """lookup, prefetch and overlap: the Triton launchers or their references (same names and signatures)."""
    if impl == "triton":
        from sglang_asynctls.kernels.block_overlap import block_overlap
        from sglang_asynctls.kernels.host_cache import host_cache_lookup
        from sglang_asynctls.kernels.host_prefetch import host_prefetch
    else:
        from sglang_asynctls.offload.reference import block_overlap, host_cache_lookup, host_prefetch
    return {"lookup": host_cache_lookup, "prefetch": host_prefetch, "overlap": block_overlap}


def cache_shapes(num_layers: int, request_rows: int, kv_heads: int, lines: int, k_dim: int, v_dim: int,
                 v_is_k: bool, dtype: torch.dtype, ahead_rows: int = 0, block_budget: int = 0) -> dict:
    """`HostRowCache`'s tensors, name -> (shape, dtype, count): the tags / stamps / claims tables [L, NR, Hkv, R]
    int32, each layer's cached K rows [NR * Hkv * R, D] and V rows [NR * Hkv * R, Dv] (none when v_is_k), with the
    prefetch (ahead_rows > 0) the landed flags [L, NR, Hkv, R] int8, and with block_budget > 0 each row's last
    block selection [L, NR, Hkv, k_b] int32 (the block-overlap count)."""
    table = (num_layers, request_rows, kv_heads, lines)
    n = request_rows * kv_heads * lines
    shapes = {"tables": (table, torch.int32, 3), "k": ((n, k_dim), dtype, num_layers)}
    if not v_is_k:
        shapes["v"] = ((n, v_dim), dtype, num_layers)
    if ahead_rows:
        shapes["fetched"] = (table, torch.int8, 1)
    if block_budget:
        shapes["prev_blocks"] = ((num_layers, request_rows, kv_heads, block_budget), torch.int32, 1)
    return shapes


def cache_bytes(num_layers: int, request_rows: int, kv_heads: int, lines: int, k_dim: int, v_dim: int,
                v_is_k: bool, dtype: torch.dtype, ahead_rows: int = 0, block_budget: int = 0) -> int:
    """HBM the cache takes: what `HostRowCache` allocates and the KV sizing hook charges."""
    shapes = cache_shapes(num_layers, request_rows, kv_heads, lines, k_dim, v_dim, v_is_k, dtype, ahead_rows,
                          block_budget)
    return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() * count
               for shape, dt, count in shapes.values())


class HostRowCache:
    """Per layer: tags / stamps / claims [NR, Hkv, R] int32 and the cached rows, K [NR * Hkv * R, D] and V
    [NR * Hkv * R, Dv] (V is K's first Dv columns when v_is_k: MLA's latent row is both). With ahead_rows P > 0
    (needs R > 0): `fetched` [L, NR, Hkv, R] int8 and the side stream of the prefetch. With block_budget KBM > 0:
    each request row's last coarse selection [L, NR, Hkv, KBM] int32 for the block-overlap count."""

    def __init__(self, num_layers: int, request_rows: int, kv_heads: int, lines: int, k_dim: int, v_dim: int,
                 v_is_k: bool, dtype: torch.dtype, device, host_from: int,
                 counters: Optional[torch.Tensor] = None, impl: str = "reference", ahead_rows: int = 0,
                 block_budget: int = 0):
        if lines % HOST_CACHE_WAYS:
            raise ValueError(f"host-row cache: {lines} lines is not a multiple of {HOST_CACHE_WAYS} ways")
        if ahead_rows and not lines:
            raise ValueError("host-row cache: the prefetch fills cache lines, and there are none (R = 0)")
        self.lines, self.host_from, self.counters, self.v_is_k = lines, host_from, counters, v_is_k
        self.num_layers, self.ahead_rows = num_layers, ahead_rows
        shapes = cache_shapes(num_layers, request_rows, kv_heads, lines, k_dim, v_dim, v_is_k, dtype, ahead_rows,
                              block_budget)
        table = shapes["tables"][0]
        self.tags = torch.full(table, -1, dtype=torch.int32, device=device)
        self.stamps = torch.full(table, -1, dtype=torch.int32, device=device)
        self.claims = torch.full(table, -1, dtype=torch.int32, device=device)  # lookup scratch, -1 between steps
        self.fetched = torch.zeros(table, dtype=torch.int8, device=device) if ahead_rows else None
        self.prev_blocks = (torch.full(shapes["prev_blocks"][0], -1, dtype=torch.int32, device=device)
                            if block_budget else None)
        self.k: List[torch.Tensor] = [torch.zeros(shapes["k"][0], dtype=dtype, device=device)
                                      for _ in range(num_layers)]
        self.v: List[torch.Tensor] = (self.k if v_is_k else [torch.zeros(shapes["v"][0], dtype=dtype, device=device)
                                                             for _ in range(num_layers)])
        self.kernels = _kernels(impl)  # "triton" or "reference", as the backend's decode path
        on_gpu = torch.device(device).type == "cuda"
        self._side = torch.cuda.Stream(torch.device(device)) if ahead_rows and on_gpu else None
        self._inflight: list = []  # tensors the side stream reads, kept alive until the step's join

    def nbytes(self) -> int:
        rows = sum(t.numel() * t.element_size() for t in self.k)
        if not self.v_is_k:
            rows += sum(t.numel() * t.element_size() for t in self.v)
        extra = sum(t.numel() * t.element_size() for t in (self.fetched, self.prev_blocks) if t is not None)
        return rows + 3 * self.tags.numel() * 4 + extra

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Drop every line (and the last block selection) of these request rows, all layers: called for each
        prefill batch's rows, after any copy still in flight (no host sync: a stream wait)."""
        self.join()
        r = rows.long()
        if self.lines:
            self.tags[:, r] = -1
            self.stamps[:, r] = -1
        if self.fetched is not None:
            self.fetched[:, r] = 0
        if self.prev_blocks is not None:
            self.prev_blocks[:, r] = -1

    def join(self) -> None:
        """Make the current stream wait for every copy issued so far (a stream wait, never a host sync)."""
        if self._side is not None:
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)
        self._inflight.clear()

    def for_layer(self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor, active: torch.Tensor,
                  k_buffer: Optional[torch.Tensor] = None, v_buffer: Optional[torch.Tensor] = None) -> "LayerCache":
        """What `asynctls_decode` calls for this layer (k_buffer, v_buffer: the pool's, which the prefetch reads)."""
        return LayerCache(self, layer, rows, seq_lens, active, k_buffer, v_buffer)

    def fetch_ahead(self, layer: int, ahead: torch.Tensor, slots: torch.Tensor, cache_ref: torch.Tensor, rows,
                    seq_lens, active, k_buffer, v_buffer) -> None:
        """Copy the predicted rows `ahead` [B, Hkv, P] and the selected rows `slots` [B, Hkv, K] that this step's
        lookup left uncached (cache_ref -1) into free lines of this layer, on the side stream when there is one
        (forked here, after the lookup; joined at the step's last layer)."""
        counters = self.counters[layer] if self.counters is not None else None
        args = (ahead, rows, seq_lens, active, self.tags[layer], self.stamps[layer], self.claims[layer],
                self.fetched[layer], self.host_from, k_buffer, v_buffer, self.k[layer], self.v[layer], counters)
        kw = dict(ways=HOST_CACHE_WAYS, column=Column.PREFETCH_ROWS, token_slots=slots, cache_ref=cache_ref)
        if self._side is None:
            self.kernels["prefetch"](*args, **kw)
            return
        self._side.wait_stream(torch.cuda.current_stream(self._side.device))
        with torch.cuda.stream(self._side):
            self.kernels["prefetch"](*args, **kw)
        # the caching allocator may hand these to the current stream's next kernels once Python drops them; held
        # until the join is enqueued, they are only reused after it
        self._inflight.append((ahead, slots, cache_ref, rows, seq_lens, active))
        if layer == self.num_layers - 1:
            self.join()


class LayerCache:
    """One layer's view of the cache for `asynctls_decode`: host_cache(slots, blocks, ahead) looks the selected
    slots up (and counts), counts the block overlap of blocks (M_t), fetches ahead (when given) and returns
    `sparse_decode`'s cache tuple (None with R = 0: counting only). ahead_rows: P, the rows to predict."""

    def __init__(self, cache: HostRowCache, layer: int, rows, seq_lens, active, k_buffer, v_buffer):
        self.cache, self.layer, self.rows, self.seq_lens, self.active = cache, layer, rows, seq_lens, active
        self.k_buffer, self.v_buffer = k_buffer, v_buffer
        self.ahead_rows = cache.ahead_rows if k_buffer is not None else 0

    def __call__(self, slots: torch.Tensor, blocks: Optional[torch.Tensor] = None,
                 ahead: Optional[torch.Tensor] = None) -> Optional[tuple]:
        c, l = self.cache, self.layer
        counters = c.counters[l] if c.counters is not None else None
        ref = c.kernels["lookup"](slots, self.rows, self.seq_lens, self.active, c.tags[l], c.stamps[l], c.claims[l],
                                  c.host_from, counters, ways=HOST_CACHE_WAYS, columns=COLUMNS,
                                  fetched=c.fetched[l] if c.fetched is not None else None)
        if blocks is not None and c.prev_blocks is not None:
            c.kernels["overlap"](blocks.contiguous(), self.rows, self.active, c.prev_blocks[l], counters,
                                 columns=(Column.OVERLAP, Column.OVERLAP_BLOCKS))
        if ahead is not None and self.ahead_rows:
            c.fetch_ahead(l, ahead, slots, ref, self.rows, self.seq_lens, self.active, self.k_buffer, self.v_buffer)
        return (c.k[l], c.v[l], ref) if c.lines else None
