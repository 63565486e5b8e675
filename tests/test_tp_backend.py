"""Per-rank state under attention tensor parallelism, on CPU.

Each attention-TP rank holds its KV heads' keys, index and selection; the claim checked here is that sharding
changes nothing but which heads a rank sees: rank r's index is the head slice of the single-rank index, the
ranks' sparse outputs put together are the single-rank (reference) output, and every other piece of backend state
is the same on every rank. SGLang's Triton backend is the stand-in of test_backend_cpu (2 KV heads per rank).
"""

import dataclasses
import json

import pytest
import torch
from test_backend_cpu import BS, CFG, D, HKV, HQ, LAYERS, Backend, layer, mode, model_runner

import sglang_asynctls.backend as backend
from sglang_asynctls import reference as R
from sglang_asynctls.index import IndexPool, plan_extend
from sglang_asynctls.model_spec import UnsupportedModelError, kv_heads_of_rank

TP = 2
LENS = [300, 90]  # request 1 decodes sparse (>= dense_below 200), request 3 dense


@pytest.mark.parametrize("heads, size, want", [
    (8, 2, [(0, 4), (4, 8)]),                  # Qwen3-8B's KV heads over 2 ranks
    (4, 2, [(0, 2), (2, 4)]),                  # SmolLM2 padded for tp 2 (benchmarks/tp_check.py)
    (3, 1, [(0, 3)]),                          # one rank holds all
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # fewer KV heads than ranks: replicated, rank // replicas
    (1, 2, [(0, 1), (0, 1)]),                  # MLA: every rank holds the one latent head
])
def test_kv_heads_of_rank_follow_sglangs_split(heads, size, want):
    assert [(s.start, s.stop) for s in (kv_heads_of_rank(heads, size, r) for r in range(size))] == want


@pytest.mark.parametrize("heads, size, rank", [(3, 2, 0), (6, 4, 1), (4, 3, 2), (4, 2, 2), (4, 2, -1)])
def test_heads_that_do_not_split_are_refused_with_one_error(heads, size, rank):
    with pytest.raises(UnsupportedModelError, match=f"{heads} KV heads cannot be split over {size} attention"):
        kv_heads_of_rank(heads, size, rank)


def channel_table(tmp_path, heads):
    """[L][heads][D] rankings, different for every head, so a wrong slice is visible."""
    ranked = [[[(h * 5 + c * 3 + lay) % D for c in range(D)] for h in range(heads)] for lay in range(LAYERS)]
    path = tmp_path / f"ch{heads}.json"
    path.write_text(json.dumps({"channels": ranked}))
    return str(path), torch.tensor(ranked)[:, :, :CFG.label_channels]


def rank_backend(monkeypatch, path, size, rank, kv_heads=HKV * TP, q_heads=HQ * TP):
    mr, _ = model_runner()
    mr.model_config.num_key_value_heads, mr.model_config.num_attention_heads = kv_heads, q_heads
    mr.server_args._asynctls_config = dataclasses.replace(CFG, channel_config=path)
    monkeypatch.setattr(backend, "_attn_tp", lambda: (size, rank))
    return Backend(mr), mr


def run_batch(ranks, g):
    """One prefill (both requests) and one decode step, the same batch on every rank, each rank given its heads
    of the full model's q/k/v. Returns the full-model tensors and each rank's decode outputs per layer."""
    r2t = ranks[0][1].req_to_token_pool.req_to_token
    rpi, n = torch.tensor([1, 3]), sum(LENS)
    loc = torch.cat([r2t[1, :LENS[0]], r2t[3, :LENS[1]]]).long()
    fb = dict(spec_info=None, req_pool_indices=rpi, out_cache_loc=loc, extend_prefix_lens_cpu=[0, 0],
              seq_lens=torch.tensor(LENS), seq_lens_cpu=torch.tensor(LENS))
    new = torch.tensor(LENS) + 1
    dfb = dict(spec_info=None, req_pool_indices=rpi, seq_lens=new, seq_lens_cpu=new, seq_lens_sum=int(new.sum()),
               out_cache_loc=torch.stack([r2t[1, LENS[0]], r2t[3, LENS[1]]]).long())
    full = {"k": torch.randn(LAYERS, n + 2, TP * HKV, D, generator=g), "q": torch.randn(LAYERS, 2, TP * HQ, D,
                                                                                       generator=g)}
    full["v"] = torch.randn(full["k"].shape, generator=g)
    heads = lambda t, r, h: t[..., r * h:(r + 1) * h, :].reshape(t.shape[0], -1)  # noqa: E731
    outs = []
    for r, (be, _) in enumerate(ranks):
        be.init_forward_metadata(_batch(fb, decode=False))
        for i in range(LAYERS):
            k, v = heads(full["k"][i, :n], r, HKV), heads(full["v"][i, :n], r, HKV)
            be.forward_extend(torch.zeros(n, HQ * D), k, v, layer(i), _batch(fb, decode=False))
        be.init_forward_metadata(_batch(dfb, decode=True))
        outs.append([be.forward_decode(heads(full["q"][i], r, HQ), heads(full["k"][i, n:], r, HKV),
                                       heads(full["v"][i, n:], r, HKV), layer(i), _batch(dfb, decode=True))
                     for i in range(LAYERS)])
    return full, r2t, rpi, new, outs


def _batch(fields, decode):
    from types import SimpleNamespace

    return SimpleNamespace(forward_mode=mode(decode), **fields)


