"""Hooks: size SGLang's KV pool with a host tier and back its per-layer buffers with device+host address ranges.

Targets: sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget, HookType.AROUND
         sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal, HookType.AROUND (GQA/MHA)
         sglang.srt.mem_cache.memory_pool.MLATokenToKVPool._create_buffers, HookType.AROUND (MLA)
SGLang:  0.5.17
Reason:  SGLang's host pools (srt/mem_cache/pool_host/) are separate buffers that its kernels cannot index; a host
         tier every kernel can index must share the device pool's slot numbering. config_from_budget turns the
         profiled GPU budget into the pool's token count: around it we take the AsyncTLS index of the host slots out
         of the GPU budget, then add the host slots. The buffer hook builds each K/V buffer as one VMM range (GPU
         rows first, then host rows) instead of a torch.zeros. Both run in the scheduler process, one after the
         other, and do nothing unless --asynctls-host-kv-gib is set.
"""

from __future__ import annotations

import logging

import torch

from sglang_asynctls.config import FLAGS
from sglang_asynctls.offload import host_tier
from sglang_asynctls.offload.host_cache import cache_bytes
from sglang_asynctls.runtime_config import config_of

SIZING_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget"
BUFFERS_TARGET = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal"
MLA_BUFFERS_TARGET = "sglang.srt.mem_cache.memory_pool.MLATokenToKVPool._create_buffers"
logger = logging.getLogger(__name__)


def _host_kv_gib(server_args) -> float:
    cfg = config_of(server_args)
    return cfg.host_kv_gib if cfg.enabled else 0.0


def config_from_budget_with_host_tier(original, kvc, budget_bytes, *args, **kwargs):
    gib = _host_kv_gib(kvc.server_args)
    if gib <= 0 or kvc.is_draft_worker:
        return original(kvc, budget_bytes, *args, **kwargs)
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator, create_memory_pool_configurator

    configurator = create_memory_pool_configurator(kvc)
    if type(configurator) is not DefaultPoolConfigurator:
        raise ValueError(f"{FLAGS['host_kv_gib']} supports the plain MHA/GQA and MLA KV pools only; this model "
                         f"needs {type(configurator).__name__}")
    cfg, mc = config_of(kvc.server_args), kvc.model_config
    elem = torch.empty(0, dtype=kvc.kv_cache_dtype).element_size()
    host_tokens = host_tier.plan_host_tokens(int(gib * 2**30), configurator._cell_size, kvc.page_size)
    if kvc.use_mla_backend:  # one latent row (kv_lora_rank + rope dims) is both the key and the value
        fraction = host_tier.index_fraction(mc.kv_lora_rank + mc.qk_rope_head_dim, 0, elem,
                                            cfg.resolved_label_channels("mla"), cfg.block_size)
    else:
        fraction = host_tier.index_fraction(mc.head_dim, mc.v_head_dim, elem, cfg.resolved_label_channels("gqa"),
                                            cfg.block_size)
    index_reserve = int(host_tokens * configurator._cell_size * fraction)
    # the host-row cache: every request row (SGLang's pool has max_running_requests + 1) keeps R rows a layer
    request_rows = (getattr(kvc.server_args, "max_running_requests", None) or 0) + 1
    cache_reserve = cache_bytes(request_rows, cfg.host_cache_tokens, configurator._cell_size)
    if index_reserve + cache_reserve >= budget_bytes:
        raise ValueError(f"{FLAGS['host_kv_gib']} {gib:g}: indexing {host_tokens} host tokens needs "
                         f"{index_reserve / 2**30:.1f} GiB of GPU memory and the host-row cache "
                         f"{cache_reserve / 2**30:.1f} GiB, more than the KV budget "
                         f"({budget_bytes / 2**30:.1f} GiB); lower them or raise --mem-fraction-static")
    device = original(kvc, budget_bytes - index_reserve - cache_reserve, *args, **kwargs)
    plan = host_tier.HostTierPlan(device.max_total_num_tokens, host_tokens)
    host_tier.set_plan(plan)
    logger.info("asynctls host tier: %d KV tokens on the GPU + %d in %.1f GiB of pinned host memory (the host "
                "slots' index takes %.2f GiB of the GPU's KV budget, the host-row cache %.2f GiB)",
                plan.device_tokens, plan.host_tokens, host_tokens * configurator._cell_size / 2**30,
                index_reserve / 2**30, cache_reserve / 2**30)
    return configurator.calculate_pool_sizes_from_max_tokens(plan.total_tokens, kvc.page_size)


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
