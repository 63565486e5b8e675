"""Offload engine, op level (GPU): host -> GPU gather bandwidth, resident-set update latency, and a simulated
decode over a selection trace giving the stall share. Qwen3-8B attention shape (8 KV heads, d 128, bf16), block 64.

    python3 benchmarks/offload_engine.py            # H100: results/offload_engine_h100.{json,png}, < 3 min
    python3 benchmarks/offload_engine.py --dry-run  # CPU, tiny shapes: checks the logic; its times mean nothing

- gather: k head-blocks (32 KiB each: 64 tokens x 128 dims x K+V x bf16) per launch from pinned host memory
  (read in place through `device_view`), beside one `copy_` per whole block (all heads, K and V: the same bytes)
  and one bulk contiguous copy of the same bytes (the PCIe roofline, 55 GB/s measured, shared/MEASUREMENTS.md).
- update: the Triton resident-set update beside its torch reference, batch x r (R = r x k_b), CUDA-graph replays;
  and the engine's fused `layer_update` (update + M_t's slots + copy list in pages + telemetry, one launch).
  The kernel's work does not depend on the hit count, so replaying one selection measures it.
- update_device_us (GPU): the update's and the fused update's own device time (profiler, CUDA activity), alone.
  Their graph-replay times (update_us) are floored by the host's launch latency on a VM (~15-20 us seen).
- kernel times (GPU): each engine kernel's device time inside eager layer steps (profiler, CUDA activity), at
  batch 1/8/32 x r, with the copies running beside them as in decode.
- layer_step: the engine's own cost per layer step (engine.step with an empty attention and no rest of layer:
  candidates, wait, update, gather on the side stream), eager (wall time per step, host issue included) and as
  a whole decode step (all layers) captured in one CUDA graph (replays; the copy lane is joined at the end of the
  step, so the last layers' copies are inside the time), and the kernel launches per layer step (profiler count of
  launch calls in one eager step, the step counter's increment included; GPU only).
- decode: L layers x T steps of engine.step (wait, attention over Kt of M_{t-1}'s resident tokens, update, gather
  on the side stream) plus a stand-in for the rest of the layer (the MLP's weight read at batch <= 8), eager, beside
  the same loop with everything resident. The layers share one host store (they only read it: the copy cost is the
  same, the pinned memory is not multiplied by L). The trace is a synthetic random walk fitted to SmolLM2's
  measured locality (overlap 0.86; LRU hit 0.975 at r = 2) unless --trace names a recorded one
  ([T, L, B, Hkv, Kb] int32, torch.save; e.g. benchmarks/offload_locality.py --trace, SmolLM2's real selections,
  whose layers, KV heads and k_b then set the decode rows' shape: `fit_shape_to_trace`). The trace pads each layer
  to its widest one's k_b; each layer's resident set is R_l = r x its own k_b (`ResidentSet.limit_slots`). Before
  that fix one R = r x the widest k_b (192) served every layer, held all 129 blocks of SmolLM2's 8k trace at r = 1
  and 2, and copied the same at both (results/offload_engine_smollm2_trace_h100.json predates the fix).

  overhead = step_us / resident_step_us - 1 (0 = offload is free; 11.4 = the step takes 12.4x as long).
  resident_step_us is the same loop without the engine: per layer, the same slicing of Kt slots, the same attention
  kernel over that layer's own KV buffer and the rest-of-layer stand-in; no wait, candidates, update, copy or
  telemetry. Both loops are eager (no CUDA graph), so the overhead includes the host's launch cost of the engine's
  ops; host_us_per_step is the time the host takes to issue one offloaded step (no sync at its end): when it is
  close to step_us the step is host-bound, and graph capture, not the kernels, is what removes that part.
  The decode loop is also run as one captured CUDA graph per step (step_us_graph, beside resident_step_us_graph:
  the resident loop captured the same way); each replay is preceded by one copy of that step's selections into
  the graph's input buffer (in the time).
  --profile writes a torch.profiler table of two b1 steps (<name>_profile.txt) to show where a step goes.

First H100 run (before the resident-update rewrite): gather 49 GB/s (0.91 of a bulk copy), update 72-600 us,
decode overhead 11-16x with no measured stall. Second (bitwise top-k update): update 59 / 76 / 345 us at b1 r1 /
b8 r1 / b32 r2, decode host-bound (~50 ops a layer step). Third (offload_engine_h100.json; this version: three
launches a layer step, counting-rank update): update 5.7-13.2 us device time, engine step 17 us a layer in a graph
at r = 2, decode 1.17x all-resident in a graph at r = 2 (docs/offload.md).
"""

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_asynctls import reference as R  # noqa: E402
from sglang_asynctls.offload import reference as OR  # noqa: E402
from sglang_asynctls.offload.engine import OffloadEngine  # noqa: E402
from sglang_asynctls.offload.host_view import device_view  # noqa: E402
from sglang_asynctls.offload.lane import CudaLane, InlineLane  # noqa: E402
from sglang_asynctls.offload.resident_set import ResidentSet  # noqa: E402
from sglang_asynctls.offload.telemetry import OffloadTelemetry  # noqa: E402
from sglang_asynctls.offload.trace import random_walk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Shape:
    hq: int = 32
    hkv: int = 8
    d: int = 128
    bs: int = 64
    kb: int = 128
    kt: int = 1024
    hidden: int = 4096  # the rest-of-layer stand-in reads a [3 * mlp, hidden] weight (Qwen3-8B's MLP)
    mlp: int = 12288
    layers: int = 8
    steps: int = 24
    context: int = 98304
    batches: tuple = (1, 4)
    ratios: tuple = (1, 2)
    gather_counts: tuple = (8, 64, 256, 1024, 4096)
    update_batches: tuple = (1, 8, 32)
    keep: float = 0.86
    revisit: float = 0.85  # with keep 0.86: LRU hit rate 0.83 at r = 1, 0.97 at r = 2 (measured: 0.86, 0.975)
    dtype: str = "bfloat16"
    layer_kb: tuple = ()  # a trace's own k_b per layer (fit_shape_to_trace): R_l = r x layer_kb[l]


