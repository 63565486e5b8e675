"""The KV sizing hook charges exactly what the backend allocates (patches/kv_sizing.py, device_memory.py).

Each case sizes a pool through the hook around SGLang's own `config_from_budget`, with SGLang's request-pool sizing
(`resolve_max_num_reqs`), then builds what the server builds from that config on the CPU: SGLang's KV pool and
request pool, and our backend around SGLang's torch_native backend. Every tensor the backend holds (its own, its
index's, its host-row cache's; SGLang's pools excluded) must add up to the bytes the hook charged, and the pool must
be the largest that fits with them.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from sglang_asynctls import dense_backend
from sglang_asynctls.backend import AsyncTLSBackend
from sglang_asynctls.config import AsyncTLSConfig
from sglang_asynctls.device_memory import PluginBuffers, fit_pool
from sglang_asynctls.offload import host_stats, host_tier
from sglang_asynctls.patches import kv_sizing
from sglang_asynctls.runtime_config import ENV_VAR, attach_config

pools = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang.srt.distributed.parallel_state_wrapper import ParallelState  # noqa: E402
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator  # noqa: E402
from sglang.srt.model_executor import pool_configurator as pc  # noqa: E402
from sglang.srt.runtime_context import get_context  # noqa: E402

LAYERS, HQ, HKV, D, CONTEXT, DTYPE = 3, 4, 2, 32, 1024, torch.float16
MLA_RANK, MLA_ROPE = 64, 16
CFG = AsyncTLSConfig(enabled=True, dense_backend="torch_native", block_size=16, block_budget=6, token_budget=40,
                     sink_tokens=4, local_window=8, label_channels=8)


def stock_config_from_budget(kvc, budget):
    """SGLang's own method, under our hook or not (looked up per call: load_plugins rebinds every module-level
    reference to the original when it wraps it)."""
    method = KVCacheConfigurator.config_from_budget
    return getattr(method, "__wrapped__", method)(kvc, budget)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    host_tier.set_plan(None)
    yield
    host_tier.set_plan(None)
    host_stats.register(None)


@pytest.fixture
def publish():
    """SGLang's runtime config as a scheduler publishes it (get_schedule(): page size, request limit), undone after."""
    installed = []

    def install(page_size, max_running_requests):
        installed.append(get_context().override_server_args(page_size=page_size,
                                                            max_running_requests=max_running_requests))
        installed[-1].install()

    yield install
    for override in reversed(installed):
        override.restore()


def model_config(mla):
    mc = SimpleNamespace(attention_arch=SimpleNamespace(name="MLA" if mla else "MHA"), is_encoder_decoder=False,
                         hf_config=SimpleNamespace(architectures=["X"]), hf_text_config=SimpleNamespace(),
                         is_hybrid_swa=False, full_attention_interval=None, linear_attn_registry_result=None,
                         num_hidden_layers=LAYERS, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                         v_head_dim=D, context_len=CONTEXT, kv_lora_rank=MLA_RANK, qk_rope_head_dim=MLA_ROPE)
    mc.get_num_kv_heads = lambda tp: max(1, HKV // tp)  # ModelConfig.get_num_kv_heads
    return mc


def configurator(monkeypatch, cfg, page_size, mla=False):
    """A KVCacheConfigurator with the fields sizing reads, and SGLang's DefaultPoolConfigurator cell size for it."""
    kvc = object.__new__(KVCacheConfigurator)
    server_args = SimpleNamespace(pp_size=1, disaggregation_mode="null")
    attach_config(server_args, cfg)
    fields = dict(server_args=server_args, is_draft_worker=False, use_mla_backend=mla, model_config=model_config(mla),
                  kv_cache_dtype=DTYPE, page_size=page_size, ps=ParallelState.trivial(), mambaish_config=None,
                  layer_info=SimpleNamespace(num_effective_layers=LAYERS))
    for name, value in fields.items():
        setattr(kvc, name, value)
    cell = LAYERS * (MLA_RANK + MLA_ROPE if mla else HKV * 2 * D) * DTYPE.itemsize  # _compute_cell_size
    pool_cfg = object.__new__(pc.DefaultPoolConfigurator)
    pool_cfg._cell_size = cell
    monkeypatch.setattr(pc, "create_memory_pool_configurator", lambda kvc: pool_cfg)
    return kvc, cell


def build_server(kvc, config, mla):
    """What SGLang builds from the sized config (kv_cache_configurator._init_pools), then our backend."""
    page, rows = kvc.page_size, kvc.resolve_max_num_reqs(config.max_total_num_tokens)
    plan, size = host_tier.current_plan(), config.max_total_num_tokens
    host_tier.set_plan(None)  # CPU tensors stand in for the host tier's address ranges
    if mla:
        kv = pools.MLATokenToKVPool(size, page, DTYPE, MLA_RANK, MLA_ROPE, LAYERS, "cpu", False)
    else:
        kv = pools.MHATokenToKVPool(size, page, DTYPE, HKV, D, LAYERS, "cpu", False)
    if plan is not None:
        kv._asynctls_host_tier = plan
    req = pools.ReqToTokenPool(rows, CONTEXT + 4, "cpu", False)
    mr = SimpleNamespace(server_args=kvc.server_args, model_config=kvc.model_config, page_size=page, device="cpu",
                         token_to_kv_pool=kv, req_to_token_pool=req)
    inner = dense_backend.build(mr, "torch_native")
    inner.extend_attention_fwd = lambda *a, **k: None  # the host tier wraps Triton's; torch_native has none
    return AsyncTLSBackend(mr, inner), kv, req


def held_bytes(backend, exclude):
    """Bytes of every tensor the backend holds, directly or in its own objects, each storage once; tensors that
    share storage with `exclude` (SGLang's pools) and the inner backend's are not ours."""
    theirs = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def walk(obj, depth):
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr() not in theirs:
                storages[st.data_ptr()] = st.nbytes()
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth)
        elif depth < 3 and type(obj).__module__.startswith("sglang_asynctls"):
            for name, value in vars(obj).items():
                if name != "inner":
                    walk(value, depth + 1)

    walk(backend, 0)
    return sum(storages.values())


