"""PD decode server: KV that arrives from a prefill server is indexed before its first decode step, exactly as a local
prefill of the same KV indexes it.

Two AsyncTLS backends over SGLang's own CPU pools (MHATokenToKVPool, ReqToTokenPool; torch_native inside): one
prefills the requests locally in chunks (the inner backend writes the KV, forward_extend indexes it); the other gets
the same KV written straight into its slot rows, as a transfer engine writes them, and the requests then pass
SGLang's own decode-side admission, `SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch` (with its real
`prepare_for_prebuilt` / `process_prebuilt`), which the plugin hooked through load_plugins. Labels, label scales and
block bounds must be equal to the bit, the whole index tensors, and so must the first decode step's output.
"""

from array import array
from types import SimpleNamespace

import pytest
import torch
from test_backend_cpu import BS, D, HKV, LAYERS
from test_backend_stock_inner import batch, layer, qkv, runner

from sglang_asynctls import dense_backend
from sglang_asynctls.backend import AsyncTLSBackend

decode = pytest.importorskip("sglang.srt.disaggregation.decode")
from sglang.srt.disaggregation import decode_schedule_batch_mixin  # noqa: E402
from sglang.srt.managers import schedule_batch  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

PAGE_SIZES = [1, BS, 2 * BS]  # per-request block rows; a page of one block; a page of two blocks


@pytest.fixture(autouse=True)
def plugin_hooks(monkeypatch):
    from sglang.srt.plugins import load_plugins

    load_plugins()  # applies prebuilt_batch's hook to SGLang's get_new_prebuilt_batch, as in a server process
    # what a scheduler process publishes: the decode radix cache matched prefixes at preallocation
    monkeypatch.setattr(decode, "get_disagg", lambda: SimpleNamespace(disaggregation_decode_enable_radix_cache=True))
    monkeypatch.setattr(schedule_batch, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))
    # sampling info needs the model's vocabulary and penalizers: not what is tested here
    monkeypatch.setattr(decode_schedule_batch_mixin.SamplingBatchInfo, "from_schedule_batch",
                        staticmethod(lambda b, vocab_size: None))


def allocate(r2t, row, start, end, free):
    """Positions [start, end) of request `row` get slots from `free` (a list of pages, SGLang's allocator order)."""
    page = len(free[0])
    for first in range(start - start % page, end, page):
        r2t[row, first:first + page] = free.pop(0)


def free_pages(page_size, g, num_slots):
    """Shuffled pages (page 0 is SGLang's padding), so requests get scattered, non-contiguous slots."""
    pages = torch.arange(page_size, num_slots).view(-1, page_size)
    return list(pages[torch.randperm(len(pages), generator=g)])


def backends(page_size, channels):
    """(local, remote): the decode server prefilling itself vs receiving KV, same layout of slots."""
    out = []
    for _ in range(2):
        mr = runner(page_size)
        b = AsyncTLSBackend(mr, dense_backend.build(mr, "torch_native"))
        b.index.channels.copy_(channels)  # calibrated channels, as for every packaged model
        b.index.channels_ready = [True] * LAYERS
        out.append((mr, b))
    return out


def prefill_locally(mr, b, rows, prefix, lens, g):
    """A local extend of [prefix, len) of each row; returns the keys and values each layer wrote."""
    r2t = mr.req_to_token_pool.req_to_token
    fb = batch(ForwardMode.EXTEND, torch.tensor(rows), lens, r2t, prefix=prefix)
    b.init_forward_metadata(fb)
    kv = []
    for i in range(LAYERS):
        q, k, v = qkv(int(fb.out_cache_loc.numel()), g)
        b.forward_extend(q, k, v, layer(i), fb)
        kv.append((k, v))
    return fb.out_cache_loc, kv


def transfer(mr, loc, kv):
    """What the transfer engine does: the prefill server's K/V bytes land in the decode side's slot rows."""
    pool = mr.token_to_kv_pool
    for i, (k, v) in enumerate(kv):
        pool.k_buffer[i][loc] = k
        pool.v_buffer[i][loc] = v


def arrived_request(row, r2t, prefix, length, first_token=7):
    """A request as DecodeTransferQueue.pop_transferred hands it to the waiting queue: its row preallocated, the
    decode-side radix prefix matched, the prefill server's first token appended."""
    req = Req(f"r{row}", "", array("q", range(100, 100 + length)), SamplingParams(max_new_tokens=8))
    req.req_pool_idx = row
    req.prefix_indices = r2t[row, :prefix].clone()
    req.last_node = object()  # matched at preallocation (pop_preallocated), so not matched again
    req.kv_committed_len = length
    req.output_ids.append(first_token)
    return req


