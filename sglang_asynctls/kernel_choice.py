"""The one place that chooses Triton kernels or their torch references for the backend, and sizes what they keep.

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


def check_request_rows_fit(request_rows, num_layers: int, k0) -> None:
    """Per-request block rows cost req_pool_rows x context / block_size rows a layer, whatever the traffic: refuse
    a launch they do not fit (SGLang sizes the request pool to at least 2,048 rows unless told otherwise)."""
    rows, blocks = request_rows
    need = 2 * num_layers * rows * blocks * k0.shape[1] * k0.shape[2] * k0.element_size()
    if k0.device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(k0.device)
    if need > free - (1 << 30):  # keep 1 GiB for activations and CUDA graphs
        raise ValueError(f"asynctls at --page-size 1 keeps block bounds per request row: {need / 2**30:.1f} GiB "
                         f"for {rows} request rows x {blocks} blocks, {free / 2**30:.1f} GiB free. Lower "
                         f"--max-running-requests or --context-length, or use --page-size 64 (the default)")


def host_row_cache(cfg, pool, request_rows: int, k0, impl: str, block_budget: int = 0):
    """The host tier's read counters (exported at the decode log interval) and, with --asynctls-host-cache-tokens,
    the device cache of host-slot rows (offload/host_cache.py), sized by the request pool, with the prefetch of
    --asynctls-host-prefetch-rows. Its memory was taken out of the KV budget at sizing (patches/kv_host_tier.py).
    block_budget: the largest k_b of any layer (the block-overlap count keeps each row's last selection)."""
    from sglang_asynctls.offload import host_stats
    from sglang_asynctls.offload.host_cache import HostRowCache

    v0 = pool.get_value_buffer(getattr(pool, "start_layer", 0) or 0)
    v_is_k = v0.data_ptr() == k0.data_ptr()  # MLA: the latent row is key and value
    k_dim, v_dim = k0.shape[2], v0.shape[2]
    row_bytes = host_stats.row_bytes(k_dim, 0 if v_is_k else v_dim, k0.element_size())
    stats = host_stats.HostReadStats(pool.layer_num, row_bytes, k0.device)
    lines = cfg.host_cache_tokens
    need = pool.layer_num * request_rows * k0.shape[1] * lines * row_bytes
    if lines and k0.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(k0.device)
        if need > free - (1 << 30):  # keep 1 GiB for activations and CUDA graphs
            raise ValueError(f"asynctls: --asynctls-host-cache-tokens {lines} needs {need / 2**30:.1f} GiB for "
                             f"{request_rows} request rows, {free / 2**30:.1f} GiB is free; lower it or "
                             "--max-running-requests")
    host_from = pool._asynctls_host_tier.device_tokens + pool.page_size  # first host row (after the padding page)
    cache = HostRowCache(pool.layer_num, request_rows, k0.shape[1], lines, k_dim, v_dim, v_is_k, k0.dtype,
                         k0.device, host_from, counters=stats.counters, impl=impl, ahead_rows=cfg.host_prefetch_rows,
                         block_budget=block_budget)
    host_stats.register(stats)
    logger.info("asynctls host tier: rows >= %d are host slots; host-row cache %d lines per request row, layer and "
                "KV head (%.2f GiB for %d request rows); prefetch %s", host_from, lines, need / 2**30, request_rows,
                f"{cfg.host_prefetch_rows} rows ahead per layer and KV head on a side stream"
                if cfg.host_prefetch_rows else "off")
    return cache