CASES = {  # name: (page size, --max-running-requests, config changes); paged: one block a page, the default
    "paged": (16, None, {}),
    "paged.mrr3": (16, 3, {}),
    "page1.mrr3": (1, 3, {}),
    "page1.default-rows": (1, None, {}),  # SGLang's default request pool: 2,048 rows or more
    "paged.host": (16, 3, {"host_kv_gib": 0.001}),
    "paged.host-cache": (16, 3, {"host_kv_gib": 0.001, "host_cache_tokens": 16}),
    "page1.host-cache": (1, 3, {"host_kv_gib": 0.001, "host_cache_tokens": 16}),
    "paged.host-prefetch": (16, 3, {"host_kv_gib": 0.001, "host_cache_tokens": 16, "host_prefetch_rows": 8}),
}


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_hook_charges_what_the_backend_allocates(monkeypatch, publish, case, mla):
    page, mrr, changes = CASES[case]
    cfg = dataclasses.replace(CFG, **changes)
    kvc, cell = configurator(monkeypatch, cfg, page, mla)
    budget = (300 << 20) if mrr is None else (12 << 20)
    publish(page, mrr)
    fit = kv_sizing.plan_pool(kvc, cfg, budget, cell)
    config = kv_sizing.config_from_budget_with_index(stock_config_from_budget, kvc, budget)
    backend, kv, req = build_server(kvc, config, mla)
    assert config.max_total_num_tokens == fit.device_tokens + fit.host_tokens
    sglang_pools = [req.req_to_token, *(kv.kv_buffer if mla else kv.k_buffer + kv.v_buffer)]
    assert held_bytes(backend, sglang_pools) == sum(fit.charge.values()), fit.charge
    assert fit.request_rows in (0, req.req_to_token.shape[0])
    if page == 1:
        assert fit.charge["block_bounds"] == backend.index.kmin[0].nbytes * 2 * LAYERS > 0
        assert req.req_to_token.shape[0] == mrr + 1 if mrr else req.req_to_token.shape[0] >= 2049
    if cfg.host_cache_tokens:
        assert backend.host_cache.k[0].numel() and fit.charge["host_row_cache"] == backend.host_cache.nbytes()
    if cfg.host_kv_gib:  # the block-overlap count's last selections, and the prefetch's landed flags, are charged
        assert backend.host_cache.prev_blocks is not None
        assert (backend.host_cache.fetched is not None) == bool(cfg.host_prefetch_rows)
    # the pool and the buffers fit the budget, and one page more would not
    buffers = kv_sizing.plugin_buffers(kvc, cfg)
    assert fit.device_tokens * cell + sum(fit.charge.values()) <= budget
    more = fit.device_tokens + page
    rows_more = kv_sizing.request_rows(kvc, more + fit.host_tokens) if fit.request_rows else 0
    assert more * cell + sum(buffers.charge(more + fit.host_tokens + page, rows_more).values()) > budget