def test_ranks_together_give_the_single_rank_sparse_decode(tmp_path, monkeypatch):
    path, table = channel_table(tmp_path, TP * HKV)
    ranks = [rank_backend(monkeypatch, path, TP, r) for r in range(TP)]
    full, r2t, rpi, new, outs = run_batch(ranks, torch.Generator().manual_seed(1))
    for i in range(LAYERS):
        kb = torch.cat([mr.token_to_kv_pool.k[i] for _, mr in ranks], dim=1)  # the single-rank pool [S, 4, D]
        vb = torch.cat([mr.token_to_kv_pool.v[i] for _, mr in ranks], dim=1)
        ix = R.build_index(kb, r2t, rpi, new, table[i], BS)
        want = R.asynctls_decode(full["q"][i], kb, vb, r2t, rpi, new, *ix, table[i], block_size=BS,
                                 block_budget=CFG.block_budget, token_budget=CFG.token_budget,
                                 sink_tokens=CFG.sink_tokens, local_window=CFG.local_window, sm_scale=D ** -0.5,
                                 bound_slack=CFG.bound_slack, group_score=CFG.group_score)
        dense = R.dense_decode(full["q"][i], kb, vb, r2t, rpi, new, D ** -0.5)
        got = torch.cat([o[i].view(2, HQ, D) for o in outs], dim=1)  # rank 0's heads, then rank 1's
        torch.testing.assert_close(got[0], want[0])  # long request: the single-rank sparse decode
        torch.testing.assert_close(got[1], dense[1])  # short request: dense
        assert not torch.allclose(got[0], dense[0], atol=1e-3)  # and the long one really went sparse


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return a == b


def test_only_the_head_slice_depends_on_the_rank(tmp_path, monkeypatch):
    """Nothing that decides admission, scheduling, the dense/sparse split or the block table differs by rank:
    after the same batch, every attribute of the two ranks' backends but the KV pool is equal except the index,
    and the index differs only by holding the other heads (same shapes, same bytes)."""
    path, table = channel_table(tmp_path, TP * HKV)
    ranks = [rank_backend(monkeypatch, path, TP, r) for r in range(TP)]
    run_batch(ranks, torch.Generator().manual_seed(2))
    (be0, _), (be1, _) = ranks
    # SGLang's KV pool holds each rank's heads by construction; the inner backend and the batch view it was given
    # are compared by what they decide (the lengths the dense kernel saw)
    compared = set(vars(be0)) - {"token_to_kv_pool", "req_to_token_pool", "inner", "_dense_fb"}
    differ = {name for name in compared if not _same(vars(be0)[name], vars(be1)[name])}
    assert differ == {"index"} and {"cfg", "_block_table", "_long_seq", "_extend_plan"} <= compared
    assert torch.equal(be0.inner.lens, be1.inner.lens) and torch.equal(be0._dense_fb.seq_lens, be1._dense_fb.seq_lens)
    assert be0.cfg == be1.cfg and be0.stats == be1.stats and be0.num_blocks == be1.num_blocks
    assert be0.index.nbytes() == be1.index.nbytes() and be0.index.channels_ready == be1.index.channels_ready
    for r, be in enumerate((be0, be1)):
        assert torch.equal(be.index.channels, table[:, kv_heads_of_rank(TP * HKV, TP, r)])


@pytest.mark.parametrize("calibrated", [True, False])
def test_rank_index_is_the_head_slice_of_the_single_rank_index(calibrated):
    """IndexPool on rank r (its KV heads only) holds exactly rows r of the single-rank pool: labels, scales,
    Kmin/Kmax and, uncalibrated, the channels each head ranks by |K| at its first prefill."""
    g = torch.Generator().manual_seed(3)
    heads, slots, d_c, n = TP * HKV, 32 * BS, 8, 300  # n >= MIN_RANKING_TOKENS: ranking happens
    keys = torch.randn(slots, heads, D, generator=g)
    table = torch.stack([torch.randperm(D, generator=g)[:d_c] for _ in range(heads)])[None]
    r2t = torch.arange(slots, dtype=torch.int32)[None]
    plan = plan_extend(r2t, torch.tensor([0]), [0], [n], BS)
    pools = []
    for sl in [slice(0, heads)] + [kv_heads_of_rank(heads, TP, r) for r in range(TP)]:
        pool = IndexPool(1, slots, sl.stop - sl.start, D, d_c, BS, torch.float32, "cpu",
                         table[:, sl] if calibrated else None)
        pool.write_extend(0, keys[:, sl], torch.arange(n), plan)
        pool.write_decode(0, keys[:, sl], torch.tensor([n]), torch.tensor([n + 1]))
        pools.append(pool)
    single, ranks = pools[0], pools[1:]
    for r, pool in enumerate(ranks):
        sl = kv_heads_of_rank(heads, TP, r)
        for name in ("kmin", "kmax", "labels", "label_scale"):
            assert torch.equal(getattr(pool, name)[0], getattr(single, name)[0][:, sl]), name
        assert torch.equal(pool.channels, single.channels[:, sl])


def test_pool_that_holds_other_heads_than_the_rank_share_is_refused(tmp_path, monkeypatch):
    path, _ = channel_table(tmp_path, TP * HKV)
    with pytest.raises(ValueError, match="pool holds 2 KV heads, its share of the channel table 1"):
        rank_backend(monkeypatch, path, 4, 1)  # 4 ranks share 4 KV heads: 1 each, but this pool holds 2


def test_kv_heads_that_do_not_split_are_refused_by_the_backend(tmp_path, monkeypatch):
    path, _ = channel_table(tmp_path, 3)
    with pytest.raises(UnsupportedModelError, match="3 KV heads cannot be split over 2"):
        rank_backend(monkeypatch, path, TP, 1, kv_heads=3, q_heads=6)
