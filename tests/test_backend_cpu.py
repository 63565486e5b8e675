"""The backend's decode/prefill logic on CPU, with the inner stock backend replaced by a small torch stand-in.

Checks what the server relies on: long requests are hidden from the dense kernel (one token long in its metadata),
short requests take the dense output unchanged, long requests get exactly the reference two-level sparse decode
over an index that prefill + decode maintained, and radix-shared pages are not re-indexed.
"""

from types import SimpleNamespace

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.backend import AsyncTLSBackend
from sglang_asynctls.config import AsyncTLSConfig

HQ, HKV, D, BS, LAYERS = 4, 2, 16, 16, 2
CFG = AsyncTLSConfig(enabled=True, block_size=BS, block_budget=6, token_budget=40, sink_tokens=4, local_window=8,
                     dense_below=200, label_channels=8)


class FakeInner:
    """Stand-in for a stock backend: writes KV like SGLang and attends densely over the lengths it was given."""

    def __init__(self, mr):
        self.req_to_token = mr.req_to_token_pool.req_to_token
        self.token_to_kv_pool = mr.token_to_kv_pool
        self.num_kv_head = HKV

    def init_forward_metadata(self, fb):
        self.lens = fb.seq_lens

    def _write(self, k, v, layer, fb):
        self.token_to_kv_pool.k[layer.layer_id][fb.out_cache_loc] = k.view(-1, HKV, D)
        self.token_to_kv_pool.v[layer.layer_id][fb.out_cache_loc] = v.view(-1, HKV, D)

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True):
        self._write(k, v, layer, fb)
        return torch.zeros_like(q)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True):
        self._write(k, v, layer, fb)
        lens = self.lens
        kb, vb = self.token_to_kv_pool.k[layer.layer_id], self.token_to_kv_pool.v[layer.layer_id]
        return R.dense_decode(q.view(-1, HQ, D), kb, vb, self.req_to_token, fb.req_pool_indices, lens,
                              layer.scaling).reshape(q.shape)


def Backend(mr, inner=None):
    return AsyncTLSBackend(mr, inner or FakeInner(mr))


def model_runner(slots=64 * BS):
    g = torch.Generator().manual_seed(0)
    pool = SimpleNamespace(k=[torch.zeros(slots, HKV, D) for _ in range(LAYERS)],
                           v=[torch.zeros(slots, HKV, D) for _ in range(LAYERS)], layer_num=LAYERS, start_layer=0)
    pool.get_key_buffer = lambda i: pool.k[i]
    pool.get_value_buffer = lambda i: pool.v[i]
    mc = SimpleNamespace(attention_arch=SimpleNamespace(name="MHA"), hf_config=SimpleNamespace(architectures=["X"]),
                         hf_text_config=SimpleNamespace(), is_encoder_decoder=False, is_hybrid_swa=False,
                         full_attention_interval=None, linear_attn_registry_result=None, num_hidden_layers=LAYERS,
                         num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, v_head_dim=D, context_len=1024)
    r2t = torch.zeros(4, 1024, dtype=torch.int32)
    r2t[1, :400] = torch.arange(10 * BS, 10 * BS + 400)  # page-aligned, as with page_size == block size
    r2t[3, :100] = torch.arange(40 * BS, 40 * BS + 100)
    return SimpleNamespace(server_args=SimpleNamespace(_asynctls_config=CFG), model_config=mc, page_size=BS,
                           token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=r2t)), g


def mode(decode):
    return SimpleNamespace(is_decode_or_idle=lambda: decode, is_extend=lambda: not decode)


def layer(i):
    return SimpleNamespace(layer_id=i, tp_q_head_num=HQ, qk_head_dim=D, scaling=D ** -0.5)


