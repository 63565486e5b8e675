"""patches/pool_usage.py: the counts the soak's leak check reads from /server_info, on SGLang's own allocators and
request pool (CPU), with slots taken and given back by hand."""

from types import SimpleNamespace

import pytest
import torch

from sglang_asynctls.config import AsyncTLSConfig
from sglang_asynctls.offload.host_cache import HostRowCache
from sglang_asynctls.offload.host_tier import HostTierPlan
from sglang_asynctls.patches import pool_usage

allocators = pytest.importorskip("sglang.srt.mem_cache.allocator.paged")
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

CFG = AsyncTLSConfig(enabled=True, host_kv_gib=1.0, host_cache_tokens=8)


def paged(pages: int, page: int, plan=None):
    kv = SimpleNamespace(_asynctls_host_tier=plan) if plan else SimpleNamespace()
    return allocators.PagedTokenToKVPoolAllocator(pages * page, page, torch.bfloat16, "cpu", kv, False)


def scheduler(allocator, rtp, host_cache=None, running=0, waiting=0, cfg=CFG):
    backend = SimpleNamespace(host_cache=host_cache, stats={"index_arrivals": 3})
    return SimpleNamespace(token_to_kv_pool_allocator=allocator, req_to_token_pool=rtp,
                           tp_worker=SimpleNamespace(model_runner=SimpleNamespace(attn_backend=backend)),
                           tree_cache=SimpleNamespace(evictable_size=lambda: 0),
                           running_batch=SimpleNamespace(reqs=[object()] * running), waiting_queue=[object()] * waiting,
                           server_args=SimpleNamespace(_asynctls_config=cfg))


def take_rows(rtp, n):
    reqs = [SimpleNamespace(req_pool_idx=None, inflight_middle_chunks=0, kv_committed_len=0) for _ in range(n)]
    return rtp.alloc(reqs)


def test_paged_host_slots_are_the_pages_past_the_device_share():
    # 10 pages of 64; the device holds 6 pages (384 slots) + the padding page, so pages 7..10 are host pages
    alloc = paged(10, 64, HostTierPlan(device_tokens=384, host_tokens=256))
    assert pool_usage.host_slots_in_use(alloc, alloc.get_kvcache()._asynctls_host_tier) == 0
    taken = alloc.alloc(8 * 64)  # the lowest pages first: 1..8, of which 7 and 8 are host pages
    plan = alloc.get_kvcache()._asynctls_host_tier
    assert pool_usage.host_slots_in_use(alloc, plan) == 128
    alloc.free(taken)  # into release_pages or free_pages, both are counted as free
    assert pool_usage.host_slots_in_use(alloc, plan) == 0


def test_token_allocator_counts_single_slots():
    plan = HostTierPlan(device_tokens=60, host_tokens=40)  # host slots are 61..100
    alloc = TokenToKVPoolAllocator(100, torch.bfloat16, "cpu", SimpleNamespace(_asynctls_host_tier=plan), False)
    alloc.alloc(70)
    assert pool_usage.host_slots_in_use(alloc, plan) == 10


def test_cache_lines_of_live_rows_and_stale_ones():
    rtp = ReqToTokenPool(4, 128, "cpu", False)
    cache = HostRowCache(2, 5, 2, 8, 4, 4, False, torch.float32, "cpu", host_from=100)
    cache.tags[:, 1, 0, :3] = 7  # row 1: 6 lines over 2 layers
    cache.tags[0, 2, 1, 0] = 9  # row 2: 1 line
    assert take_rows(rtp, 1) == [1]  # row 1 is live, row 2 is free (its line is stale)
    live = pool_usage.rows_in_use(rtp)
    assert live == [1]
    assert pool_usage.cache_lines(cache, live) == {"host_cache_lines_live": 6, "host_cache_lines_tagged": 7}
    assert pool_usage.cache_lines(None, live) == {"host_cache_lines_live": 0, "host_cache_lines_tagged": 0}


def test_hook_adds_the_report_to_the_internal_state():
    alloc, rtp = paged(10, 64, HostTierPlan(384, 256)), ReqToTokenPool(4, 128, "cpu", False)
    alloc.alloc(2 * 64)
    take_rows(rtp, 2)
    result = SimpleNamespace(internal_state={"startup_time": 1})
    assert pool_usage.report_pool_usage(result, scheduler(alloc, rtp, running=2, waiting=1)) is None
    report = result.internal_state["asynctls"]
    assert {k: report[k] for k in ("kv_slots_in_use", "host_slots_in_use", "host_slots_total", "request_rows_in_use",
                                   "running_requests", "waiting_requests")} == {
        "kv_slots_in_use": 128, "host_slots_in_use": 0, "host_slots_total": 256, "request_rows_in_use": 2,
        "running_requests": 2, "waiting_requests": 1}
    assert report["config"]["dense_below"] == CFG.dense_below and result.internal_state["startup_time"] == 1
    assert report["index"] == {"index_arrivals": 3}


def test_hook_leaves_stock_servers_alone_and_never_raises():
    alloc, rtp = paged(4, 64), ReqToTokenPool(2, 64, "cpu", False)
    stock = SimpleNamespace(internal_state={})
    stock_scheduler = scheduler(alloc, rtp)
    stock_scheduler.server_args = SimpleNamespace(attention_backend="fa3")
    pool_usage.report_pool_usage(stock, stock_scheduler)
    assert stock.internal_state == {}
    broken = scheduler(alloc, rtp)
    broken.tree_cache = None
    result = SimpleNamespace(internal_state={})
    pool_usage.report_pool_usage(result, broken)
    assert result.internal_state["asynctls"]["error"].startswith("AttributeError")


def test_plugin_registers_the_hook():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_asynctls import plugin

    plugin.register()
    hooks = HookRegistry._hooks.get(pool_usage.TARGET, [])
    assert any(fn is pool_usage.report_pool_usage for _, fn, _ in hooks)