def admit(mr, backend, reqs, mode="decode", enabled=True):
    """SGLang's decode-side admission of arrived requests, hooked by the plugin; returns the PREBUILT batch."""
    cfg = mr.server_args._asynctls_config
    server_args = SimpleNamespace(disaggregation_mode=mode, attention_backend="asynctls" if enabled else "triton",
                                  **({"_asynctls_config": cfg} if enabled else {}))
    scheduler = SimpleNamespace(
        grammar_manager=SimpleNamespace(has_waiting_grammars=lambda: False), waiting_queue=list(reqs),
        enable_priority_scheduling=False, req_to_token_pool=mr.req_to_token_pool, max_running_requests=8,
        token_to_kv_pool_allocator=None, tree_cache=SimpleNamespace(cache_unfinished_req=lambda req, **kw: None),
        model_config=SimpleNamespace(vocab_size=1000), enable_overlap=False,
        spec_algorithm=SpeculativeAlgorithm.NONE, server_args=server_args,
        future_map=SimpleNamespace(stash=lambda *args: None),
        tp_worker=SimpleNamespace(model_runner=SimpleNamespace(attn_backend=backend)))
    return decode.SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch(
        scheduler, SimpleNamespace(batch_size=lambda: 0))


def assert_same_index(a, b):
    for name in ("labels", "label_scale", "kmin", "kmax"):
        for i in range(LAYERS):
            assert torch.equal(getattr(a.index, name)[i], getattr(b.index, name)[i]), (name, i)


