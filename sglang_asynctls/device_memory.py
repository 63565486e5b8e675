"""The GPU memory the backend keeps beside one rank's KV pool, and the pool size that leaves room for it.

SGLang sizes its KV pool from a profiled budget (`KVCacheConfigurator.config_from_budget`); the backend's buffers are
allocated after the pool, so they are paid for inside that budget (patches/kv_sizing.py) and refused at launch when
they cannot fit at all (patches/server_args_from_cli.py). The byte counts come from the allocating classes' own
shape functions (`index.IndexShape`, `offload.host_cache.cache_shapes`), so what is charged is what is allocated.

Persistent buffers and what they scale with (S: KV slots incl. host slots and SGLang's padding page; NR: SGLang's
request rows, req_to_token's padding row included; NB = ceil(context / block size)):
- labels [L, Hkv, S, Dc / 2] uint8, label scales [L, Hkv, S] fp32, channels [L, Hkv, Dc] int64;
- block bounds Kmin/Kmax: [S / BS] rows a layer at page size > 1, [NR x NB] rows at page size 1;
- the host-row cache (--asynctls-host-cache-tokens R): NR x Hkv x R lines a layer, and its int32 tables; with the
  prefetch (--asynctls-host-prefetch-rows) an int8 landed flag a line; with the host tier each row's last block
  selection [L, NR, Hkv, k_b] int32 (the block-overlap count);
- the host tier's read counters [L, 5] int64.
Not charged: the CUDA-graph lengths [max bs] int64, allocated when SGLang captures its graphs (4 KiB at SGLang's
largest default max bs, 512). Per-step temporaries (the decode's scores, held in SGLang's CUDA-graph pool; the host
tier's prefix gather in prefill) are not buffers of the backend; docs/launch.md gives their size.

Example (Qwen3-8B shape at page size 1, 17 request rows: --max-running-requests 16 and the padding row)::

    buffers = PluginBuffers(36, 8, 128, 128, False, torch.bfloat16, 32, 64, 1, 131072)
    fit = fit_pool(80 << 30, 36 * 8 * 256 * 2, buffers, rows_of=lambda tokens: 17)
    fit.charge["block_bounds"] / 2**30  # 4.78: 17 rows x 2,048 blocks x 2 x 36 layers x 8 heads x 128 x 2 bytes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from sglang_asynctls.index import IndexShape
from sglang_asynctls.offload.host_cache import cache_bytes
from sglang_asynctls.offload.host_stats import counters_bytes

# SGLang 0.5.17 sizes its request pool (KVCacheConfigurator.resolve_max_num_reqs) to at least this many rows
# unless --max-running-requests is set
SGLANG_MIN_DEFAULT_REQUESTS = 2048


@dataclass(frozen=True)
class PluginBuffers:
    """The backend's persistent GPU buffers for one rank's KV pool, as a function of its slots and request rows.

    num_kv_heads, head_dim, v_head_dim: this rank's pool (MLA: one latent head, keys of kv_lora_rank + rope dims,
    v_is_k: values are the keys' first columns); dtype: the KV dtype; host_tier: --asynctls-host-kv-gib is set (the
    read counters); host_cache_tokens: lines per request row, layer and KV head of the host-row cache (0: none);
    host_prefetch_rows: --asynctls-host-prefetch-rows; overlap_blocks: with the host tier, the largest k_b of any layer
    (the width of each row's last block selection)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    v_is_k: bool
    dtype: torch.dtype
    label_channels: int
    block_size: int
    page_size: int
    context_len: int
    host_cache_tokens: int = 0
    host_tier: bool = False
    host_prefetch_rows: int = 0
    overlap_blocks: int = 0

    @classmethod
    def for_pool(cls, cfg, kind: str, *, num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, page_size: int, context_len: int) -> "PluginBuffers":
        """The buffers an AsyncTLSConfig gives a pool of this shape (kind "gqa" or "mla")."""
        host_tier = cfg.host_kv_gib > 0
        overlap = max(kb for _, kb in cfg.layer_budgets(num_layers)) if host_tier else 0  # as the backend sizes it
        return cls(num_layers, num_kv_heads, head_dim, v_head_dim, kind == "mla", dtype,
                   cfg.resolved_label_channels(kind), cfg.block_size, page_size, context_len, cfg.host_cache_tokens,
                   host_tier, cfg.host_prefetch_rows, overlap)

    @property
    def max_blocks(self) -> int:
        return -(-self.context_len // self.block_size)

    def index_shape(self, num_slots: int, request_rows: int) -> IndexShape:
        rows = (request_rows, self.max_blocks) if self.page_size == 1 else None
        return IndexShape(self.num_layers, num_slots, self.num_kv_heads, self.head_dim, self.label_channels,
                          self.block_size, self.dtype, rows)

    def charge(self, num_slots: int, request_rows: int) -> Dict[str, int]:
        """Bytes of each buffer for a pool of num_slots slots and request_rows request rows."""
        out = self.index_shape(num_slots, request_rows).tensor_bytes()
        out["host_row_cache"] = (cache_bytes(self.num_layers, request_rows, self.num_kv_heads, self.host_cache_tokens,
                                             self.head_dim, self.v_head_dim, self.v_is_k, self.dtype,
                                             self.host_prefetch_rows, self.overlap_blocks) if self.host_tier else 0)
        out["host_read_counters"] = counters_bytes(self.num_layers) if self.host_tier else 0
        return out

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in all layers of this pool (SGLang's cell size for it)."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return self.num_layers * self.num_kv_heads * (self.head_dim + (0 if self.v_is_k else self.v_head_dim)) * elem

    def per_request_row(self) -> int:
        """Bytes every request row costs, whatever the traffic: block bounds at page size 1, host-row cache lines."""
        return sum(self.charge(0, 1).values()) - sum(self.charge(0, 0).values())


@dataclass(frozen=True)
class PoolFit:
    """device_tokens: KV slots on the GPU (whole pages), host_tokens after them; request_rows: SGLang's request rows
    for that pool (0 when nothing is sized by them); charge: the buffers' bytes (`PluginBuffers.charge`)."""

    device_tokens: int
    host_tokens: int
    request_rows: int
    charge: Dict[str, int]


def _largest(fits: Callable[[int], bool], lo: int, hi: int, page: int) -> int:
    """Largest multiple of page in [lo, hi] for which fits (true up to some point, false after) holds; -1 if none."""
    a, b = lo // page, hi // page
    if not fits(a * page):
        return -1
    while a < b:
        m = (a + b + 1) // 2
        a, b = (m, b) if fits(m * page) else (a, m - 1)
    return a * page


def fit_pool(budget: int, cell_bytes: int, buffers: PluginBuffers, rows_of: Callable[[int], int],
             host_tokens: int = 0) -> PoolFit:
    """The most device tokens T (whole pages) with T x cell_bytes + the buffers' bytes <= budget, for a pool of
    T + host_tokens slots and SGLang's padding page. rows_of(total tokens) is SGLang's request-row count for a pool
    of that many tokens (non-decreasing): the rows are charged at the T they come with. device_tokens is 0 when
    nothing fits."""
    page = buffers.page_size
    by_rows = buffers.per_request_row() > 0

    def rows(t: int) -> int:
        return rows_of(t + host_tokens) if by_rows else 0

    def fits(t: int, r: int) -> bool:
        return t * cell_bytes + sum(buffers.charge(t + host_tokens + page, r).values()) <= budget

    top = budget // cell_bytes // page * page  # stock's pool
    r_top = rows(top)
    lo = _largest(lambda t: fits(t, r_top), 0, top, page)  # fits with its own rows too: rows(lo) <= r_top
    if lo < 0 and fits(0, rows(0)):  # stock's pool would have too many rows to fit; a smaller one has fewer
        lo = 0
    if lo < 0:  # nothing fits: the charge of stock's request rows, for the refusal
        return PoolFit(0, host_tokens, r_top, buffers.charge(host_tokens + page, r_top))
    if by_rows:  # no T above hi fits (its rows are at least rows(lo)); bisect between with each T's own rows
        hi = _largest(lambda t: fits(t, rows(lo)), lo, top, page)
        lo = _largest(lambda t: fits(t, rows(t)), lo, hi, page)
    return PoolFit(lo, host_tokens, rows(lo), buffers.charge(lo + host_tokens + page, rows(lo)))


def describe(charge: Dict[str, int]) -> str:
    """'labels 1.23 GiB, label_scale 0.31 GiB, ...' for log lines (buffers of 0 bytes left out)."""
    return ", ".join(f"{name} {n / 2**30:.2f} GiB" for name, n in charge.items() if n)
