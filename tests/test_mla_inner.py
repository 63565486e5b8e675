"""MLA models under a fa3 or FlashInfer inner backend, on CPU.

DeepSeek/GLM model code picks its attention path by the backend's name (deepseek_v2's
dispatch_attn_forward_method, forward_mla's absorbed-core list). The claims: SGLang's real dispatch, run against our
backend after SGLang stamped its registered name on it, picks exactly the path and name it picks for the stock inner
backend; and the chunked-prefix prefill, which calls a layer again per prefix chunk, indexes the new keys once.
"""

from types import SimpleNamespace

import pytest
import torch
from test_backend_cpu import Backend, layer, mode, model_runner

deepseek_v2 = pytest.importorskip("sglang.srt.models.deepseek_v2")
from sglang.srt.models.deepseek_common import attention_backend_handler  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402
from sglang.srt.models.deepseek_common.utils import FORWARD_ABSORB_CORE_ATTENTION_BACKENDS  # noqa: E402

from sglang_asynctls.backend import AsyncTLSBackend  # noqa: E402


def _mode(decode: bool):
    return SimpleNamespace(is_decode_or_idle=lambda: decode, is_decode=lambda: decode,
                           is_extend_without_speculative=lambda: not decode, is_target_verify=lambda: False,
                           is_draft_extend_v2=lambda: False)


def _batch(decode: bool, prefix: int):
    return SimpleNamespace(forward_mode=_mode(decode), extend_prefix_lens_cpu=None if decode else [prefix],
                           seq_lens_cpu=torch.tensor([prefix + 100]), get_max_chunk_capacity=lambda: 1 << 20)


def _dispatch(backend, fb, monkeypatch):
    """SGLang 0.5.17's own DeepseekV2AttentionMLA.dispatch_attn_forward_method with `backend` as the forward's;
    the server-wide settings it reads are stock's defaults (no deterministic mode, no prefill context parallel)."""
    monkeypatch.setattr(deepseek_v2, "get_server_args", lambda: SimpleNamespace(
        get_attention_backends=lambda: ("asynctls", "asynctls")))  # what --enable-asynctls leaves in ServerArgs
    monkeypatch.setattr(attention_backend_handler, "get_exec", lambda: SimpleNamespace(
        deterministic=SimpleNamespace(enable_deterministic_inference=False)))
    monkeypatch.setattr(attention_backend_handler, "mla_use_prefill_cp", lambda fb: False)
    attn = SimpleNamespace(chunked_prefix_cache_threshold=8192, disable_chunked_prefix_cache=False,
                           flashinfer_mla_disable_ragged=False, current_attention_backend=None)
    with forward_context(ForwardContext(attn_backend=backend)):
        method = deepseek_v2.DeepseekV2AttentionMLA.dispatch_attn_forward_method(attn, fb)
    return method, attn.current_attention_backend


def _stamped(backend, name):
    """What SGLang's attention_backend_setup does to the backend it built (its registered name)."""
    backend.prefill_attention_backend_str = backend.decode_attention_backend_str = name
    return backend


@pytest.mark.parametrize("inner", ["fa3", "flashinfer", "triton"])
def test_the_model_dispatches_as_under_the_stock_inner(inner, monkeypatch):
    mr, _ = model_runner()
    ours = _stamped(AsyncTLSBackend(mr, Backend(mr).inner, inner_name=inner), "asynctls")
    stock = _stamped(SimpleNamespace(), inner)
    for decode, prefix in ((True, 0), (False, 0), (False, 20000), (False, 100)):  # decode, prefills (MHA / MLA)
        fb = _batch(decode, prefix)
        assert _dispatch(ours, fb, monkeypatch) == _dispatch(stock, fb, monkeypatch)
    assert _dispatch(ours, _batch(True, 0), monkeypatch)[1] == inner
    # the absorbed-core path (q_rope passed apart, which the sparse path reads) is the one fa3 / FlashInfer take
    assert (inner in FORWARD_ABSORB_CORE_ATTENTION_BACKENDS) == (inner != "triton")


def test_without_the_inner_name_the_model_would_see_asynctls(monkeypatch):
    """Why the name is shown: SGLang's stamped "asynctls" is no backend the model knows, so it would take Triton's
    path and layout its query for Triton, not for the fa3 kernel inside."""
    mr, _ = model_runner()
    anonymous = _stamped(AsyncTLSBackend(mr, Backend(mr).inner), "asynctls")
    assert _dispatch(anonymous, _batch(True, 0), monkeypatch)[1] == "asynctls"
    assert "asynctls" not in FORWARD_ABSORB_CORE_ATTENTION_BACKENDS