def test_decode_mixes_dense_short_and_sparse_long_requests():
    mr, g = model_runner()
    be = Backend(mr)
    rpi, lens, r2t = torch.tensor([1, 3]), [300, 90], mr.req_to_token_pool.req_to_token
    loc = torch.cat([r2t[1, :300], r2t[3, :90]]).long()
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi, seq_lens=torch.tensor(lens),
                         seq_lens_cpu=torch.tensor(lens), extend_prefix_lens_cpu=[0, 0], out_cache_loc=loc)
    be.init_forward_metadata(fb)
    for i in range(LAYERS):
        kv = torch.randn(390, HKV * D, generator=g)
        be.forward_extend(torch.randn(390, HQ * D, generator=g), kv, kv.flip(0), layer(i), fb)
    assert be.stats["index_pages_written"] == -(-300 // BS) + -(-90 // BS)
    new = torch.tensor(lens) + 1
    dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                          seq_lens_cpu=new, seq_lens_sum=int(new.sum()),
                          out_cache_loc=torch.stack([r2t[1, 300], r2t[3, 90]]).long())
    be.init_forward_metadata(dfb)
    assert be.inner.lens.tolist() == [1, 91]  # the long request is hidden from the dense kernel
    q = torch.randn(2, HQ * D, generator=g)
    out = be.forward_decode(q, torch.randn(2, HKV * D, generator=g), torch.randn(2, HKV * D, generator=g),
                            layer(1), dfb)
    kb, vb = mr.token_to_kv_pool.k[1], mr.token_to_kv_pool.v[1]
    dense = R.dense_decode(q.view(2, HQ, D), kb, vb, r2t, rpi, new, D ** -0.5)
    torch.testing.assert_close(out[1].view(HQ, D), dense[1])  # short: the dense output, untouched
    ix = R.build_index(kb, r2t, rpi, new, be.index.channels[1], BS)
    sparse = R.asynctls_decode(q.view(2, HQ, D), kb, vb, r2t, rpi, new, *ix, be.index.channels[1], block_size=BS,
                               block_budget=6,
                               token_budget=40, sink_tokens=4, local_window=8, sm_scale=D ** -0.5)
    torch.testing.assert_close(out[0].view(HQ, D), sparse[0])  # long: the reference sparse decode
    assert not torch.allclose(out[0].view(HQ, D), dense[0], atol=1e-3)  # and it is really sparse


def test_radix_shared_prefix_is_not_reindexed():
    mr, g = model_runner()
    be = Backend(mr)
    r2t = mr.req_to_token_pool.req_to_token
    r2t[3, :128] = r2t[1, :128]  # turn 2 shares 8 whole pages with turn 1
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=torch.tensor([3]),
                         seq_lens=torch.tensor([140]), seq_lens_cpu=torch.tensor([140]), extend_prefix_lens_cpu=[128],
                         out_cache_loc=r2t[3, 128:140].long())
    be.init_forward_metadata(fb)
    assert be.stats == {"index_pages_written": 1, "index_slots_labelled": 12, "index_arrivals": 0, "dense_steps": 0}


def test_tensor_parallel_rank_indexes_its_slice_of_the_calibration(tmp_path, monkeypatch):
    import json

    import sglang_asynctls.backend as backend

    ranked = [[[(h * 5 + c) % D for c in range(D)] for h in range(2 * HKV)] for _ in range(LAYERS)]
    path = tmp_path / "ch.json"
    path.write_text(json.dumps({"channels": ranked}))
    mr, _ = model_runner()
    mr.model_config.num_key_value_heads = 2 * HKV  # the model has 4 KV heads; this rank holds 2 of them
    mr.model_config.num_attention_heads = 2 * HQ
    mr.server_args._asynctls_config = AsyncTLSConfig(**{**CFG.__dict__, "channel_config": str(path)})
    monkeypatch.setattr(backend, "_attn_tp", lambda: (2, 1))  # rank 1 of 2
    be = Backend(mr)
    want = torch.tensor(ranked)[:, HKV:2 * HKV, :8]
    assert torch.equal(be.index.channels, want)


def test_each_layer_decodes_with_its_scheduled_budgets():
    """--asynctls-layer-budget-scale / -candidate-scale reach the decode: layer 0 gets 1.5x k_t and k_b, layer 1
    the rest of the same average, then twice its blocks as candidates."""
    import dataclasses

    mr, g = model_runner()
    cfg = dataclasses.replace(CFG, token_budget=40, block_budget=8, layer_budget_scale="0:1.5",
                              layer_candidate_scale="1:2")
    mr.server_args._asynctls_config = cfg
    be = Backend(mr)
    expected = cfg.layer_budgets(LAYERS)
    assert be.budgets == expected and expected[0] == (60, 12) and expected[1] == (20, 8)
    seen = []
    real = be.sparse_fn

    def spy(*args, **kw):
        seen.append((kw["token_budget"], kw["block_budget"]))
        return real(*args, **kw)

    be.sparse_fn = spy
    r2t = mr.req_to_token_pool.req_to_token
    rpi, n = torch.tensor([1]), 300
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi, seq_lens=torch.tensor([n]),
                         seq_lens_cpu=torch.tensor([n]), extend_prefix_lens_cpu=[0], out_cache_loc=r2t[1, :n].long())
    be.init_forward_metadata(fb)
    for i in range(LAYERS):
        kv = torch.randn(n, HKV * D, generator=g)
        be.forward_extend(torch.randn(n, HQ * D, generator=g), kv, kv, layer(i), fb)
    new = torch.tensor([n + 1])
    dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                          seq_lens_cpu=new, seq_lens_sum=n + 1, out_cache_loc=r2t[1, n:n + 1].long())
    be.init_forward_metadata(dfb)
    for i in range(LAYERS):
        kv = torch.randn(1, HKV * D, generator=g)
        be.forward_decode(torch.randn(1, HQ * D, generator=g), kv, kv, layer(i), dfb)
    assert seen == expected


