"""Hook: report what the pools hold (KV slots, host slots, host-row cache lines, request rows) in `/server_info`.

Target:  sglang.srt.managers.scheduler.Scheduler.get_internal_state, HookType.AFTER
SGLang:  0.5.17
Reason:  a leak check (benchmarks/soak.py) must see, after `/flush_cache`, that nothing is left allocated: SGLang
         reports its token usage, but not how many host-tier slots or host-row cache lines are in use, which only
         the plugin knows. After get_internal_state builds its dict we add `asynctls`: the counts below, the
         backend's index counters (a PD smoke run checks the KV that arrived was indexed) and the server's
         AsyncTLS config. It runs only when `/server_info` is asked (one host sync for the cache tags);
         nothing is added without --enable-asynctls, and a failure is reported in the dict, never raised.
"""

from __future__ import annotations

import dataclasses

import torch

from sglang_asynctls.runtime_config import config_if_enabled

TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"


def _free_pages(allocator) -> torch.Tensor:
    # SGLang's allocators keep free page ids in two lists (freed lazily into release_pages); page 0 is padding
    parts = [p for p in (allocator.free_pages, allocator.release_pages) if p is not None]
    return torch.cat([p.reshape(-1).long() for p in parts]) if parts else torch.empty(0, dtype=torch.long)


def host_slots_in_use(allocator, plan) -> int:
    """Slots >= the first host slot (plan.device_tokens + the padding page) that are not free."""
    page = allocator.page_size
    host_from = plan.device_tokens + page
    num_pages = allocator.size // page
    first_host_page = -(-host_from // page)
    host_pages = max(0, num_pages - first_host_page + 1)
    free_host_pages = int((_free_pages(allocator) * page >= host_from).sum())
    return (host_pages - free_host_pages) * page


def rows_in_use(req_to_token_pool) -> list:
    """Request rows held by a request (row 0 is SGLang's padding row, never handed out)."""
    free = set(req_to_token_pool.free_slots)
    return [r for r in range(1, req_to_token_pool.size + 1) if r not in free]


def cache_lines(host_cache, live_rows: list) -> dict:
    """Tagged lines of the host-row cache: of live request rows, and all (a free row's lines are stale: the row's
    next prefill drops them before any decode reads it, backend._plan_index_extend)."""
    if host_cache is None or not host_cache.lines:
        return {"host_cache_lines_live": 0, "host_cache_lines_tagged": 0}
    tagged = host_cache.tags >= 0
    live = int(tagged[:, live_rows].sum()) if live_rows else 0
    return {"host_cache_lines_live": live, "host_cache_lines_tagged": int(tagged.sum())}


def pool_usage(scheduler, cfg) -> dict:
    allocator, rtp = scheduler.token_to_kv_pool_allocator, scheduler.req_to_token_pool
    plan = getattr(allocator.get_kvcache(), "_asynctls_host_tier", None)
    backend = getattr(scheduler.tp_worker.model_runner, "attn_backend", None)
    live_rows = rows_in_use(rtp)
    running = getattr(scheduler, "running_batch", None)
    return {"kv_slots_in_use": int(allocator.size - allocator.available_size()),
            "kv_slots_evictable": int(scheduler.tree_cache.evictable_size()),
            "host_slots_in_use": host_slots_in_use(allocator, plan) if plan is not None else 0,
            "host_slots_total": plan.host_tokens if plan is not None else 0,
            **cache_lines(getattr(backend, "host_cache", None), live_rows),
            "request_rows_in_use": len(live_rows),
            "running_requests": len(running.reqs) if running is not None else 0,
            "waiting_requests": len(scheduler.waiting_queue),
            # pages and slots the index wrote, requests indexed on arrival (PD decode server)
            "index": dict(getattr(backend, "stats", {})),
            "config": dataclasses.asdict(cfg)}


def report_pool_usage(result, scheduler, *args, **kwargs):
    cfg = config_if_enabled(scheduler.server_args)
    if cfg is None:
        return None
    try:
        result.internal_state["asynctls"] = pool_usage(scheduler, cfg)
    except Exception as e:  # a report must never take the scheduler down
        result.internal_state["asynctls"] = {"error": f"{type(e).__name__}: {e}"}
    return None  # the dict was extended in place
