"""The one-step-lag offload schedule, simulated over many decode steps: attention over M_{t-1}'s resident copies
equals attention over the same tokens read straight from the full KV (no stale read), with the copies run inline
or deferred to the wait; a lane that skips the wait or an update run before the attention is caught; telemetry
counts; a request released mid-copy leaves the others exact and its row reusable."""

import pytest
import torch

from sglang_asynctls import reference as R
from sglang_asynctls.kernels.gather_blocks import gather_blocks as kernel_gather
from sglang_asynctls.offload import reference as OR
from sglang_asynctls.offload.engine import OffloadEngine
from sglang_asynctls.offload.host_view import device_view
from sglang_asynctls.offload.lane import CudaLane, InlineLane
from sglang_asynctls.offload.resident_set import ResidentSet
from sglang_asynctls.offload.telemetry import OffloadTelemetry
from sglang_asynctls.offload.trace import random_walk as walk

BS, HKV, HQ, D, KB, KT = 8, 2, 4, 16, 4, 12
IMPLS = {"reference": ("reference", OR.gather_blocks), "triton": ("triton", kernel_gather)}


class DeferredLane(InlineLane):
    """Copies run only when the step waits: the latest they may land without a stale read."""

    def __init__(self, num_layers):
        super().__init__(num_layers)
        self.queue = []

    def submit(self, layer, copy, *tensors):
        self.queue.append(copy)

    def wait(self, layer):
        self.synchronize()

    def synchronize(self):
        while self.queue:
            self.queue.pop(0)()


class SkippedWaitLane(InlineLane):
    """Broken on purpose: the step does not wait; a layer's copy lands only when that layer submits the next one,
    i.e. just after the attention that needed it."""

    def __init__(self, num_layers):
        super().__init__(num_layers)
        self.pending = {}

    def submit(self, layer, copy, *tensors):
        if layer in self.pending:
            self.pending.pop(layer)()
        self.pending[layer] = copy


class UpdateFirstEngine(OffloadEngine):
    """Broken on purpose: makes M_t resident before attending over M_{t-1} (may evict what it is about to read)."""

    def step(self, layer, rows, seq_lens, blocks, attend):
        positions, token_slots = self.resident.candidates(layer, rows, seq_lens, self.block_size)
        positions, token_slots = positions.clone(), token_slots.clone()
        self.prefetch(layer, rows, blocks)
        return attend(positions, token_slots)


