"""Hooks: back the KV pool's per-layer buffers with device+host address ranges when the host tier is on.

Targets: sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal, HookType.AROUND (GQA/MHA)
         sglang.srt.mem_cache.memory_pool.MLATokenToKVPool._create_buffers, HookType.AROUND (MLA)
SGLang:  0.5.17
Reason:  SGLang's host pools (srt/mem_cache/pool_host/) are separate buffers that its kernels cannot index; a host
         tier every kernel can index must share the device pool's slot numbering. The sizing hook
         (patches/kv_sizing.py) plans the host slots; this one builds each K/V buffer as one VMM range (GPU rows
         first, then host rows) instead of a torch.zeros. Both run in the scheduler process, one after the other;
         without a plan (no --asynctls-host-kv-gib) SGLang builds its own buffers.
"""

from __future__ import annotations

import logging

import torch

from sglang_asynctls.config import FLAGS
from sglang_asynctls.offload import host_tier

BUFFERS_TARGET = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal"
MLA_BUFFERS_TARGET = "sglang.srt.mem_cache.memory_pool.MLATokenToKVPool._create_buffers"
logger = logging.getLogger(__name__)


def _planned(pool):
    """The plan for this pool, after checking it is the pool the plan was made for."""
    plan = host_tier.current_plan()
    if plan is not None and pool.size != plan.total_tokens:
        raise ValueError(f"{FLAGS['host_kv_gib']}: the KV pool has {pool.size} slots, the host tier was planned "
                         f"for {plan.total_tokens}")
    return plan


def _split(pool, plan, shapes) -> list:
    device = torch.device(pool.device)
    dev = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    device_rows = plan.device_tokens + pool.page_size  # SGLang's padding page included
    buffers, ranges = host_tier.split_buffers(shapes, pool.store_dtype, device_rows, dev)
    pool._asynctls_host_ranges = ranges  # the mappings live as long as the pool
    pool._asynctls_host_tier = plan
    logger.info("asynctls host tier: %d KV buffers of %d rows, rows >= %d in host memory", len(shapes),
                shapes[0][0], device_rows)
    return buffers


def create_buffers_with_host_tier(original, pool):
    plan = _planned(pool)
    if plan is None:
        return original(pool)
    unsupported = {"an HND or vectorized KV layout": pool.use_hnd or pool.kv_cache_layout == "vectorized_5d",
                   "a custom memory pool": pool.enable_custom_mem_pool}
    for what, bad in unsupported.items():
        if bad:
            raise ValueError(f"{FLAGS['host_kv_gib']} does not support {what}")
    k_shape, v_shape = pool._kv_buffer_shapes()
    buffers = _split(pool, plan, [k_shape] * pool.layer_num + [v_shape] * pool.layer_num)
    pool.k_buffer, pool.v_buffer = buffers[:pool.layer_num], buffers[pool.layer_num:]


def create_mla_buffers_with_host_tier(original, pool):
    plan = _planned(pool)
    if plan is None:
        return original(pool)
    if pool.custom_mem_pool:
        raise ValueError(f"{FLAGS['host_kv_gib']} does not support a custom memory pool")
    pool.kv_buffer = _split(pool, plan, [(pool.size + pool.page_size, 1, pool.kv_cache_dim)] * pool.layer_num)