def _extend(be, g, rpi, lens, prefix, r2t):
    loc = torch.cat([r2t[r, p:n] for r, p, n in zip(rpi.tolist(), prefix, lens)]).long()
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi, seq_lens=torch.tensor(lens),
                         seq_lens_cpu=torch.tensor(lens), extend_prefix_lens_cpu=prefix, out_cache_loc=loc)
    be.init_forward_metadata(fb)
    for i in range(LAYERS):
        kv = torch.randn(len(loc), HKV * D, generator=g)
        be.forward_extend(torch.randn(len(loc), HQ * D, generator=g), kv, kv.flip(0), layer(i), fb)


def test_page_size_1_scattered_slots_and_a_prefix_shared_mid_block():
    """--page-size 1: a block's slots are scattered and the radix cache shares prefixes at token granularity, so
    block bounds live in per-request rows. Request 3 reuses request 1's first 100 tokens (block 6 of 16 tokens is
    half shared); both then decode 6 steps, across a block boundary, and each long row must equal the reference
    sparse decode over an index built from scratch, so neither request's bounds were overwritten by the other's."""
    mr, g = model_runner()
    mr.page_size = 1
    r2t = mr.req_to_token_pool.req_to_token
    free = (torch.randperm(64 * BS - 1, generator=g) + 1).to(torch.int32)  # scattered, distinct, slot 0 unused
    r2t[1, :306] = free[:306]
    r2t[3, :100] = r2t[1, :100]
    r2t[3, 100:266] = free[306:472]
    be = Backend(mr)
    assert be.index.max_blocks == 1024 // BS and be.index.kmin[0].shape[0] == 4 * (1024 // BS)
    _extend(be, g, torch.tensor([1]), [300], [0], r2t)
    _extend(be, g, torch.tensor([3]), [260], [100], r2t)  # the prefix's labels are reused, its blocks recomputed
    assert be.stats["index_slots_labelled"] == 300 + 160
    rpi, lens = torch.tensor([1, 3]), torch.tensor([300, 260])
    for step in range(6):
        new = lens + 1 + step
        dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                              seq_lens_cpu=new, seq_lens_sum=int(new.sum()),
                              out_cache_loc=torch.stack([r2t[1, int(new[0]) - 1], r2t[3, int(new[1]) - 1]]).long())
        be.init_forward_metadata(dfb)
        q = torch.randn(2, HQ * D, generator=g)
        for i in range(LAYERS):
            kv = torch.randn(2, HKV * D, generator=g)
            out = be.forward_decode(q, kv, kv.flip(0), layer(i), dfb)
    kb, vb = mr.token_to_kv_pool.k[LAYERS - 1], mr.token_to_kv_pool.v[LAYERS - 1]
    ix = R.build_index(kb, r2t, rpi, new, be.index.channels[LAYERS - 1], BS)
    sparse = R.asynctls_decode(q.view(2, HQ, D), kb, vb, r2t, rpi, new, *ix, be.index.channels[LAYERS - 1],
                               block_size=BS, block_budget=6, token_budget=40, sink_tokens=4, local_window=8,
                               sm_scale=D ** -0.5)
    torch.testing.assert_close(out.view(2, HQ, D), sparse)
    assert int(new[0]) // BS > 300 // BS  # a block completed during decode (its row folded from per-request rows)
    kmin, kmax, table = ix[:3]
    for b, r in enumerate(rpi.tolist()):  # every complete block's row equals a from-scratch build
        for j in range(int(new[b]) // BS):
            row = r * be.index.max_blocks + j
            assert torch.equal(be.index.kmin[LAYERS - 1][row], kmin[table[b, j]]), (r, j)
            assert torch.equal(be.index.kmax[LAYERS - 1][row], kmax[table[b, j]]), (r, j)


def test_host_tier_decode_counts_host_reads_and_serves_repeats_from_the_cache():
    """With a host tier and the host-row cache, decode equals the uncached reference step after step, the cache
    serves rows read before, and a prefill of the row drops its lines."""
    from sglang_asynctls.offload import host_stats
    from sglang_asynctls.offload.host_stats import Column
    from sglang_asynctls.offload.host_tier import HostTierPlan

    mr, g = model_runner()
    mr.server_args = SimpleNamespace(_asynctls_config=AsyncTLSConfig(
        **{**CFG.__dict__, "host_kv_gib": 1.0, "host_cache_tokens": 16}))
    pool = mr.token_to_kv_pool
    pool._asynctls_host_tier, pool.page_size = HostTierPlan(device_tokens=19 * BS, host_tokens=44 * BS), BS
    inner = FakeInner(mr)
    inner.extend_attention_fwd = lambda *a, **k: None  # wrapped by the staged-prefix gather
    be = Backend(mr, inner)
    assert host_stats.current() is not None and be.host_cache.host_from == 20 * BS
    rpi, r2t = torch.tensor([1]), mr.req_to_token_pool.req_to_token
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi, seq_lens=torch.tensor([300]),
                         seq_lens_cpu=torch.tensor([300]), extend_prefix_lens_cpu=[0], out_cache_loc=r2t[1, :300].long())
    be.init_forward_metadata(fb)
    for i in range(LAYERS):
        kv = torch.randn(300, HKV * D, generator=g)
        be.forward_extend(torch.randn(300, HQ * D, generator=g), kv, kv.flip(0), layer(i), fb)
    q = torch.randn(1, HQ * D, generator=g)
    for t in range(3):  # the same query each step: the selection repeats, so steps 2 and 3 hit
        new = torch.tensor([301 + t])
        dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                              seq_lens_cpu=new, seq_lens_sum=int(new.sum()), out_cache_loc=r2t[1, 300 + t:301 + t].long())
        be.init_forward_metadata(dfb)
        out = be.forward_decode(q, torch.randn(1, HKV * D, generator=g), torch.randn(1, HKV * D, generator=g),
                                layer(1), dfb)
        kb, vb = pool.k[1], pool.v[1]
        ix = R.build_index(kb, r2t, rpi, new, be.index.channels[1], BS)
        sparse = R.asynctls_decode(q.view(1, HQ, D), kb, vb, r2t, rpi, new, *ix, be.index.channels[1],
                                   block_size=BS, block_budget=6, token_budget=40, sink_tokens=4, local_window=8,
                                   sm_scale=D ** -0.5)
        torch.testing.assert_close(out.view(HQ, D), sparse[0])
    c = be.host_cache.counters[1]
    assert c[Column.STEPS] == 3 and c[Column.ROWS] == 3 * HKV * 40 and 0 < c[Column.HOST_ROWS] < c[Column.ROWS]
    assert c[Column.CACHE_HITS] > 0 and c[Column.CACHE_FILLS] > 0
    assert (be.host_cache.tags[:, 1] >= 0).any()
    be.init_forward_metadata(fb)  # the row is prefilled again (a new request): its lines go
    assert (be.host_cache.tags[:, 1] == -1).all()
    host_stats.register(None)


