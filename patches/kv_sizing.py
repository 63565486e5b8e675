"""Hook: size SGLang's KV pool with the AsyncTLS index (and the host tier, when it is on) inside the KV budget.

Target:  sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget, HookType.AROUND
SGLang:  0.5.17
Reason:  config_from_budget turns the profiled GPU budget into the pool's token count. The index (labels and their
         scale per slot, Kmin/Kmax per block; `index.IndexPool`) is allocated by the backend after the pool, so
         unless it is paid for here it comes out of the memory SGLang kept for activations and CUDA graphs (SmolLM2
         ran out of memory in decode graph capture on the H200). Around it we give the pool budget / (1 + f),
         f = index bytes per KV byte, so pool + index fit where stock's pool alone did. With
         --asynctls-host-kv-gib the host slots' index and the host-row cache come out of the GPU budget as well,
         then the host slots are added to the pool's token count. Runs in the scheduler process, before the pool
         is built; nothing changes without --enable-asynctls.
"""

from __future__ import annotations

import logging

import torch

from sglang_asynctls.config import FLAGS
from sglang_asynctls.index import index_fraction
from sglang_asynctls.offload import host_tier
from sglang_asynctls.offload.host_cache import cache_bytes
from sglang_asynctls.runtime_config import config_if_enabled

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget"
logger = logging.getLogger(__name__)


def index_fraction_of(kvc, cfg) -> float:
    """Index bytes per KV byte for this model's pool."""
    mc = kvc.model_config
    elem = torch.empty(0, dtype=kvc.kv_cache_dtype).element_size()
    if kvc.use_mla_backend:  # one latent row (kv_lora_rank + rope dims) is both the key and the value
        return index_fraction(mc.kv_lora_rank + mc.qk_rope_head_dim, 0, elem,
                                        cfg.resolved_label_channels("mla"), cfg.block_size)
    return index_fraction(mc.head_dim, mc.v_head_dim, elem, cfg.resolved_label_channels("gqa"),
                                    cfg.block_size)


def config_from_budget_with_index(original, kvc, budget_bytes, *args, **kwargs):
    cfg = config_if_enabled(kvc.server_args)
    if cfg is None or kvc.is_draft_worker:
        return original(kvc, budget_bytes, *args, **kwargs)
    fraction = index_fraction_of(kvc, cfg)
    if cfg.host_kv_gib <= 0:
        config = original(kvc, int(budget_bytes / (1 + fraction)), *args, **kwargs)
        logger.info("asynctls: the index takes %.2f GiB of the %.2f GiB KV budget (%.1f%% of KV bytes)",
                    (budget_bytes - budget_bytes / (1 + fraction)) / 2**30, budget_bytes / 2**30, 100 * fraction)
        return config
    return _with_host_tier(original, kvc, budget_bytes, cfg, fraction, *args, **kwargs)


def _with_host_tier(original, kvc, budget_bytes, cfg, fraction, *args, **kwargs):
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator, create_memory_pool_configurator

    configurator = create_memory_pool_configurator(kvc)
    if type(configurator) is not DefaultPoolConfigurator:
        raise ValueError(f"{FLAGS['host_kv_gib']} supports the plain MHA/GQA and MLA KV pools only; this model "
                         f"needs {type(configurator).__name__}")
    gib, cell = cfg.host_kv_gib, configurator._cell_size
    host_tokens = host_tier.plan_host_tokens(int(gib * 2**30), cell, kvc.page_size)
    index_reserve = int(host_tokens * cell * fraction)
    # the host-row cache: every request row (SGLang's pool has max_running_requests + 1) keeps R rows a layer
    request_rows = (getattr(kvc.server_args, "max_running_requests", None) or 0) + 1
    cache_reserve = cache_bytes(request_rows, cfg.host_cache_tokens, cell)
    if index_reserve + cache_reserve >= budget_bytes:
        raise ValueError(f"{FLAGS['host_kv_gib']} {gib:g}: indexing {host_tokens} host tokens needs "
                         f"{index_reserve / 2**30:.1f} GiB of GPU memory and the host-row cache "
                         f"{cache_reserve / 2**30:.1f} GiB, more than the KV budget "
                         f"({budget_bytes / 2**30:.1f} GiB); lower them or raise --mem-fraction-static")
    device_budget = int((budget_bytes - index_reserve - cache_reserve) / (1 + fraction))
    device = original(kvc, device_budget, *args, **kwargs)
    plan = host_tier.HostTierPlan(device.max_total_num_tokens, host_tokens)
    host_tier.set_plan(plan)
    logger.info("asynctls host tier: %d KV tokens on the GPU + %d in %.1f GiB of pinned host memory (the index of "
                "all slots takes %.2f GiB of the GPU's KV budget, the host-row cache %.2f GiB)",
                plan.device_tokens, plan.host_tokens, host_tokens * cell / 2**30,
                (index_reserve + device_budget * fraction) / 2**30, cache_reserve / 2**30)
    return configurator.calculate_pool_sizes_from_max_tokens(plan.total_tokens, kvc.page_size)