def _world(num_slots, lens=(61, 113, 90), rows=(3, 0, 4), num_rows=5, seed=0, impl="reference", lane=InlineLane,
           engine=OffloadEngine, num_layers=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    nblk = [n // BS for n in lens]
    host_pages = sum(nblk) + 5
    host_k = [torch.randn(host_pages * BS, HKV, D, generator=g) for _ in range(num_layers)]
    host_v = [torch.randn(host_pages * BS, HKV, D, generator=g) for _ in range(num_layers)]
    table = torch.full((num_rows, max(nblk)), -1, dtype=torch.int32)
    perm, start = torch.randperm(host_pages, generator=g), 0
    for row, n in zip(rows, nblk):
        table[row, :n] = perm[start:start + n].int()
        start += n
    dev_pages = num_rows * num_slots + 3
    dev_k = [torch.full((dev_pages * BS, HKV, D), float("nan")) for _ in range(num_layers)]
    dev_v = [torch.full((dev_pages * BS, HKV, D), float("nan")) for _ in range(num_layers)]
    kernels, gather_fn = IMPLS[impl]
    pages = torch.randperm(dev_pages, generator=g)[: len(rows) * num_slots].view(len(rows), -1)
    if device != "cpu":  # the GPU reads the host stores in place: pinned, through CUDA views
        host_k = [device_view(t.pin_memory()) for t in host_k]
        host_v = [device_view(t.pin_memory()) for t in host_v]
        dev_k, dev_v, table = [t.to(device) for t in dev_k], [t.to(device) for t in dev_v], table.to(device)
    resident = ResidentSet(num_layers, num_rows, HKV, num_slots, KB, device, impl=kernels)
    rows_t = torch.tensor(rows, device=device)
    resident.admit(rows_t, pages.to(device))
    tele = OffloadTelemetry(num_layers, BS * HKV * D * 4 * 2 // HKV, device)
    eng = engine(resident, lane(num_layers), tele, host_k, host_v, dev_k, dev_v, table, BS, gather_fn=gather_fn)
    return dict(eng=eng, rows=rows_t, seq_lens=torch.tensor(lens, device=device), nblk=nblk, table=table, g=g,
                tele=tele)


def _attend_both(w, layer, q, positions, token_slots):
    """A random fine selection of KT of the candidates; attention over the resident copies and over the host
    store's own slots of the same positions."""
    eng, g = w["eng"], w["g"]
    score = torch.rand(positions.shape, generator=g).to(positions.device).masked_fill(positions < 0, -1.0)
    pick = torch.topk(score, KT, dim=2).indices
    pos = torch.gather(positions, 2, pick)
    mine = torch.where(pos >= 0, torch.gather(token_slots, 2, pick), -1).to(torch.int32)
    r = w["rows"].long()[:, None, None]
    truth = (w["table"][r, pos.clamp(min=0) // BS].long() * BS + pos.clamp(min=0) % BS)
    truth = torch.where(pos >= 0, truth, -1).to(torch.int32)
    got = R.sparse_decode(q, eng.dev_k[layer], eng.dev_v[layer], mine, D ** -0.5)
    want = R.sparse_decode(q, eng.host_k[layer], eng.host_v[layer], truth, D ** -0.5)
    return got, want


def _run(w, num_steps, keep=0.7, seed=1):
    """Prime M_0, then num_steps decode steps over every layer; returns [(got, want)] and the walk."""
    eng, layers = w["eng"], range(len(w["eng"].dev_k))
    sel = walk(num_steps + 1, w["nblk"], HKV, KB, keep=keep, seed=seed, revisit=0.5, device=w["rows"].device)
    for layer in layers:
        eng.prefetch(layer, w["rows"], sel[0])
    eng.end_step()
    pairs = []
    for t in range(1, num_steps + 1):
        q = torch.randn(len(w["rows"]), HQ, D, generator=w["g"]).to(w["rows"].device)
        for layer in layers:
            box = {}

            def attend(positions, token_slots, layer=layer):
                box["o"] = _attend_both(w, layer, q, positions, token_slots)
                return box["o"][0]

            eng.step(layer, w["rows"], w["seq_lens"], sel[t], attend)
            pairs.append(box["o"])
        eng.end_step()
    return pairs, sel


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("lane", [InlineLane, DeferredLane])
@pytest.mark.parametrize("num_slots", [KB, 2 * KB])
def test_lagged_attention_over_resident_copies_equals_attention_over_the_full_kv(impl, lane, num_slots):
    # Triton takes CUDA tensors only: with a GPU the kernels read pinned host stores through CUDA views
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    w = _world(num_slots, impl=impl, lane=lane, device=device)
    pairs, _ = _run(w, num_steps=10 if impl == "reference" else 5)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broken", ["skipped_wait", "update_first"])
def test_the_simulation_catches_stale_reads(broken):
    kw = dict(lane=SkippedWaitLane) if broken == "skipped_wait" else dict(engine=UpdateFirstEngine)
    w = _world(KB, **kw)
    pairs, _ = _run(w, num_steps=6, keep=0.5)
    assert any(not torch.allclose(g, t, rtol=1e-5, atol=1e-6) for g, t in pairs)


def _overlap_ratio(sel):
    inter = total = 0
    prev = torch.full_like(sel[0], -1)
    for s in sel:
        for b in range(s.shape[0]):
            for h in range(s.shape[1]):
                cur = set(s[b, h][s[b, h] >= 0].tolist())
                inter += len(cur & set(prev[b, h][prev[b, h] >= 0].tolist()))
                total += len(cur)
        prev = s
    return inter / total


def test_telemetry_counts_overlap_copies_and_stall():
    w = _world(64, lane=InlineLane)  # room for every block: each is copied exactly once
    _, sel = _run(w, num_steps=8)
    s = w["tele"].summary()
    distinct = len({(b, h, int(x)) for m in sel for b, h, x in
                    ((b, h, x) for b in range(m.shape[0]) for h in range(HKV) for x in m[b, h] if x >= 0)})
    assert s["blocks_copied"] == 2 * distinct  # two layers
    assert s["bytes_copied"] == s["blocks_copied"] * BS * D * 4 * 2
    assert s["overlap_ratio"] == pytest.approx(_overlap_ratio(sel))
    assert s["stall_ms"] == 0 and all(lay["steps"] == 9 for lay in s["layers"])
    w = _world(KB, lane=DeferredLane)
    _run(w, num_steps=3)
    # layer 0's wait runs every queued copy (one lane, in order): layer 0 stalls, layer 1's copy is there in time
    layers = w["tele"].summary()["layers"]
    assert layers[0]["stall_ms"] > 0 and layers[1]["stall_ms"] == 0


def test_release_mid_copy_frees_the_row_and_leaves_the_others_exact():
    w = _world(KB + 2, lane=DeferredLane)
    _run(w, num_steps=3)
    eng, rows = w["eng"], w["rows"]
    eng.prefetch(0, rows, walk(1, w["nblk"], HKV, KB, keep=0.5, seed=9)[0])  # a copy in flight
    pages = eng.release(rows[:1])
    assert not eng.lane.queue  # the release waited for the copy
    assert pages.shape == (1, KB + 2) and bool((pages >= 0).all())
    assert bool((eng.resident.tags[:, 3] == -1).all()) and bool((eng.resident.cache_pages[3] == -1).all())
    eng.resident.admit(rows[:1], pages)  # the row serves a new request (same pages back, nothing resident)
    pairs, _ = _run(w, num_steps=4, seed=5)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_on_the_gpu_with_pinned_host_stores_and_a_side_stream():
    w = _world(KB + 2, impl="triton", lane=CudaLane, device="cuda")
    pairs, _ = _run(w, num_steps=12, keep=0.5)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    s = w["tele"].summary()
    assert s["blocks_copied"] > 0 and s["stall_ms"] >= 0


@pytest.mark.gpu
def test_steps_never_sync_the_host_and_an_update_with_its_copy_captures_in_a_cuda_graph():
    """The step must run inside a captured decode graph: any host sync (.item(), nonzero, bool(t), an event or
    stream synchronize) raises under sync debug mode "error", and a CUDA-graph capture refuses it too."""
    w = _world(KB + 2, impl="triton", lane=CudaLane, device="cuda")
    _run(w, num_steps=2)  # compiles the kernels outside the checked region
    eng, rows, lens = w["eng"], w["rows"], w["seq_lens"]
    # inputs made beforehand: a pageable host -> device copy syncs too, and is the test's, not the engine's
    sel = walk(4, w["nblk"], HKV, KB, keep=0.5, seed=4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(4):
            for layer in range(len(eng.dev_k)):
                eng.step(layer, rows, lens, sel[t], lambda positions, token_slots: token_slots.sum())
            eng.end_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    w = _world(KB + 2, impl="triton", lane=InlineLane, device="cuda")
    eng, rows = w["eng"], w["rows"]
    sel = walk(3, w["nblk"], HKV, KB, keep=0.5, seed=2, device="cuda")
    eng.prefetch(0, rows, sel[0])  # warm-up: compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eng.prefetch(0, rows, sel[1])
    graph.replay()
    torch.cuda.synchronize()
    r = rows.long()
    held = torch.gather(eng.resident.tags[0][r], 2, eng.resident.prev_slots[0][r].long().clamp(min=0))
    assert torch.equal(torch.where(sel[1] >= 0, held, -1), sel[1])  # the replayed update made M_1 resident



LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


@pytest.mark.gpu
def test_a_layer_step_is_three_kernel_launches():
    """candidates, update (+ slots, copy list, telemetry), gather (+ stamp): nothing else is launched per layer;
    the step counter's increment is the one launch of end_step."""
    w = _world(KB + 2, impl="triton", lane=CudaLane, device="cuda")
    _run(w, num_steps=2)  # compiles
    eng, rows, lens = w["eng"], w["rows"], w["seq_lens"]
    sel = walk(1, w["nblk"], HKV, KB, keep=0.5, seed=7, device="cuda")[0]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for layer in range(len(eng.dev_k)):
            eng.step(layer, rows, lens, sel, lambda positions, token_slots: None)
        eng.end_step()
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.key in LAUNCH_CALLS)
    assert launches == 3 * len(eng.dev_k) + 1, launches


@pytest.mark.gpu
def test_a_whole_step_captured_in_a_cuda_graph_reads_no_stale_copy():
    """CudaLane(capture=True): one decode step (every layer: candidates, wait, attention, update, gather on the
    side stream, joined at end_step) captured once and replayed over a random walk; inside the graph the attention
    over the resident copies equals the attention over the same positions read from the host store."""
    from sglang_asynctls.kernels.sparse_decode import sparse_decode

    w = _world(KB + 2, impl="triton", lane=lambda n: CudaLane(n, capture=True), device="cuda")
    eng, rows, lens, table = w["eng"], w["rows"], w["seq_lens"], w["table"]
    layers = range(len(eng.dev_k))
    sel = walk(14, w["nblk"], HKV, KB, keep=0.6, seed=3, revisit=0.5, device="cuda")
    sel_buf = sel[1].clone()
    q = torch.randn(len(rows), HQ, D, device="cuda")
    got = [torch.zeros(len(rows), HQ, D, device="cuda") for _ in layers]
    want = [torch.zeros_like(g) for g in got]
    r = rows.long()[:, None, None]

    def attend(layer, positions, token_slots):
        truth = table[r, positions.clamp(min=0) // BS].long() * BS + positions.clamp(min=0) % BS
        truth = torch.where(positions >= 0, truth, -1).to(torch.int32)
        got[layer].copy_(sparse_decode(q, eng.dev_k[layer], eng.dev_v[layer], token_slots, D ** -0.5))
        want[layer].copy_(sparse_decode(q, eng.host_k[layer], eng.host_v[layer], truth, D ** -0.5))

    def step():
        for layer in layers:
            eng.step(layer, rows, lens, sel_buf, lambda p, s, layer=layer: attend(layer, p, s))
        eng.end_step()

    for layer in layers:
        eng.prefetch(layer, rows, sel[0])
    eng.end_step()
    step()  # eager warm-up (compiles); the lane ends joined
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t in range(2, len(sel)):
        sel_buf.copy_(sel[t])
        graph.replay()
        torch.cuda.synchronize()
        for g, t_ in zip(got, want):
            torch.testing.assert_close(g, t_, rtol=1e-5, atol=1e-5)
    s = w["tele"].summary()
    assert s["blocks_copied"] > 0 and all(lay["steps"] == len(sel) for lay in s["layers"])
