"""SGLang plugin entry point (`sglang.srt.plugins: asynctls = sglang_asynctls.plugin:register`).

`register()` runs in every SGLang process (launcher, schedulers, detokenizer) before arguments are parsed. It must
stay cheap: no CUDA initialisation and no kernel imports — the backend module is imported only when a scheduler
builds the `asynctls` backend.
"""

from __future__ import annotations

import logging

from sglang_asynctls.runtime_config import BACKEND_NAME

logger = logging.getLogger(__name__)
_registered = False


def _create_backend(model_runner):
    from sglang_asynctls.backend import create_asynctls_backend

    return create_asynctls_backend(model_runner)


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from sglang_asynctls.patches import (host_read_stats, kv_host_tier, kv_sizing, pool_usage, prebuilt_batch,
                                         server_args_cli, server_args_from_cli)

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(_create_backend)
    HookRegistry.register(server_args_cli.TARGET, server_args_cli.add_asynctls_args, HookType.AFTER)
    HookRegistry.register(server_args_from_cli.TARGET, server_args_from_cli.from_cli_args_with_asynctls,
                          HookType.AROUND)
    # the index (and the host tier's slots) inside SGLang's KV budget; a no-op without --enable-asynctls
    HookRegistry.register(kv_sizing.TARGET, kv_sizing.config_from_budget_with_index, HookType.AROUND)
    # no-ops unless --asynctls-host-kv-gib is set
    HookRegistry.register(kv_host_tier.BUFFERS_TARGET, kv_host_tier.create_buffers_with_host_tier, HookType.AROUND)
    HookRegistry.register(kv_host_tier.MLA_BUFFERS_TARGET, kv_host_tier.create_mla_buffers_with_host_tier,
                          HookType.AROUND)
    # no-op until the backend registers a HostReadStats
    HookRegistry.register(host_read_stats.TARGET, host_read_stats.report_host_reads, HookType.AFTER)
    # /server_info's internal state gains the pools' usage (leak checks); a no-op without --enable-asynctls
    HookRegistry.register(pool_usage.TARGET, pool_usage.report_pool_usage, HookType.AFTER)
    # PD decode server: index the KV that arrived from the prefill server; a no-op without --enable-asynctls
    HookRegistry.register(prebuilt_batch.TARGET, prebuilt_batch.index_arrived_kv, HookType.AFTER)
    _registered = True