def test_chunked_prefix_calls_index_the_new_keys_once():
    mr, g = model_runner()
    be = Backend(mr)
    writes = []
    real = be.index.write_extend
    be.index.write_extend = lambda *a, **k: writes.append(a[0]) or real(*a, **k)
    r2t = mr.req_to_token_pool.req_to_token
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=torch.tensor([1]),
                         seq_lens=torch.tensor([300]), seq_lens_cpu=torch.tensor([300]), extend_prefix_lens_cpu=[200],
                         out_cache_loc=r2t[1, 200:300].long())
    be.init_forward_metadata(fb)
    kv = torch.randn(100, 2 * 16, generator=g)
    for attend_prefix in (False, True, True):  # the new tokens, then two prefix chunks (forward_mha's order)
        fb.attn_attend_prefix_cache = attend_prefix
        be.forward_extend(torch.randn(100, 4 * 16, generator=g), kv, kv, layer(0), fb)
    assert writes == [0]


RANK, ROPE = 32, 16  # the latent (kv_lora_rank) and its rope part: the pool holds [slots, 1, RANK + ROPE]


class LatentInner:
    """Stand-in for a stock MLA backend: writes the latent as SGLang's MLA pool holds it, from either call form."""

    def __init__(self, pool):
        self.pool = pool

    def init_forward_metadata(self, fb):
        pass

    def _write(self, k, layer, fb, k_rope):
        latent = k if k_rope is None else torch.cat([k, k_rope], dim=-1)
        self.pool.kv_buffer[layer.layer_id][fb.out_cache_loc] = latent.view(-1, 1, RANK + ROPE)

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, q_rope=None, k_rope=None):
        self._write(k, layer, fb, k_rope)
        return torch.zeros(q.shape[0], layer.tp_q_head_num * RANK)

    forward_decode = forward_extend


def mla_runner():
    pools = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    mr, g = model_runner()
    mr.model_config.attention_arch = SimpleNamespace(name="MLA")
    mr.model_config.kv_lora_rank, mr.model_config.qk_rope_head_dim = RANK, ROPE
    slots = mr.token_to_kv_pool.k[0].shape[0]
    mr.token_to_kv_pool = pools.MLATokenToKVPool(slots, mr.page_size, torch.float32, RANK, ROPE, 2, "cpu", False)
    return mr, g


def test_sparse_mla_decode_reads_q_rope_passed_apart_as_triton_reads_it_joined():
    """fa3 and FlashInfer get the query's latent and rope parts apart (q, q_rope; k, k_rope), Triton gets them
    joined: the long request's sparse output is the same, and it is the reference decode over the latent pool."""
    from sglang_asynctls import reference as R
    from test_backend_cpu import CFG, HQ

    mr, g = mla_runner()
    be = AsyncTLSBackend(mr, LatentInner(mr.token_to_kv_pool), inner_name="fa3")
    lay = SimpleNamespace(layer_id=0, tp_q_head_num=HQ, qk_head_dim=RANK + ROPE, scaling=(RANK + ROPE) ** -0.5)
    rpi, lens, r2t = torch.tensor([1, 3]), [300, 90], mr.req_to_token_pool.req_to_token
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi, seq_lens=torch.tensor(lens),
                         seq_lens_cpu=torch.tensor(lens), extend_prefix_lens_cpu=[0, 0],
                         out_cache_loc=torch.cat([r2t[1, :300], r2t[3, :90]]).long())
    be.init_forward_metadata(fb)
    be.forward_extend(torch.randn(390, HQ * RANK, generator=g), torch.randn(390, 1, RANK, generator=g), None, lay,
                      fb, q_rope=torch.randn(390, HQ, ROPE, generator=g), k_rope=torch.randn(390, 1, ROPE, generator=g))
    new = torch.tensor(lens) + 1
    dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                          seq_lens_cpu=new, seq_lens_sum=int(new.sum()),
                          out_cache_loc=torch.stack([r2t[1, 300], r2t[3, 90]]).long())
    q_nope, q_rope = torch.randn(2, HQ, RANK, generator=g), torch.randn(2, HQ, ROPE, generator=g)
    k_nope, k_rope = torch.randn(2, 1, RANK, generator=g), torch.randn(2, 1, ROPE, generator=g)
    be.init_forward_metadata(dfb)
    apart = be.forward_decode(q_nope, k_nope, k_nope, lay, dfb, q_rope=q_rope, k_rope=k_rope)
    joined = be.forward_decode(torch.cat([q_nope, q_rope], -1).reshape(2, -1), torch.cat([k_nope, k_rope], -1),
                               k_nope, lay, dfb)
    torch.testing.assert_close(apart, joined)
    kb = mr.token_to_kv_pool.get_key_buffer(0)
    vb = mr.token_to_kv_pool.get_value_buffer(0)
    ix = R.build_index(kb, r2t, rpi, new, be.index.channels[0], CFG.block_size)
    want = R.asynctls_decode(torch.cat([q_nope, q_rope], -1), kb, vb, r2t, rpi, new, *ix, be.index.channels[0],
                             block_size=CFG.block_size, block_budget=CFG.block_budget, token_budget=CFG.token_budget,
                             sink_tokens=CFG.sink_tokens, local_window=CFG.local_window, sm_scale=lay.scaling)
    torch.testing.assert_close(apart.view(2, HQ, RANK)[0], want[0])
    assert torch.equal(apart.view(2, HQ, RANK)[1], torch.zeros(HQ, RANK))  # the short request: the inner's output
