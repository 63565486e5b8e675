"""The one place that chooses Triton kernels or their torch references for the backend, and the cache they read.

The choice follows the KV pool: Triton on a CUDA pool, the reference (same names and signatures,
`sglang_asynctls/reference.py`) on any other, so a CPU stand-in pool on a GPU host still runs the reference.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def impl_for(buffer: torch.Tensor) -> str:
    """"triton" for a CUDA pool whose kernels import, else "reference"."""
    if buffer.device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401

        return "triton"
    except ImportError as e:
        logger.warning("asynctls: Triton unavailable (%s); using the torch reference kernels", e)
        return "reference"


def sparse_decode_fn(impl: str):
    """(asynctls_decode, impl): the fused Triton decode or the reference."""
    if impl == "triton":
        from sglang_asynctls.decode_step import asynctls_decode
    else:
        from sglang_asynctls.reference import asynctls_decode
    return asynctls_decode, impl


def index_writers(impl: str):
    """(prefill writer, decode appender) for the index pool. The references are ~12 and ~20 small kernels a layer;
    the Triton ones are one launch each."""
    if impl == "triton":
        from sglang_asynctls.kernels.index_append import append_decode_index
        from sglang_asynctls.kernels.index_extend import index_extend
    else:
        from sglang_asynctls.reference import append_decode_index, index_extend
    return index_extend, append_decode_index


def host_row_cache(cfg, pool, request_rows: int, k0, impl: str, block_budget: int = 0):
    """The host tier's read counters (exported at the decode log interval) and, with --asynctls-host-cache-tokens,
    the device cache of host-slot rows (offload/host_cache.py), sized by the request pool, with the prefetch of
    --asynctls-host-prefetch-rows. The KV sizing hook made room for it (patches/kv_sizing.py).
    block_budget: the largest k_b of any layer (the block-overlap count keeps each row's last selection)."""
    from sglang_asynctls.offload import host_stats
    from sglang_asynctls.offload.host_cache import HostRowCache

    v0 = pool.get_value_buffer(getattr(pool, "start_layer", 0) or 0)
    v_is_k = v0.data_ptr() == k0.data_ptr()  # MLA: the latent row is key and value
    k_dim, v_dim = k0.shape[2], v0.shape[2]
    row_bytes = host_stats.row_bytes(k_dim, 0 if v_is_k else v_dim, k0.element_size())
    stats = host_stats.HostReadStats(pool.layer_num, row_bytes, k0.device)
    lines = cfg.host_cache_tokens
    host_from = pool._asynctls_host_tier.device_tokens + pool.page_size  # first host row (after the padding page)
    cache = HostRowCache(pool.layer_num, request_rows, k0.shape[1], lines, k_dim, v_dim, v_is_k, k0.dtype,
                         k0.device, host_from, counters=stats.counters, impl=impl, ahead_rows=cfg.host_prefetch_rows,
                         block_budget=block_budget)
    host_stats.register(stats)
    logger.info("asynctls host tier: rows >= %d are host slots; host-row cache %d lines per request row, layer and "
                "KV head (%.2f GiB for %d request rows); prefetch %s", host_from, lines, cache.nbytes() / 2**30,
                request_rows, f"{cfg.host_prefetch_rows} rows ahead per layer and KV head on a side stream"
                if cfg.host_prefetch_rows else "off")
    return cache
