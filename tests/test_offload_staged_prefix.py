"""Prefill over a host-tier prefix: SGLang's own extend kernel gives the same output on the gathered prefix."""

import pytest
import torch

from sglang_asynctls.offload.staged_prefix import prefix_rows, staged_extend


def _batch(seed=0, heads=4, kv_heads=2, d=16, slots=96):
    g = torch.Generator().manual_seed(seed)
    prefix, extend = [5, 0, 11], [3, 4, 2]
    k_buf = torch.randn(slots, kv_heads, d, generator=g)
    v_buf = torch.randn(slots, kv_heads, d, generator=g)
    perm = torch.randperm(slots, generator=g)[: sum(prefix)]  # scattered prefix slots
    kv_indptr = torch.tensor([0] + torch.tensor(prefix).cumsum(0).tolist(), dtype=torch.int32)
    kv_indices = torch.cat([perm, torch.full((7,), 10**6)])  # padded past kv_indptr[-1], as SGLang may allocate
    qo_indptr = torch.tensor([0] + torch.tensor(extend).cumsum(0).tolist(), dtype=torch.int32)
    n = sum(extend)
    q = torch.randn(n, heads, d, generator=g)
    k = torch.randn(n, kv_heads, d, generator=g)
    v = torch.randn(n, kv_heads, d, generator=g)
    return q, k, v, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, max(extend)


def test_prefix_rows_are_in_order_and_ignore_padding():
    _, _, _, k_buf, v_buf, _, kv_indptr, kv_indices, _ = _batch()
    rows, idx = prefix_rows(kv_indptr, kv_indices)
    used = kv_indices[: int(kv_indptr[-1])]
    assert torch.equal(k_buf.index_select(0, rows), k_buf[used]) and torch.equal(rows, used)
    assert idx.tolist() == list(range(used.numel())) and idx.dtype == kv_indices.dtype


def test_staged_extend_equals_sglang_extend_on_the_pool():
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    q, k, v, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, max_ext = _batch()
    kv_indices = kv_indices[: int(kv_indptr[-1])].clone()  # the stock kernel must not see the padding's slots

    def call(fn, indices, page_size):
        o = torch.empty_like(q)
        fn(q, k, v, o, k_buf, v_buf, qo_indptr, kv_indptr, indices, None, True, None, max_ext, 1.0, 1.0,
           q.shape[-1] ** -0.5, page_size=page_size)
        return o

    stock = call(extend_attention_fwd, kv_indices, 1)
    seen = {}

    def spy(*args, **kwargs):
        seen["page_size"], seen["k_rows"] = kwargs["page_size"], args[4].shape[0]
        return extend_attention_fwd(*args, **kwargs)

    staged = call(staged_extend(spy), kv_indices, 64)  # the gathered prefix is token-granular
    torch.testing.assert_close(staged, stock, rtol=1e-5, atol=1e-5)
    assert seen == {"page_size": 1, "k_rows": kv_indices.numel()}


def test_staged_extend_without_prefix_calls_through():
    calls = []
    fn = staged_extend(lambda *a, **kw: calls.append((a, kw)))
    empty = torch.empty(0, dtype=torch.int64)
    fn("q", "k", "v", "o", torch.zeros(4, 1, 2), torch.zeros(4, 1, 2), "qo", torch.zeros(1), empty, page_size=64)
    assert calls[0][1]["page_size"] == 64 and calls[0][0][8] is empty


def test_a_batch_works_out_its_prefix_rows_once_and_each_layer_gathers_its_own_buffers(monkeypatch):
    from sglang_asynctls.offload import staged_prefix as sp

    calls, seen = [], []
    inner = sp.prefix_rows
    monkeypatch.setattr(sp, "prefix_rows", lambda *a: calls.append(1) or inner(*a))
    fn = sp.staged_extend(lambda q, k, v, o, kb, vb, qo, ip, ix, **kw: seen.append(kb.clone()))
    _, _, _, k_buf, v_buf, _, kv_indptr, kv_indices, _ = _batch()
    for layer in range(3):  # three layers of one batch: one kv_indices tensor, different K buffers
        fn(None, None, None, None, k_buf + layer, v_buf, None, kv_indptr, kv_indices, page_size=64)
    assert len(calls) == 1
    used = kv_indices[: int(kv_indptr[-1])]
    assert all(torch.equal(seen[layer], k_buf[used] + layer) for layer in range(3))
    fn(None, None, None, None, k_buf, v_buf, None, kv_indptr, kv_indices.clone(), page_size=64)  # next batch
    assert len(calls) == 2