def test_request_rows_follow_the_pool_sglang_sizes_them_for():
    """Without --max-running-requests SGLang sizes the request pool from the token pool (between 2,048 and 4,096
    rows): the rows charged are those of the pool that comes out, however the charge moved it."""
    buffers = PluginBuffers(2, 1, 64, 64, False, torch.float16, 8, 16, 1, 1024)
    cell = 2 * 128 * 2

    def rows_of(tokens):  # resolve_max_num_reqs(tokens) + 1 without a request limit, 1,024-token context
        return max(min(int(tokens / 1024 * 512), 4096), 2048) + 1

    # 6,000 tokens come with 3,001 rows: budget them exactly (stock's pool of this budget would take 4,097 rows,
    # which do not fit at all)
    budget = 6000 * cell + sum(buffers.charge(6001, 3001).values())
    assert budget < 4097 * buffers.per_request_row()
    fit = fit_pool(budget, cell, buffers, rows_of)
    assert (fit.device_tokens, fit.request_rows) == (6000, 3001)
    assert fit.charge == buffers.charge(6001, 3001)


def test_qwen3_8b_charges():
    """The numbers of docs/launch.md: Qwen3-8B (36 layers, 8 KV heads, head dim 128, 131,072 context, bf16)."""
    def buffers(page_size):
        return PluginBuffers(36, 8, 128, 128, False, torch.bfloat16, 32, 64, page_size, 131072)

    assert buffers(1).per_request_row() == 288 << 20  # 2,048 blocks x 2 x 36 layers x 8 heads x 128 x 2 bytes
    assert buffers(1).charge(0, 17)["block_bounds"] == 17 * (288 << 20)  # --max-running-requests 16: 4.78 GiB
    assert buffers(1).charge(0, 2049)["block_bounds"] / 2**30 == pytest.approx(576.28, abs=0.01)
    assert buffers(64).per_request_row() == 0
    per_slot = buffers(64).charge(64, 0)
    assert (per_slot["labels"], per_slot["label_scale"], per_slot["block_bounds"]) == (
        36 * 8 * 64 * 16, 36 * 8 * 64 * 4, 2 * 36 * 8 * 128 * 2)  # 16 + 4 + 8 bytes a slot and KV head


def test_a_pool_too_small_for_one_request_is_refused_naming_the_flags(monkeypatch, publish):
    """What the launcher could not refuse (it does not know the weights' size) is refused here, before the pool is
    built: buffers that leave nothing, or less than one request of the model's context (1,024 tokens here) where
    stock's pool would hold one."""
    kvc, cell = configurator(monkeypatch, CFG, 1)
    publish(1, 3)
    rows_bytes = 4 * kv_sizing.plugin_buffers(kvc, CFG).per_request_row()
    for budget, left in ((10 << 10, "0"), (rows_bytes + 1000 * cell, r"\d{3}")):
        with pytest.raises(ValueError, match=f"4 request rows.*leaves {left} KV tokens, less than one request of "
                                             "1024; lower --max-running-requests"):
            kv_sizing.config_from_budget_with_index(stock_config_from_budget, kvc, budget)


def test_sizing_is_untouched_without_asynctls_and_after_capture(monkeypatch):
    """A stock server (no config attached, another backend) passes through with SGLang's own budget (on the H200 a
    fallback to the default config once charged the index on the stock fa3 server too); so does SGLang's
    post-capture resize, measured with our buffers already allocated."""
    kvc, _ = configurator(monkeypatch, CFG, 16)
    seen = []

    def original(kvc, budget, **kw):
        seen.append(budget)

    for args in (SimpleNamespace(attention_backend="fa3"), SimpleNamespace()):
        kvc.server_args = args
        kv_sizing.config_from_budget_with_index(original, kvc, 2**30)
    disabled = SimpleNamespace()
    attach_config(disabled, AsyncTLSConfig(enabled=False))
    kvc.server_args = disabled
    kv_sizing.config_from_budget_with_index(original, kvc, 2**30)
    attach_config(kvc.server_args, CFG)
    kv_sizing.config_from_budget_with_index(original, kvc, 2**30, cap_tokens=1000)
    assert seen == [2**30] * 4
    assert host_tier.current_plan() is None