def test_cuda_graph_metadata_keeps_the_dense_view_at_one_address():
    """Under CUDA graphs the inner backend's captured metadata points at the view's lengths: every capture and replay
    must hand it the same buffer, refreshed with this step's one-token lengths for the long requests."""
    mr, _ = model_runner()
    inner = FakeInner(mr)
    seen = []
    inner.init_cuda_graph_state = lambda max_bs, max_num_tokens: None
    inner.init_forward_metadata_out_graph = lambda fb, in_capture=False: seen.append(fb.seq_lens)
    be = Backend(mr, inner)
    be.init_cuda_graph_state(4, 4)
    for lens in ([300, 90], [301, 91]):  # capture, then a replay with the next step's lengths
        t = torch.tensor(lens)
        fb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=torch.tensor([1, 3]),
                             seq_lens=t, seq_lens_cpu=None, seq_lens_sum=int(t.sum()),
                             out_cache_loc=torch.tensor([0, 1]))
        be.init_forward_metadata_out_graph(fb, in_capture=lens[0] == 300)
    assert seen[0].data_ptr() == seen[1].data_ptr() == be._graph_lens.data_ptr()
    assert seen[1].tolist() == [1, 91] and seen[1].dtype == torch.int64


def _host_tier_backend(prefetch_rows):
    from sglang_asynctls.offload.host_tier import HostTierPlan

    mr, g = model_runner()
    mr.server_args = SimpleNamespace(_asynctls_config=AsyncTLSConfig(
        **{**CFG.__dict__, "host_kv_gib": 1.0, "host_cache_tokens": 16, "host_prefetch_rows": prefetch_rows}))
    pool = mr.token_to_kv_pool
    pool._asynctls_host_tier, pool.page_size = HostTierPlan(device_tokens=19 * BS, host_tokens=44 * BS), BS
    inner = FakeInner(mr)
    inner.extend_attention_fwd = lambda *a, **k: None
    return Backend(mr, inner), mr, g


