"""--asynctls-sparse-min-kv-mib on CPU: a decode step whose long requests hold less KV than the flag says runs the
inner backend over every request at its real length (the long ones get exactly the dense output), a step above it
is sparse as without the flag, and under CUDA graphs the choice reaches the graph through the same device scalar
from step to step."""

import dataclasses
from types import SimpleNamespace

import torch
from test_backend_cpu import BS, CFG, D, HKV, HQ, LAYERS, Backend, FakeInner, layer, mode, model_runner

from sglang_asynctls import reference as R
from sglang_asynctls import step_choice

ROW = 2 * HKV * D * 4  # K and V rows of one token in one layer, float32


def test_kv_row_bytes_counts_mlas_shared_latent_once():
    k, v = torch.zeros(8, HKV, D), torch.zeros(8, HKV, D)
    assert step_choice.kv_row_bytes(k, v) == ROW
    latent = torch.zeros(8, 1, 576, dtype=torch.bfloat16)
    assert step_choice.kv_row_bytes(latent, latent[..., :512]) == 1152


def test_sparse_from_compares_the_long_requests_kv_with_the_flag():
    lens = torch.tensor([300, 90, 250])
    assert step_choice.sparse_from(lens, 200, 0, ROW) == 200  # flag off
    assert step_choice.sparse_from(None, 200, 10**9, ROW) == 200  # no host-side lengths: as off
    assert step_choice.sparse_from(lens, 200, 550 * ROW, ROW) == 200  # 300 + 250 long tokens: enough
    assert step_choice.sparse_from(lens, 200, 551 * ROW, ROW) == step_choice.NEVER


class GraphInner(FakeInner):
    """FakeInner with the graph hooks: the captured metadata is the lengths it was last given."""

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        pass

    def init_forward_metadata_out_graph(self, fb, in_capture=False):
        self.lens = fb.seq_lens


def _prefilled(min_mib, inner_cls=FakeInner):
    mr, g = model_runner()
    mr.server_args = SimpleNamespace(_asynctls_config=dataclasses.replace(CFG, sparse_min_kv_mib=min_mib))
    be = Backend(mr, inner_cls(mr))
    rpi, lens, r2t = torch.tensor([1, 3]), [300, 90], mr.req_to_token_pool.req_to_token
    fb = SimpleNamespace(forward_mode=mode(False), spec_info=None, req_pool_indices=rpi, seq_lens=torch.tensor(lens),
                         seq_lens_cpu=torch.tensor(lens), extend_prefix_lens_cpu=[0, 0],
                         out_cache_loc=torch.cat([r2t[1, :300], r2t[3, :90]]).long())
    be.init_forward_metadata(fb)
    for i in range(LAYERS):
        kv = torch.randn(390, HKV * D, generator=g)
        be.forward_extend(torch.randn(390, HQ * D, generator=g), kv, kv.flip(0), layer(i), fb)
    return be, mr, g


def _step(be, mr, g, t, graph):
    """Decode step t (lengths 301 + t and 91 + t) of both requests through layer 1: (output [2, Hq, D], dense,
    sparse reference)."""
    rpi, r2t = torch.tensor([1, 3]), mr.req_to_token_pool.req_to_token
    new = torch.tensor([301 + t, 91 + t])
    dfb = SimpleNamespace(forward_mode=mode(True), spec_info=None, req_pool_indices=rpi, seq_lens=new,
                          seq_lens_cpu=new, seq_lens_sum=int(new.sum()),
                          out_cache_loc=torch.stack([r2t[1, 300 + t], r2t[3, 90 + t]]).long())
    (be.init_forward_metadata_out_graph if graph else be.init_forward_metadata)(dfb)
    q = torch.randn(2, HQ * D, generator=g)
    be._block_table = None  # a new step (layer 0 would reset the per-step tensors)
    out = be.forward_decode(q, torch.randn(2, HKV * D, generator=g), torch.randn(2, HKV * D, generator=g),
                            layer(1), dfb).view(2, HQ, D)
    kb, vb = mr.token_to_kv_pool.k[1], mr.token_to_kv_pool.v[1]
    dense = R.dense_decode(q.view(2, HQ, D), kb, vb, r2t, rpi, new, D ** -0.5)
    ix = R.build_index(kb, r2t, rpi, new, be.index.channels[1], BS)
    sparse = R.asynctls_decode(q.view(2, HQ, D), kb, vb, r2t, rpi, new, *ix, be.index.channels[1], block_size=BS,
                               block_budget=CFG.block_budget, token_budget=CFG.token_budget,
                               sink_tokens=CFG.sink_tokens, local_window=CFG.local_window, sm_scale=D ** -0.5)
    return out, dense, sparse


def test_a_step_under_the_flag_is_dense_for_every_request():
    be, mr, g = _prefilled(min_mib=1.0)  # the long request holds 301 x 256 B = 0.07 MiB a layer
    out, dense, _ = _step(be, mr, g, 0, graph=False)
    assert be.inner.lens.tolist() == [301, 91]  # the inner backend read the long request whole
    torch.testing.assert_close(out, dense)
    assert be.stats["dense_steps"] == 1


def test_a_step_over_the_flag_is_sparse_as_without_it():
    for min_mib in (0.0, 0.05):  # off, and under the 0.07 MiB the long request holds
        be, mr, g = _prefilled(min_mib)
        out, dense, sparse = _step(be, mr, g, 0, graph=False)
        assert be.inner.lens.tolist() == [1, 91]
        torch.testing.assert_close(out[0], sparse[0])
        torch.testing.assert_close(out[1], dense[1])
        assert be.stats["dense_steps"] == 0


def test_under_cuda_graphs_the_choice_changes_through_one_device_scalar():
    be, mr, g = _prefilled(min_mib=(301 + 2) * ROW / 2**20, inner_cls=GraphInner)  # sparse from length 303 on
    be.init_cuda_graph_state(4, 4)
    scalar = be._graph_from
    for t, sparse_step in ((0, False), (2, True), (1, False)):
        out, dense, sparse = _step(be, mr, g, t, graph=True)
        assert be._from is scalar  # what a captured graph reads, at one address
        assert int(scalar) == (CFG.dense_below if sparse_step else step_choice.NEVER)
        torch.testing.assert_close(out[0], sparse[0] if sparse_step else dense[0])
        torch.testing.assert_close(out[1], dense[1])
    assert be.stats["dense_steps"] == 2
