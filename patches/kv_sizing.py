"""Hook: size SGLang's KV pool so that it and the backend's GPU buffers fit in SGLang's KV budget.

Target:  sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget, HookType.AROUND
SGLang:  0.5.17
Reason:  config_from_budget turns the profiled GPU budget into the pool's token count. The backend's buffers (the
         index of every slot, block bounds per request row at --page-size 1, the host-row cache;
         `device_memory.PluginBuffers`) are allocated after the pool, so unless they are paid for here they come out
         of the memory SGLang kept for activations and CUDA graphs (SmolLM2 ran out of memory in decode graph
         capture on the H200). Around it we give the pool the most tokens T with T x cell + the buffers' bytes <=
         budget, the request rows counted as SGLang will size its request pool for that pool. With
         --asynctls-host-kv-gib the host slots (and their index) are planned first and added to the pool's token
         count. Runs in the scheduler process, before the pool is built; nothing changes without --enable-asynctls.
"""

from __future__ import annotations

import logging

from sglang_asynctls.config import FLAGS
from sglang_asynctls.device_memory import PluginBuffers, PoolFit, describe, fit_pool
from sglang_asynctls.offload import host_tier
from sglang_asynctls.runtime_config import config_if_enabled

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget"
logger = logging.getLogger(__name__)


def plugin_buffers(kvc, cfg) -> PluginBuffers:
    """This rank's buffers, from the numbers SGLang builds the pool with (kv_cache_configurator._build_*_kv_pool)."""
    mc = kvc.model_config
    if kvc.use_mla_backend:  # one latent row (kv_lora_rank + rope dims) is both the key and the value
        kind, heads, k_dim, v_dim = "mla", 1, mc.kv_lora_rank + mc.qk_rope_head_dim, mc.kv_lora_rank
    else:
        kind, heads, k_dim, v_dim = "gqa", mc.get_num_kv_heads(kvc.ps.attn_tp_size), mc.head_dim, mc.v_head_dim
    return PluginBuffers.for_pool(cfg, kind, num_layers=kvc.layer_info.num_effective_layers, num_kv_heads=heads,
                                  head_dim=k_dim, v_head_dim=v_dim, dtype=kvc.kv_cache_dtype, page_size=kvc.page_size,
                                  context_len=mc.context_len)


def request_rows(kvc, total_tokens: int) -> int:
    """Rows of the req_to_token pool SGLang builds after sizing a pool of total_tokens: resolve_max_num_reqs, the
    pool's padding row, and a PD decode server's pre-allocated rows (kv_cache_configurator._build_req_to_token_pool)."""
    sa = kvc.server_args
    decode = getattr(sa, "disaggregation_mode", "null") == "decode"
    pre_alloc = (getattr(sa, "disaggregation_decode_extra_slots", 0) or 0) if decode else 0
    return kvc.resolve_max_num_reqs(total_tokens) + 1 + pre_alloc


def _configurator(kvc):
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator, create_memory_pool_configurator

    configurator = create_memory_pool_configurator(kvc)
    if type(configurator) is not DefaultPoolConfigurator:
        raise ValueError(f"{FLAGS['enabled']} supports the plain MHA/GQA and MLA KV pools only; this model needs "
                         f"{type(configurator).__name__}")
    return configurator


def plan_pool(kvc, cfg, budget_bytes: int, cell_bytes: int) -> PoolFit:
    """The pool's device tokens (host slots, with --asynctls-host-kv-gib, set aside first) and the buffers' charge;
    refuses a budget that leaves no room for one request of the model's context."""
    host = 0
    if cfg.host_kv_gib > 0:
        host = host_tier.plan_host_tokens(int(cfg.host_kv_gib * 2**30), cell_bytes, kvc.page_size)
    buffers = plugin_buffers(kvc, cfg)
    fit = fit_pool(budget_bytes, cell_bytes, buffers, lambda tokens: request_rows(kvc, tokens), host)
    # stock's pool holds a request of the model's context; one our buffers leave smaller would not
    short = fit.device_tokens + host < buffers.context_len <= budget_bytes // cell_bytes + host
    if short or not fit.device_tokens:
        parts = [f"{host} host slots"] * bool(host) + [f"{fit.request_rows} request rows"] * bool(fit.request_rows)
        what = f" for {' and '.join(parts)}" if parts else ""
        raise ValueError(f"asynctls: the backend's GPU buffers{what} need {sum(fit.charge.values()) / 2**30:.1f} "
                         f"GiB ({describe(fit.charge)}) of the {budget_bytes / 2**30:.1f} GiB KV budget, which leaves "
                         f"{fit.device_tokens} KV tokens, less than one request of {buffers.context_len}; lower "
                         f"--max-running-requests, --context-length or {FLAGS['host_kv_gib']}, use --page-size 64, "
                         "or raise --mem-fraction-static")
    return fit


def config_from_budget_with_index(original, kvc, budget_bytes, *args, **kwargs):
    cfg = config_if_enabled(kvc.server_args)
    # cap_tokens: SGLang's post-capture resize, whose budget is measured with our buffers already allocated
    if cfg is None or kvc.is_draft_worker or kwargs.get("cap_tokens") is not None:
        return original(kvc, budget_bytes, *args, **kwargs)
    configurator = _configurator(kvc)
    cell = configurator._cell_size
    fit = plan_pool(kvc, cfg, budget_bytes, cell)
    # T x cell gives back T tokens, then SGLang's own caps (--max-total-tokens, the PP minimum) apply
    config = original(kvc, fit.device_tokens * cell, *args, **kwargs)
    logger.info("asynctls: of the %.2f GiB KV budget the backend's buffers take %.2f GiB (%s) beside %d KV tokens%s",
                budget_bytes / 2**30, sum(fit.charge.values()) / 2**30, describe(fit.charge), fit.device_tokens,
                f" + {fit.host_tokens} host slots" if fit.host_tokens else "")
    if not fit.host_tokens:
        return config
    plan = host_tier.HostTierPlan(config.max_total_num_tokens, fit.host_tokens)
    host_tier.set_plan(plan)
    logger.info("asynctls host tier: %d KV tokens on the GPU + %d in %.1f GiB of pinned host memory",
                plan.device_tokens, plan.host_tokens, plan.host_tokens * cell / 2**30)
    return configurator.calculate_pool_sizes_from_max_tokens(plan.total_tokens, kvc.page_size)