def test_host_prefetch_leaves_decode_bit_identical_and_is_counted():
    """Two servers, prefetch off and --asynctls-host-prefetch-rows 8, decode the same steps of a 300-token request
    (queries that drift): every layer's output is the same bits (a line holds an exact copy), the prefetch copies rows
    that later steps read from the cache, and both count the block overlap of consecutive steps."""
    from sglang_asynctls.offload import host_stats
    from sglang_asynctls.offload.host_stats import Column

    runs = {}
    for p in (0, 8):
        be, mr, g = _host_tier_backend(p)
        assert (be.host_cache.ahead_rows, be.host_cache.prev_blocks.shape[-1]) == (p, 6)
        rpi, r2t = torch.tensor([1]), mr.req_to_token_pool.req_to_token
        fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi,
                             seq_lens=torch.tensor([300]), seq_lens_cpu=torch.tensor([300]), extend_prefix_lens_cpu=[0],
                             out_cache_loc=r2t[1, :300].long())
        be.init_forward_metadata(fb)
        for i in range(LAYERS):
            kv = torch.randn(300, HKV * D, generator=g)
            be.forward_extend(torch.randn(300, HQ * D, generator=g), kv, kv.flip(0), layer(i), fb)
        q0, outs = torch.randn(1, HQ * D, generator=g), []
        for t in range(5):
            new = torch.tensor([301 + t])
            dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                                  seq_lens_cpu=new, seq_lens_sum=int(new.sum()),
                                  out_cache_loc=r2t[1, 300 + t:301 + t].long())
            be.init_forward_metadata(dfb)
            for i in range(LAYERS):
                q = q0 + 0.5 * torch.randn(1, HQ * D, generator=g)
                outs.append(be.forward_decode(q, torch.randn(1, HKV * D, generator=g),
                                              torch.randn(1, HKV * D, generator=g), layer(i), dfb))
        runs[p] = (outs, be.host_cache.counters.clone(), be)
        host_stats.register(None)
    for a, b in zip(runs[0][0], runs[8][0]):
        assert torch.equal(a, b)
    off, on = runs[0][1].sum(0), runs[8][1].sum(0)
    assert off[Column.PREFETCH_ROWS] == 0 and on[Column.PREFETCH_ROWS] > 0 and on[Column.PREFETCH_HITS] > 0
    assert on[Column.CACHE_HITS] > off[Column.CACHE_HITS]  # rows fetched ahead (and their later re-reads)
    # 4 compared steps x 2 layers x 2 KV heads x 6 blocks; the selection moves little between steps
    assert off[Column.OVERLAP_BLOCKS] == on[Column.OVERLAP_BLOCKS] == 4 * LAYERS * HKV * 6
    assert 0 < off[Column.OVERLAP] <= off[Column.OVERLAP_BLOCKS] and off[Column.OVERLAP] == on[Column.OVERLAP]
    be = runs[8][2]
    r2t = mr.req_to_token_pool.req_to_token
    be.init_forward_metadata(SimpleNamespace(  # the row is prefilled again: its flags and last selection go
        forward_mode=mode(False), spec_info=None, req_pool_indices=torch.tensor([1]), seq_lens=torch.tensor([300]),
        seq_lens_cpu=torch.tensor([300]), extend_prefix_lens_cpu=[0], out_cache_loc=r2t[1, :300].long()))
    assert (be.host_cache.fetched[:, 1] == 0).all() and (be.host_cache.prev_blocks[:, 1] == -1).all()