DRY = Shape(hq=4, hkv=2, d=16, bs=8, kb=8, kt=32, hidden=64, mlp=64, layers=2, steps=3, context=512, batches=(2,),
            gather_counts=(4, 16), update_batches=(2,), dtype="float32")


class Timing:
    """Median/min/max µs of fn: CUDA events on the GPU (graph=True: replays of a captured graph), perf_counter on
    the CPU."""

    def __init__(self, cuda: bool, iters: int, warmup: int):
        self.cuda, self.iters, self.warmup = cuda, iters, warmup

    def __call__(self, fn, graph: bool = False):
        run = self._capture(fn) if graph and self.cuda else fn
        for _ in range(self.warmup):
            run()
        times = []
        for _ in range(self.iters):
            times.append(self._once(run))
        times.sort()
        return dict(median_us=times[len(times) // 2], min_us=times[0], max_us=times[-1], iters=self.iters)

    def _once(self, run) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            run()
            return (time.perf_counter() - t0) * 1e6
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) * 1e3

    def total(self, fn) -> float:
        """Wall µs of one call of fn, its device work included."""
        return self.host_and_total(fn)[1]

    def host_and_total(self, fn):
        """(µs until fn returns, µs until its device work is done): the first is the host's issue time."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if self.cuda:
            torch.cuda.synchronize()
        return (t1 - t0) * 1e6, (time.perf_counter() - t0) * 1e6

    @staticmethod
    def _capture(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay


def _device_us(fn, name: str, calls: int = 30):
    """Mean device time (µs) of the kernels whose name contains `name`, over `calls` eager calls of fn (profiler,
    CUDA activity: the kernels' own durations, without launch latency)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if name in e.key]
    total = sum(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) for e in ev)
    return total / max(sum(e.count for e in ev), 1) if ev else None


def _impls(cuda: bool):
    """(update, gather, attention, layer_update) on this device: the Triton kernels on the GPU, the references on
    the CPU."""
    if cuda:
        from sglang_asynctls.kernels.gather_blocks import gather_blocks
        from sglang_asynctls.kernels.resident_update import layer_update, resident_update
        from sglang_asynctls.kernels.sparse_decode import sparse_decode

        return resident_update, gather_blocks, sparse_decode, layer_update
    return OR.resident_update, OR.gather_blocks, R.sparse_decode, OR.layer_update


def host_store(num_pages: int, sh: Shape, cuda: bool):
    """Host K and V [num_pages * BS, Hkv, D]: pinned on the GPU machine, with the views kernels read through."""
    dt = getattr(torch, sh.dtype)
    # constant contents: copy speed does not depend on them, and randn over GBs of host memory takes seconds
    k = torch.empty(num_pages * sh.bs, sh.hkv, sh.d, dtype=dt, pin_memory=cuda).fill_(0.5)
    v = torch.empty_like(k, pin_memory=cuda).fill_(-0.5)
    return (k, v), ((device_view(k), device_view(v)) if cuda else (k, v))


# ---------------------------------------------------------------------------------------------- gather


def bench_gather(sh: Shape, timing: Timing, dev: str):
    cuda = dev == "cuda"
    _, gather, _, _ = _impls(cuda)
    most = max(sh.gather_counts) // sh.hkv
    (hk, hv), (sk, sv) = host_store(4 * most, sh, cuda)
    dk = torch.empty(most * sh.bs, sh.hkv, sh.d, dtype=hk.dtype, device=dev)
    dv = torch.empty_like(dk)
    block_bytes = sh.bs * sh.d * 2 * hk.element_size()  # one KV head's K and V of one block
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in sh.gather_counts:
        kb = k // sh.hkv
        src = torch.randperm(4 * most, generator=g)[:kb].int().expand(1, sh.hkv, kb).contiguous().to(dev)
        dst = torch.stack([torch.randperm(most, generator=g)[:kb] for _ in range(sh.hkv)])[None].int().to(dev)
        nbytes = k * block_bytes
        t = timing(lambda: gather(sk, sv, dk, dv, src, dst, sh.bs))
        rows.append(dict(kind="gather_triton", head_blocks=k, bytes=nbytes, **t,
                         gb_per_s=nbytes / t["median_us"] / 1e3))
        pairs = list(zip(src[0, 0].tolist(), dst[0, 0].tolist()))  # whole blocks: all heads, the same bytes

        def per_block():
            for s, d in pairs:
                dk[d * sh.bs:(d + 1) * sh.bs].copy_(hk[s * sh.bs:(s + 1) * sh.bs], non_blocking=True)
                dv[d * sh.bs:(d + 1) * sh.bs].copy_(hv[s * sh.bs:(s + 1) * sh.bs], non_blocking=True)

        t = timing(per_block)
        rows.append(dict(kind="copy_per_block", head_blocks=k, bytes=nbytes, **t,
                         gb_per_s=nbytes / t["median_us"] / 1e3))
        n = kb * sh.bs
        t = timing(lambda: (dk[:n].copy_(hk[:n], non_blocking=True), dv[:n].copy_(hv[:n], non_blocking=True)))
        rows.append(dict(kind="bulk_copy", head_blocks=k, bytes=nbytes, **t, gb_per_s=nbytes / t["median_us"] / 1e3))
    return rows

# ---------------------------------------------------------------------------------------------- update


def bench_update(sh: Shape, timing: Timing, dev: str):
    cuda = dev == "cuda"
    update, _, _, layer_update = _impls(cuda)
    nblk = sh.context // sh.bs
    rows = []
    i32 = dict(dtype=torch.int32, device=dev)
    for b in sh.update_batches:
        sel = random_walk(2, [nblk] * b, sh.hkv, sh.kb, keep=sh.keep, seed=b, revisit=sh.revisit, device=dev)
        ids = torch.arange(b, device=dev)
        for r in sh.ratios:
            slots = r * sh.kb
            runs = [("triton" if cuda else "reference", "update", update),
                    ("torch_reference", "update", OR.resident_update),
                    ("triton" if cuda else "reference", "layer_update", layer_update)]
            for name, kind, fn in runs:
                tags = torch.full((b, sh.hkv, slots), -1, **i32)
                lu, prev = torch.full_like(tags, -1), torch.full((b, sh.hkv, sh.kb), -1, **i32)
                step = torch.zeros(1, **i32)
                OR.resident_update(tags, lu, prev, ids, sel[0], step)  # M_0 resident: sel[1] hits ~keep of it
                step += 1
                if kind == "update":
                    args = (tags, lu, prev, ids, sel[1], step)
                else:
                    pages = torch.arange(b * slots, **i32).view(b, slots)
                    table = torch.arange(b * nblk, **i32).view(b, nblk)
                    tele = (torch.zeros(5, dtype=torch.int64, device=dev), torch.zeros(2, dtype=torch.int64,
                                                                                       device=dev))
                    args = (tags, lu, prev, torch.full_like(prev, -1), ids, sel[1], step, pages, table, *tele, True)
                t = timing(lambda: fn(*args), graph=True)
                dev_us = _device_us(lambda: fn(*args), "resident_update") if cuda and name == "triton" else None
                rows.append(dict(kind=kind, impl=name, batch=b, r=r, slots=slots, device_us=dev_us, **t))
    return rows

# ---------------------------------------------------------------------------------------------- decode


def fit_shape_to_trace(sh: Shape, path: str) -> Shape:
    """A recorded trace (e.g. benchmarks/offload_locality.py --trace: SmolLM2, 30 layers, 3 KV heads) sets the
    layers, KV heads (the group size kept), k_b and the context its block ids need; head dim, block size and the
    rest stay the benchmark's (Qwen3-8B-shaped copies of the recorded selections)."""
    t = torch.load(path)  # [T, L, B, Hkv, Kb]
    steps, layers, _, hkv, kb = t.shape
    context = max(sh.bs * kb, sh.bs * (int(t.max()) + 1))
    # the trace pads every layer to its widest k_b with -1; each layer's own k_b sizes its resident set
    layer_kb = tuple(int(n) for n in (t >= 0).sum(-1).amax(dim=(0, 2, 3)))
    return replace(sh, layers=layers, hkv=hkv, hq=hkv * (sh.hq // sh.hkv), kb=kb, kt=min(sh.kt, kb * sh.bs),
                   context=context, steps=min(sh.steps, steps - 3), layer_kb=layer_kb)


def _trace(sh: Shape, batch: int, dev: str, path: str):
    """[layer][step] -> [B, Hkv, Kb] selections (a recorded trace of one request serves every row of the batch)."""
    if path:
        t = torch.load(path)  # [T, L, B, Hkv, Kb]
        rows = lambda x: x.expand(batch, -1, -1) if x.shape[0] == 1 else x[:batch]  # noqa: E731
        return [[rows(t[s, layer]).to(dev).int().contiguous() for s in range(t.shape[0])]
                for layer in range(t.shape[1])], path
    nblk = sh.context // sh.bs
    return [random_walk(sh.steps + 3, [nblk] * batch, sh.hkv, sh.kb, keep=sh.keep, seed=layer, revisit=sh.revisit,
                        device=dev) for layer in range(sh.layers)], f"synthetic random walk, keep {sh.keep}, " \
        f"revisit {sh.revisit}"


def _decode_world(sh: Shape, batch: int, r: int, store, dev: str, capture: bool = False):
    cuda = dev == "cuda"
    _, gather, _, _ = _impls(cuda)
    nblk = sh.context // sh.bs
    slots = r * sh.kb
    dt = getattr(torch, sh.dtype)
    dev_k = [torch.zeros(batch * slots * sh.bs, sh.hkv, sh.d, dtype=dt, device=dev) for _ in range(sh.layers)]
    dev_v = [torch.zeros_like(t) for t in dev_k]
    rs = ResidentSet(sh.layers, batch, sh.hkv, slots, sh.kb, dev, impl="triton" if cuda else "reference")
    if sh.layer_kb:  # R_l = r x the layer's own k_b (a layer of the trace may select fewer than sh.kb blocks)
        rs.limit_slots([r * max(1, k) for k in sh.layer_kb])
    ids = torch.arange(batch, device=dev)
    rs.admit(ids, torch.arange(batch * slots, device=dev).view(batch, slots))
    table = torch.arange(batch * nblk, dtype=torch.int32, device=dev).view(batch, nblk)
    tele = OffloadTelemetry(sh.layers, sh.bs * sh.d * 2 * dev_k[0].element_size(), dev)
    lane = CudaLane(sh.layers, capture=capture) if cuda else InlineLane(sh.layers)
    sk, sv = store
    return OffloadEngine(rs, lane, tele, [sk] * sh.layers, [sv] * sh.layers, dev_k, dev_v, table, sh.bs,
                         gather_fn=gather), ids


def _layer_rest(sh: Shape, batch: int, dev: str):
    """The rest of a decoder layer at small batch: one read of the MLP weights (memory-bound GEMM)."""
    dt = getattr(torch, sh.dtype)
    w = torch.randn(3 * sh.mlp, sh.hidden, dtype=dt, device=dev)
    x = torch.randn(batch, sh.hidden, dtype=dt, device=dev)
    return lambda: x @ w.t()


def _run_steps(sh, engine, ids, lens, trace, q, attn, rest, first, count):
    """Decode steps first .. first + count - 1 over every layer."""
    for t in range(first, first + count):
        for layer in range(sh.layers):
            kv = (engine.dev_k[layer], engine.dev_v[layer])
            engine.step(layer, ids, lens, trace[layer][t],
                        lambda pos, slots, kv=kv: attn(q, *kv, slots[:, :, :sh.kt].contiguous(), sh.d ** -0.5))
            rest()
        engine.end_step()


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _one_step(sh, engine, ids, lens, sels, attend, rest):
    """One decode step over every layer: sels[layer] = M_t [B, Hkv, Kb]; attend(layer, positions, slots)."""
    for layer in range(sh.layers):
        engine.step(layer, ids, lens, sels[layer], lambda pos, slots, layer=layer: attend(layer, pos, slots))
        if rest is not None:
            rest()
    engine.end_step()


def _graph_us(timing: Timing, step, sel_buf, sel_all, first: int, count: int) -> float:
    """µs per step of `step` captured once as a CUDA graph and replayed for steps first .. first + count - 1, each
    replay after one copy of that step's selections sel_all[t] [L, B, Hkv, Kb] into the graph's input sel_buf."""
    for t in (first - 2, first - 1):  # eager warm-up on the same buffers (compiles; the lane ends joined)
        sel_buf.copy_(sel_all[t])
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay():
        for t in range(first, first + count):
            sel_buf.copy_(sel_all[t])
            graph.replay()

    replay()  # warm-up replays
    return timing.total(replay) / count


def _count_launches(fn) -> int:
    """Kernel launch calls that fn issues (torch.profiler, host side; CUDA only)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key in LAUNCH_CALLS)


def bench_layer_step(sh: Shape, timing: Timing, dev: str):
    """The engine's own cost per layer step (empty attention, no rest of layer): eager wall time per step over L,
    the whole step captured in one graph over L, and kernel launches per layer step (GPU)."""
    cuda = dev == "cuda"
    rows = []
    for batch in sh.batches:
        trace, _ = _trace(sh, batch, dev, "")
        sel_all = torch.stack([torch.stack([trace[layer][t] for layer in range(sh.layers)])
                               for t in range(len(trace[0]))])  # [T, L, B, Hkv, Kb]
        _, store = host_store(batch * (sh.context // sh.bs), sh, cuda)
        lens = torch.full((batch,), sh.context, device=dev)
        steps = min(sh.steps, len(trace[0]) - 3)
        for r in sh.ratios:
            row = dict(kind="layer_step", batch=batch, r=r, layers=sh.layers, steps=steps)
            for capture in ((False, True) if cuda else (False,)):
                engine, ids = _decode_world(sh, batch, r, store, dev, capture=capture)
                for layer in range(sh.layers):
                    engine.prefetch(layer, ids, sel_all[0, layer])
                engine.end_step()
                sel_buf = sel_all[1].clone()

                def step():
                    _one_step(sh, engine, ids, lens, sel_buf, lambda layer, pos, slots: slots, None)

                if capture:
                    row["graph_us_per_layer"] = _graph_us(timing, step, sel_buf, sel_all, 3, steps) / sh.layers
                    continue

                def eager():
                    for t in range(3, 3 + steps):
                        sel_buf.copy_(sel_all[t])
                        step()

                for t in (1, 2):
                    sel_buf.copy_(sel_all[t])
                    step()
                host, total = timing.host_and_total(eager)
                row["eager_us_per_layer"] = total / steps / sh.layers
                row["eager_host_us_per_layer"] = host / steps / sh.layers
                if cuda:
                    n = _count_launches(step)
                    row["launches_per_step"] = n
                    row["launches_per_layer_step"] = n / sh.layers  # the step counter's += 1 shared by the layers
                else:
                    row["launches_per_step"] = row["launches_per_layer_step"] = None  # no kernels on the CPU
                engine.lane.synchronize()
            row.setdefault("graph_us_per_layer", None)
            rows.append(row)
    return rows


ENGINE_KERNELS = ("_resident_candidates_kernel", "_resident_update_kernel", "_gather_blocks_kernel")


def bench_kernel_times(sh: Shape, timing: Timing, dev: str):
    """GPU only. Device time of each engine kernel inside eager layer steps (torch.profiler, CUDA activity: the
    kernel's own duration, without launch gaps), at every batch of `update_batches` x r. The copies run beside
    the other two kernels there, as in decode: large copies slow them (see docs/offload.md)."""
    if dev != "cuda":
        return []
    rows = []
    for batch in sh.update_batches:
        trace, _ = _trace(sh, batch, dev, "")
        _, store = host_store(batch * (sh.context // sh.bs), sh, True)
        lens = torch.full((batch,), sh.context, device=dev)
        for r in sh.ratios:
            engine, ids = _decode_world(sh, batch, r, store, dev)
            for layer in range(sh.layers):
                engine.prefetch(layer, ids, trace[layer][0])
            engine.end_step()

            def steps(first, count):
                for t in range(first, first + count):
                    _one_step(sh, engine, ids, lens, [trace[layer][t] for layer in range(sh.layers)],
                              lambda layer, pos, slots: slots, None)

            steps(1, 2)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                steps(3, 3)
                torch.cuda.synchronize()
            for e in prof.key_averages():
                name = next((k for k in ENGINE_KERNELS if k in e.key), None)
                if name:
                    dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                    rows.append(dict(kind="kernel_time", kernel=name, batch=batch, r=r, calls=e.count,
                                     device_us=dev_us / max(e.count, 1)))
            engine.lane.synchronize()
            del engine
    return rows


def bench_decode(sh: Shape, timing: Timing, dev: str, trace_path: str):
    cuda = dev == "cuda"
    _, _, attn, _ = _impls(cuda)
    rows, sources = [], set()
    for batch in sh.batches:
        trace, source = _trace(sh, batch, dev, trace_path)
        sources.add(source)
        _, store = host_store(batch * (sh.context // sh.bs), sh, cuda)
        lens = torch.full((batch,), sh.context, device=dev)
        q = torch.randn(batch, sh.hq, sh.d, device=dev).to(getattr(torch, sh.dtype))
        rest = _layer_rest(sh, batch, dev)
        for r in sh.ratios:
            engine, ids = _decode_world(sh, batch, r, store, dev)
            for layer in range(sh.layers):
                engine.prefetch(layer, ids, trace[layer][0])
            engine.end_step()
            _run_steps(sh, engine, ids, lens, trace, q, attn, rest, 1, 2)  # warm-up (compiles, fills)
            engine.telemetry.reset()
            steps = min(sh.steps, len(trace[0]) - 3)
            host, t = timing.host_and_total(lambda: _run_steps(sh, engine, ids, lens, trace, q, attn, rest, 3,
                                                                 steps))
            s = engine.telemetry.summary()
            step_us = t / steps
            rows.append(dict(kind="decode", batch=batch, r=r, layers=sh.layers, steps=steps, step_us=step_us,
                             host_us_per_step=host / steps,
                             stall_us_per_step=s["stall_ms"] * 1e3 / steps,
                             stall_share=s["stall_ms"] * 1e3 / steps / step_us,
                             mb_copied_per_step=s["bytes_copied"] / steps / 1e6, overlap_ratio=s["overlap_ratio"],
                             blocks_copied_per_step=s["blocks_copied"] / steps))
            # the same steps with every selected block already resident: slicing, attention and rest only
            cands = [engine.resident.candidates(layer, ids, lens, sh.bs)[1] for layer in range(sh.layers)]
            kvs = list(zip(engine.dev_k, engine.dev_v))

            def resident_only():
                for _ in range(steps):
                    for slots, kv in zip(cands, kvs):
                        attn(q, *kv, slots[:, :, :sh.kt].contiguous(), sh.d ** -0.5)
                        rest()

            resident_only()  # warm-up
            rows[-1]["resident_step_us"] = timing.total(resident_only) / steps
            rows[-1]["overhead"] = step_us / rows[-1]["resident_step_us"] - 1
            engine.lane.synchronize()
            rows[-1].update(_decode_graph(sh, timing, batch, r, store, trace, lens, q, attn, rest, cands, steps)
                            if cuda else dict(step_us_graph=None, resident_step_us_graph=None, overhead_graph=None))
    return rows, sorted(sources)


def _decode_graph(sh, timing, batch, r, store, trace, lens, q, attn, rest, cands, steps):
    """The decode loop and the resident loop, each step captured as one CUDA graph (GPU)."""
    engine, ids = _decode_world(sh, batch, r, store, "cuda", capture=True)
    sel_all = torch.stack([torch.stack([trace[layer][t] for layer in range(sh.layers)])
                           for t in range(len(trace[0]))])
    for layer in range(sh.layers):
        engine.prefetch(layer, ids, sel_all[0, layer])
    engine.end_step()
    sel_buf = sel_all[1].clone()
    kvs = list(zip(engine.dev_k, engine.dev_v))

    def attend(layer, pos, slots):
        return attn(q, *kvs[layer], slots[:, :, :sh.kt].contiguous(), sh.d ** -0.5)

    step_us = _graph_us(timing, lambda: _one_step(sh, engine, ids, lens, sel_buf, attend, rest), sel_buf, sel_all,
                        3, steps)
    engine.lane.synchronize()

    def resident_step():
        for slots, kv in zip(cands, kvs):
            attn(q, *kv, slots[:, :, :sh.kt].contiguous(), sh.d ** -0.5)
            rest()

    resident_us = _graph_us(timing, resident_step, sel_buf, sel_all, 3, steps)
    return dict(step_us_graph=step_us, resident_step_us_graph=resident_us, overhead_graph=step_us / resident_us - 1)


def profile_decode(sh: Shape, dev: str, path: str):
    """torch.profiler table (sorted by host time) of two offloaded steps at batch 1, r = 1, into `path`."""
    trace, _ = _trace(sh, 1, dev, "")
    _, store = host_store(sh.context // sh.bs, sh, dev == "cuda")
    engine, ids = _decode_world(sh, 1, 1, store, dev)
    lens = torch.full((1,), sh.context, device=dev)
    q = torch.randn(1, sh.hq, sh.d, device=dev).to(getattr(torch, sh.dtype))
    run = (sh, engine, ids, lens, trace, q, _impls(dev == "cuda")[2], _layer_rest(sh, 1, dev))
    _run_steps(*run, 0, 3)  # warm-up
    with torch.profiler.profile() as prof:
        _run_steps(*run, 3, 2)
        if dev == "cuda":
            torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


# ---------------------------------------------------------------------------------------------- report


def summarize(rows):
    out = {}
    gather = {(r["kind"], r["head_blocks"]): r for r in rows if "head_blocks" in r}
    most = max(k for _, k in gather)
    tri, per, bulk = (gather[(k, most)] for k in ("gather_triton", "copy_per_block", "bulk_copy"))
    out["gather"] = dict(head_blocks=most, triton_gb_per_s=tri["gb_per_s"], per_block_copy_gb_per_s=per["gb_per_s"],
                         bulk_copy_gb_per_s=bulk["gb_per_s"], triton_over_per_block=per["median_us"] / tri["median_us"],
                         triton_share_of_bulk=tri["gb_per_s"] / bulk["gb_per_s"])
    out["update_us"] = {f"b{r['batch']}_r{r['r']}_{r['impl']}": r["median_us"] for r in rows if r["kind"] == "update"}
    out["kernel_device_us"] = {f"b{r['batch']}_r{r['r']}_{r['kernel'].strip('_').replace('_kernel', '')}":
                               r["device_us"] for r in rows if r["kind"] == "kernel_time"}
    out["update_device_us"] = {f"b{r['batch']}_r{r['r']}_{r['kind']}": r["device_us"] for r in rows
                               if r["kind"] in ("update", "layer_update") and r.get("device_us") is not None}
    out["layer_update_us"] = {f"b{r['batch']}_r{r['r']}": r["median_us"] for r in rows
                              if r["kind"] == "layer_update"}
    out["layer_step"] = {f"b{r['batch']}_r{r['r']}": {k: r[k] for k in ("eager_us_per_layer", "eager_host_us_per_layer",
                                                                          "graph_us_per_layer",
                                                                          "launches_per_layer_step")}
                         for r in rows if r["kind"] == "layer_step"}
    out["decode"] = {f"b{r['batch']}_r{r['r']}": dict(stall_share=r["stall_share"], overhead=r["overhead"],
                                                      step_us=r["step_us"], host_us_per_step=r["host_us_per_step"],
                                                      resident_step_us=r["resident_step_us"],
                                                      step_us_graph=r["step_us_graph"],
                                                      resident_step_us_graph=r["resident_step_us_graph"],
                                                      overhead_graph=r["overhead_graph"],
                                                      mb_copied_per_step=r["mb_copied_per_step"],
                                                      overlap_ratio=r["overlap_ratio"])
                     for r in rows if r["kind"] == "decode"}
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for kind in ("gather_triton", "copy_per_block", "bulk_copy"):
        pts = sorted((r["head_blocks"], r["gb_per_s"]) for r in rows if r["kind"] == kind)
        ax[0].plot(*zip(*pts), marker="o", label=kind)
    ax[0].set(xscale="log", xlabel="32 KiB head-blocks per launch", ylabel="GB/s host -> GPU",
              title="gather from pinned host memory")
    ax[0].legend()
    upd = [r for r in rows if r["kind"] in ("update", "layer_update")]
    labels = [f"b{r['batch']} r{r['r']}\n{r['impl'] if r['kind'] == 'update' else 'fused'}" for r in upd]
    ax[1].bar(range(len(upd)), [r["median_us"] for r in upd], tick_label=labels)
    ax[1].set(ylabel="µs (median, graph replay)", title="resident-set update")
    ax[1].tick_params(axis="x", labelsize=7)
    dec = [r for r in rows if r["kind"] == "decode"]
    x = range(len(dec))
    ax[2].bar([i - 0.2 for i in x], [r["resident_step_us"] / 1e3 for r in dec], width=0.4, label="all resident")
    ax[2].bar([i + 0.2 for i in x], [r["step_us"] / 1e3 for r in dec], width=0.4, label="offload")
    for i, r in zip(x, dec):
        ax[2].annotate(f"stall {100 * r['stall_share']:.0f}%", (i + 0.2, r["step_us"] / 1e3), ha="center",
                       fontsize=8)
    ax[2].set_xticks(list(x), [f"b{r['batch']} r{r['r']}" for r in dec])
    ax[2].set(ylabel=f"ms per step ({dec[0]['layers']} layers)" if dec else "ms", title="simulated decode")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the logic, times mean nothing")
    p.add_argument("--out", default=None, help="default: benchmarks/results (a temp folder with --dry-run)")
    p.add_argument("--name", default="offload_engine_h100")
    p.add_argument("--trace", default="", help="recorded selections [T, L, B, Hkv, Kb] int32 (torch.save)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also write <name>_profile.txt (two b1 r1 steps)")
    a = p.parse_args()
    cuda = not a.dry_run
    if cuda and not torch.cuda.is_available():
        sys.exit("offload_engine: needs a GPU (--dry-run checks the logic on the CPU)")
    sh = DRY if a.dry_run else Shape()
    dev = "cuda" if cuda else "cpu"
    out = a.out or (os.path.join(HERE, "results") if cuda else os.path.join("/tmp", "offload_engine_dry"))
    os.makedirs(out, exist_ok=True)
    timing = Timing(cuda, a.iters if cuda else 2, a.warmup if cuda else 1)
    t0 = time.time()
    rows = bench_gather(sh, timing, dev) + bench_update(sh, timing, dev) + bench_layer_step(sh, timing, dev)
    rows += bench_kernel_times(sh, timing, dev)
    dsh = fit_shape_to_trace(sh, a.trace) if a.trace else sh  # the decode rows' shape
    decode, sources = bench_decode(dsh, timing, dev, a.trace)
    if a.profile:
        profile_decode(sh, dev, os.path.join(out, a.name + "_profile.txt"))
    rows += decode
    result = dict(benchmark="offload_engine", command=" ".join(["python3"] + sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  gpu=torch.cuda.get_device_name() if cuda else "none (dry run on CPU)", torch=torch.__version__,
                  triton=importlib.import_module("triton").__version__, sglang="not used (op level)",
                  config=dict(shape=asdict(sh), decode_shape=asdict(dsh), trace=sources, dry_run=a.dry_run,
                              iters=timing.iters,
                              timing="gather/update: CUDA events (update: graph replays); decode and layer_step: "
                              "wall time of eager steps with a device sync at both ends, and of graph replays "
                              "(one captured step each, after a copy of its selections); launches: profiler "
                              "count of kernel launch calls in one eager step; stall: device-clock stamps "
                              "max(0, copy landed - needed)"),
                  rows=rows, summary=summarize(rows), wall_s=round(time.time() - t0, 1))
    with open(os.path.join(out, a.name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(out, a.name + ".png"))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
