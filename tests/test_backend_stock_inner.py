"""AsyncTLSBackend around a real stock SGLang backend, on CPU: SGLang's own KV pools and its torch_native backend,
built through SGLang's registry as the server builds fa3 or flashinfer.

The claims: prefill and short-request decode are exactly stock's (the same backend, run side by side on a copy of
the pools, gives bit-identical outputs); the inner backend sees a long request as one token long; the long request
gets the reference sparse decode over the index prefill and decode kept.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_backend_cpu import BS, CFG, D, HKV, HQ, LAYERS

from sglang_asynctls import dense_backend
from sglang_asynctls import reference as R
from sglang_asynctls.backend import AsyncTLSBackend

pools = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

SLOTS = 64 * BS


def runner(page_size=BS):
    kv = pools.MHATokenToKVPool(SLOTS, page_size, torch.float32, HKV, D, LAYERS, "cpu", False)
    req = pools.ReqToTokenPool(4, 1024, "cpu", False)
    req.req_to_token[1, :400] = torch.arange(10 * BS, 10 * BS + 400)
    req.req_to_token[3, :100] = torch.arange(40 * BS, 40 * BS + 100)
    mc = SimpleNamespace(attention_arch=SimpleNamespace(name="MHA"), hf_config=SimpleNamespace(architectures=["X"]),
                         hf_text_config=SimpleNamespace(), is_encoder_decoder=False, is_hybrid_swa=False,
                         full_attention_interval=None, linear_attn_registry_result=None, num_hidden_layers=LAYERS,
                         num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, v_head_dim=D, context_len=1024)
    cfg = dataclasses.replace(CFG, dense_backend="torch_native")
    return SimpleNamespace(server_args=SimpleNamespace(_asynctls_config=cfg), model_config=mc, page_size=page_size,
                           device="cpu", token_to_kv_pool=kv, req_to_token_pool=req)


def layer(i):
    return SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV, qk_head_dim=D,
                           head_dim=D, v_head_dim=D, scaling=D ** -0.5, is_cross_attention=False,
                           sliding_window_size=-1, logit_cap=0.0, attn_type=None, k_scale=None, v_scale=None)


def batch(mode, rpi, lens, r2t, prefix=None):
    lens_t = torch.tensor(lens)
    if mode == ForwardMode.DECODE:
        loc = torch.stack([r2t[r, n - 1] for r, n in zip(rpi.tolist(), lens)]).long()
        ext = dict(extend_prefix_lens=None, extend_seq_lens=None, extend_prefix_lens_cpu=None)
    else:
        loc = torch.cat([r2t[r, p:n] for r, p, n in zip(rpi.tolist(), prefix, lens)]).long()
        ext = dict(extend_prefix_lens=torch.tensor(prefix), extend_seq_lens=lens_t - torch.tensor(prefix),
                   extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=(lens_t - torch.tensor(prefix)).tolist())
    return SimpleNamespace(forward_mode=mode, spec_info=None, req_pool_indices=rpi, seq_lens=lens_t,
                           seq_lens_cpu=lens_t.clone(), seq_lens_sum=int(lens_t.sum()), out_cache_loc=loc,
                           encoder_lens=None, batch_size=len(lens), **ext)


def qkv(n, g):
    """q [n, Hq * D], k and v [n, Hkv, D]: what RadixAttention hands a backend."""
    return (torch.randn(n, HQ * D, generator=g), torch.randn(n, HKV, D, generator=g),
            torch.randn(n, HKV, D, generator=g))


def test_short_requests_are_stock_and_long_ones_sparse():
    ours_mr, stock_mr = runner(), runner()
    ours = AsyncTLSBackend(ours_mr, dense_backend.build(ours_mr, "torch_native"))
    stock = dense_backend.build(stock_mr, "torch_native")
    seen_lens = []
    real = ours.inner._run_sdpa_forward_decode
    ours.inner._run_sdpa_forward_decode = lambda *a, **k: seen_lens.append(a[6].tolist()) or real(*a, **k)
    g = torch.Generator().manual_seed(0)
    r2t, rpi, lens = ours_mr.req_to_token_pool.req_to_token, torch.tensor([1, 3]), [300, 90]
    fb = batch(ForwardMode.EXTEND, rpi, lens, r2t, prefix=[0, 0])
    ours.init_forward_metadata(fb)
    stock.init_forward_metadata(fb)
    for i in range(LAYERS):
        q, k, v = qkv(390, g)
        got = ours.forward_extend(q, k, v, layer(i), fb)
        assert torch.equal(got, stock.forward_extend(q, k, v, layer(i), fb))  # prefill is stock's, bit for bit
    new = [n + 1 for n in lens]
    dfb = batch(ForwardMode.DECODE, rpi, new, r2t)
    ours.init_forward_metadata(dfb)
    stock.init_forward_metadata(dfb)
    for i in range(LAYERS):
        q, k, v = qkv(2, g)
        got = ours.forward_decode(q, k, v, layer(i), dfb).view(2, HQ, D)
        want_dense = stock.forward_decode(q, k, v, layer(i), dfb).view(2, HQ, D)
        assert torch.equal(got[1], want_dense[1])  # the short request: stock's output, bit for bit
        kb = ours_mr.token_to_kv_pool.get_key_buffer(i)
        vb = ours_mr.token_to_kv_pool.get_value_buffer(i)
        ix = R.build_index(kb, r2t, rpi, torch.tensor(new), ours.index.channels[i], BS)
        want_sparse = R.asynctls_decode(q.view(2, HQ, D), kb, vb, r2t, rpi, torch.tensor(new), *ix,
                                        ours.index.channels[i], block_size=BS, block_budget=CFG.block_budget,
                                        token_budget=CFG.token_budget, sink_tokens=CFG.sink_tokens,
                                        local_window=CFG.local_window, sm_scale=D ** -0.5)
        torch.testing.assert_close(got[0], want_sparse[0])  # the long request: the reference sparse decode
        assert not torch.allclose(got[0], want_dense[0], atol=1e-3)
    assert seen_lens == [[1, 91]] * LAYERS  # the stock kernel read one row of the long request, not 301
    assert torch.equal(ours_mr.token_to_kv_pool.get_key_buffer(1), stock_mr.token_to_kv_pool.get_key_buffer(1))


def test_unknown_attributes_are_the_inner_backends():
    mr = runner()
    ours = AsyncTLSBackend(mr, dense_backend.build(mr, "torch_native"))
    assert ours.use_sliding_window_kv_pool is False  # read off TorchNativeAttnBackend
    with pytest.raises(AttributeError):
        ours.no_such_attribute