def first_decode(mr, b, rows, lens, g):
    fb = batch(ForwardMode.DECODE, torch.tensor(rows), [n + 1 for n in lens], mr.req_to_token_pool.req_to_token)
    b.init_forward_metadata(fb)
    return [b.forward_decode(*qkv(len(rows), g), layer(i), fb) for i in range(LAYERS)]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_arrived_kv_gets_the_index_a_local_chunked_prefill_writes(page_size):
    g = torch.Generator().manual_seed(page_size)
    channels = torch.stack([torch.stack([torch.randperm(D, generator=g)[:8] for _ in range(HKV)])
                            for _ in range(LAYERS)])
    (mr_a, local), (mr_b, remote) = backends(page_size, channels)
    free = free_pages(page_size, g, mr_a.token_to_kv_pool.size)
    rows, lens = [1, 3], [301, 91]  # odd lengths; 301 is past dense_below (sparse), 91 is not
    for mr in (mr_a, mr_b):
        mr.req_to_token_pool.req_to_token.zero_()
    for row, n in zip(rows, lens):  # one slot past the prompt: the first decode token's
        allocate(mr_a.req_to_token_pool.req_to_token, row, 0, n + 1, free)
    mr_b.req_to_token_pool.req_to_token.copy_(mr_a.req_to_token_pool.req_to_token)
    # local: SGLang's chunked prefill, 150 tokens of the long prompt first
    loc1, kv1 = prefill_locally(mr_a, local, rows, [0, 0], [150, 91], g)
    loc2, kv2 = prefill_locally(mr_a, local, rows[:1], [150], [301], g)
    # remote: the same KV lands in the pool in one transfer, then the requests are admitted
    transfer(mr_b, loc1, kv1)
    transfer(mr_b, loc2, kv2)
    r2t = mr_b.req_to_token_pool.req_to_token
    admitted = admit(mr_b, remote, [arrived_request(r, r2t, 0, n) for r, n in zip(rows, lens)])
    assert admitted.forward_mode == ForwardMode.PREBUILT and remote.stats["index_arrivals"] == 2
    assert remote.stats["index_slots_labelled"] == sum(lens)
    assert_same_index(local, remote)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for a, b in zip(first_decode(mr_a, local, rows, lens, g1), first_decode(mr_b, remote, rows, lens, g2)):
        assert torch.equal(a, b)  # the long request's sparse decode reads the arrived index


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_a_radix_shared_prefix_is_reused_and_the_rest_indexed(page_size):
    """Turn 2 of a conversation: the decode-side radix cache holds the first turn's pages; only the rest arrives.
    At page size 1 the radix cache shares prefixes mid-block (70 tokens), and per-request block rows are rebuilt."""
    g = torch.Generator().manual_seed(10 + page_size)
    channels = torch.stack([torch.stack([torch.randperm(D, generator=g)[:8] for _ in range(HKV)])
                            for _ in range(LAYERS)])
    (mr_a, local), (mr_b, remote) = backends(page_size, channels)
    free = free_pages(page_size, g, mr_a.token_to_kv_pool.size)
    shared = 70 if page_size == 1 else 4 * BS
    r2t_a = mr_a.req_to_token_pool.req_to_token
    r2t_a.zero_()
    allocate(r2t_a, 1, 0, 201, free)
    r2t_a[2, :shared] = r2t_a[1, :shared]
    allocate(r2t_a, 2, shared, 251, free)
    mr_b.req_to_token_pool.req_to_token.copy_(r2t_a)
    loc1, kv1 = prefill_locally(mr_a, local, [1], [0], [200], g)
    transfer(mr_b, loc1, kv1)
    admit(mr_b, remote, [arrived_request(1, r2t_a, 0, 200)])
    pages_before = remote.stats["index_pages_written"]
    loc2, kv2 = prefill_locally(mr_a, local, [2], [shared], [250], g)  # the local radix hit of turn 2
    transfer(mr_b, loc2, kv2)
    admit(mr_b, remote, [arrived_request(2, r2t_a, shared, 250)])
    new_blocks = -(-250 // BS) - (0 if page_size == 1 else shared // BS)
    assert remote.stats["index_pages_written"] - pages_before == new_blocks
    assert_same_index(local, remote)


def test_without_calibration_the_first_long_arrival_ranks_the_channels_as_a_prefill_would():
    (mr_a, local), (mr_b, remote) = backends(BS, torch.zeros(LAYERS, HKV, 8, dtype=torch.long))
    for b in (local, remote):
        b.index.channels_ready = [False] * LAYERS
    g = torch.Generator().manual_seed(3)
    r2t = mr_a.req_to_token_pool.req_to_token
    mr_b.req_to_token_pool.req_to_token.copy_(r2t)
    loc, kv = prefill_locally(mr_a, local, [1, 3], [0, 0], [300, 90], g)  # >= 256 new tokens: ranks
    transfer(mr_b, loc, kv)
    admit(mr_b, remote, [arrived_request(1, r2t, 0, 300), arrived_request(3, r2t, 0, 90)])
    assert remote.index.channels_ready == [True] * LAYERS
    assert torch.equal(local.index.channels, remote.index.channels)
    assert_same_index(local, remote)


@pytest.mark.gpu
def test_indexing_arrived_kv_never_waits_for_the_gpu():
    """The hook runs in the decode loop, behind the forward in flight: planning (one queued copy of the lengths) and
    the Triton writer must not synchronize (torch's sync debug mode raises on any call that would)."""
    from sglang_asynctls.index import IndexPool, plan_extend
    from sglang_asynctls.kernels.index_extend import index_extend

    slots, g = 64 * BS, torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(slots, HKV, D, device="cuda", dtype=torch.float16, generator=g)
    r2t = torch.arange(slots, device="cuda").view(4, -1)
    channels = torch.stack([torch.randperm(D, device="cuda")[:8] for _ in range(HKV)])
    pool = IndexPool(1, slots, HKV, D, 8, BS, torch.float16, "cuda", channels[None], extend=index_extend)
    rpi, new_loc = torch.tensor([1, 2], device="cuda"), torch.cat([r2t[1, :201], r2t[2, 64:200]])
    try:
        for debug_mode in (0, "error"):  # the first pass compiles the kernel and pins a host block
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(debug_mode)
            pool.write_extend(0, k, new_loc, plan_extend(r2t, rpi, [0, 64], [201, 200], BS))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.equal(pool.kmax[0][r2t[1, 64] // BS], k[r2t[1, 64:80]].amax(dim=0))


class NoIndexExpected:
    def index_arrived_kv(self, *args):
        raise AssertionError("the hook indexed KV on a server that does not run AsyncTLS in decode mode")


@pytest.mark.parametrize("mode, enabled", [("decode", False), ("null", True), ("prefill", True)])
def test_the_hook_is_a_no_op_without_asynctls_or_outside_decode_mode(mode, enabled):
    mr = runner(BS)
    r2t = mr.req_to_token_pool.req_to_token
    admitted = admit(mr, NoIndexExpected(), [arrived_request(1, r2t, 0, 100)], mode=mode, enabled=enabled)
    assert admitted.forward_mode == ForwardMode.PREBUILT  # SGLang's batch, as without the plugin


def test_a_decode_server_whose_backend_is_not_asynctls_is_refused():
    mr = runner(BS)
    with pytest.raises(RuntimeError, match="needs the asynctls attention backend"):
        admit(mr, dense_backend.build(mr, "torch_native"), [arrived_request(1, mr.req_to_token_pool.req_to_token,
                                                                            0, 100)])


def test_the_hook_is_registered_on_sglangs_function():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_asynctls.patches import prebuilt_batch

    assert prebuilt_batch.TARGET in HookRegistry._patched
    hooks = [h[:2] for h in HookRegistry._hooks[prebuilt_batch.TARGET]]
    assert (HookType.AFTER, prebuilt_batch.index_arrived_kv) in hooks
    assert hasattr(decode.SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch, "__wrapped__")
    # the Scheduler gets the method from the mixin (its module does not import on CPU CI: read, not imported)
    import importlib.util

    scheduler_src = open(importlib.util.find_spec("sglang.srt.managers.scheduler").origin).read()
    assert "SchedulerDisaggregationDecodeMixin," in scheduler_src
    assert "def get_new_prebuilt_batch" not in scheduler_src
    mixin = decode_schedule_batch_mixin.ScheduleBatchDisaggregationDecodeMixin
    assert ScheduleBatch.prepare_for_prebuilt is mixin.prepare_for_prebuilt
