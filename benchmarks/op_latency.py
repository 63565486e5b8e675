"""Operator benchmark: one decode attention step per layer (dense / quest / token-only / asynctls), see
GPU only.

    python3 benchmarks/op_latency.py --out benchmarks/results            # full sweep
    python3 benchmarks/op_latency.py --contexts 98304 --batches 8 --token-budgets 1024  # headline shape + stages

Every step is captured in a CUDA graph (as SGLang decodes) and replayed; L2 is flushed before each timed replay
(a decode step of one layer follows 35 other layers' traffic). Times are CUDA-event medians of >= 20 replays.
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_asynctls import reference as R  # noqa: E402
from sglang_asynctls import decode_step as K  # noqa: E402
from sglang_asynctls.kernels.block_scores import block_scores  # noqa: E402
from sglang_asynctls import decode_step as FS  # noqa: E402
from sglang_asynctls.decode_step import fine_select_candidates  # noqa: E402
from sglang_asynctls.kernels.index_append import append_decode_index  # noqa: E402
from sglang_asynctls.kernels.quantize_labels import quantize_labels  # noqa: E402
from sglang_asynctls.kernels.select_blocks import select_blocks  # noqa: E402
from sglang_asynctls.kernels.select_tokens import select_token_slots, select_tokens  # noqa: E402
from sglang_asynctls.kernels.sparse_decode import sparse_decode  # noqa: E402
from sglang_asynctls.kernels.token_logits import token_logits  # noqa: E402
from sglang_asynctls.kernels.token_scores import candidate_scores  # noqa: E402

MODELS = {"gqa": dict(hq=32, hkv=8, d=128, dv=128, dc=32, mla=False),
          "mla": dict(hq=20, hkv=1, d=576, dv=512, dc=128, mla=True)}
BS, KB, SINK, WINDOW = 64, 128, 64, 128
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- SGLang's kernel

def load_sglang_decode():
    """SGLang 0.5.17's decode_attention module: the installed package, else the file staged from its wheel
    (.stage/sglang_decode, see docs/gpu_host.md) loaded with a stub for its one utility import."""
    try:
        return importlib.import_module("sglang.kernels.ops.attention.decode_attention"), "import"
    except Exception:  # noqa: BLE001 (missing deps on the GPU host: fall back to the staged file)
        pass
    stage = os.path.join(os.path.dirname(HERE), ".stage", "sglang_decode")
    for name in ("sglang", "sglang.srt", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.attention"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    utils = types.ModuleType("sglang.srt.utils")
    utils.is_hip = lambda: False
    sys.modules["sglang.srt.utils"] = utils
    mods = {}
    for short in ("score_mod", "decode_attention"):
        name = "sglang.kernels.ops.attention." + short
        spec = importlib.util.spec_from_file_location(name, os.path.join(stage, short + ".py"))
        mods[short] = importlib.util.module_from_spec(spec)
        sys.modules[name] = mods[short]
        spec.loader.exec_module(mods[short])
    return mods["decode_attention"], "staged file from the sglang-0.5.17 wheel"


class SGLangDecode:
    """decode_attention_fwd over compact per-(request, KV head) index lists: k_buffer [S, Hkv, D] viewed as
    [S * Hkv, 1, D], each (request, KV head) a request of G query heads, kv_indices = slot * Hkv + h."""

    def __init__(self, mod, q, k_buffer, v_buffer, slots, splits, mla, native=False):
        b, hq, d = q.shape
        hkv = k_buffer.shape[1]
        n = slots.shape[2]
        self.mod, self.mla, self.splits = mod, mla, splits
        dv = v_buffer.shape[2]
        if hkv == 1 or native:  # native: every KV head attends over the same slots (dense), SGLang's own layout
            self.q, self.k, self.v = q, k_buffer, v_buffer
            idx = slots[:, 0].reshape(-1)
            groups, heads = b, hq
        else:
            self.q = q.view(b * hkv, hq // hkv, d)
            self.k = k_buffer.view(-1, 1, d)
            self.v = v_buffer.view(-1, 1, dv)
            idx = (slots.long() * hkv + torch.arange(hkv, device=q.device)[None, :, None]).reshape(-1)
            groups, heads = b * hkv, hq // hkv
        self.kv_indices = idx.to(torch.int32)
        self.kv_indptr = torch.arange(groups + 1, device=q.device, dtype=torch.int32) * n
        self.num_kv_splits = torch.full((groups,), splits, dtype=torch.int32, device=q.device)
        self.attn_logits = torch.empty(groups, heads, splits, dv, dtype=torch.float32, device=q.device)
        self.attn_lse = torch.empty(groups, heads, splits, dtype=torch.float32, device=q.device)
        self.o = torch.empty(groups, heads, dv, dtype=q.dtype, device=q.device)
        self.sm_scale = d ** -0.5

    def __call__(self):
        self.mod.decode_attention_fwd(self.q, self.k, self.v, self.o, self.kv_indptr, self.kv_indices,
                                      self.attn_logits, self.attn_lse, self.num_kv_splits, self.splits,
                                      self.sm_scale, 1.0, 1.0, has_mla=self.mla)
        return self.o

# ---------------------------------------------------------------------------------------------- inputs


def make_case(model, ctx, batch, dev="cuda", seed=0):
    m = MODELS[model]
    g = torch.Generator(device=dev).manual_seed(seed)
    hkv, d, dv = m["hkv"], m["d"], m["dv"]
    slots_total = batch * ctx
    k = torch.randn(slots_total, hkv, d, generator=g, device=dev, dtype=torch.bfloat16)
    v = k[..., :dv] if m["mla"] else torch.randn(slots_total, hkv, dv, generator=g, device=dev,
                                                   dtype=torch.bfloat16)
    # a fragmented pool: 16-token chunks of all requests shuffled together
    chunks = torch.randperm(slots_total // 16, generator=g, device=dev)
    r2t = (chunks[:, None] * 16 + torch.arange(16, device=dev)).view(batch, ctx).to(torch.int32)
    rows = torch.arange(batch, device=dev)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int64, device=dev)
    channels = torch.stack([torch.randperm(d, generator=g, device=dev)[:m["dc"]] for _ in range(hkv)])
    nb = ctx // BS
    table = torch.arange(batch * nb, dtype=torch.int32, device=dev).view(batch, nb)
    blk_slots = r2t.view(batch * nb, BS)
    kmin, kmax = R.block_minmax(k, blk_slots)  # setup, not timed
    # head-major label pool ([Hkv, S, ...] storage, passed as the [S, Hkv, ...] view the API takes): the
    # candidates of one KV group then read consecutive label rows instead of one 32-byte sector per 4-20 bytes
    labels = torch.empty(hkv, slots_total, m["dc"] // 2, dtype=torch.uint8, device=dev).permute(1, 0, 2)
    scale = torch.empty(hkv, slots_total, dtype=torch.float32, device=dev).t()
    quantize_labels(k, channels, out=(labels, scale))
    q = torch.randn(batch, m["hq"], d, generator=g, device=dev, dtype=torch.bfloat16)
    return dict(q=q, k=k, v=v, r2t=r2t, rows=rows, seq_lens=seq_lens, kmin=kmin, kmax=kmax, table=table,
                labels=labels, scale=scale, channels=channels, sm_scale=d ** -0.5, model=model)


def method_args(c):
    return (c["q"], c["k"], c["v"], c["r2t"], c["rows"], c["seq_lens"], c["kmin"], c["kmax"], c["table"],
            c["labels"], c["scale"], c["channels"])


def budgets(kt, sm_scale):
    return dict(block_size=BS, block_budget=KB, token_budget=kt, sink_tokens=SINK, local_window=WINDOW,
                sm_scale=sm_scale)

# ---------------------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, iters, warmup):
        self.iters, self.warmup = iters, warmup
        # read (not written: a memset would leave ~50 MB of dirty lines whose write-back the next kernel pays)
        self.flush_buf = torch.ones(64 << 20, dtype=torch.int32, device="cuda")  # 256 MiB > 50 MB L2

    def __call__(self, fn):
        """Median/min/max µs of CUDA-graph replays of fn, L2 flushed before each."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(self.warmup):
            graph.replay()
        times = []
        for _ in range(self.iters):
            self.flush_buf.sum()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        del graph
        times.sort()
        return dict(median_us=times[len(times) // 2], min_us=times[0], max_us=times[-1], iters=self.iters)


def hbm_bandwidth(timer):
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timer(lambda: b.copy_(a))
    del a, b
    return 2 * (2 << 30) / (t["median_us"] * 1e-6), t


def asynctls_bytes(c, kt):
    """Bytes an asynctls step must move: Kmin/Kmax of complete blocks, labels + scales + req_to_token entries of
    the Kb * BS candidates per KV group, full K/V of the Kt kept tokens (MLA: V is inside K). Scratch traffic
    (block scores, label logits, split-K partials) not counted."""
    b, hq, d = c["q"].shape
    hkv, dv = c["k"].shape[1], c["v"].shape[2]
    nblk = int(c["seq_lens"][0]) // BS
    dc = c["channels"].shape[1]
    index = 2 * nblk * hkv * d * 2 + nblk * 4
    labels = hkv * KB * BS * (dc // 2 + 4 + 4)
    kv = hkv * kt * (d if MODELS[c["model"]]["mla"] else d + dv) * 2
    return b * (index + labels + kv)

# ---------------------------------------------------------------------------------------------- one shape


def flashinfer_mla_decode(c, rank: int = 512):
    """FlashInfer's paged MLA decode over the latent pool, set up as SGLang's flashinfer MLA backend does (page size
    1, the [slots, 1, 576] buffer split into its 512 latent and 64 rope columns as views): the dense kernel a stock
    MLA server decodes with."""
    import flashinfer

    q, k, r2t = c["q"], c["k"], c["r2t"]
    b, hq, _ = q.shape
    ctx, dev, i32 = r2t.shape[1], q.device, torch.int32
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.int8, device=dev))
    wrapper.plan(torch.arange(b + 1, dtype=i32, device=dev), torch.arange(b + 1, dtype=i32, device=dev) * ctx,
                 r2t.reshape(-1).to(i32), torch.full((b,), ctx, dtype=i32, device=dev), hq, rank, k.shape[-1] - rank,
                 1, False, c["sm_scale"], q.dtype, k.dtype)
    q_nope, q_pe = q[..., :rank].contiguous(), q[..., rank:].contiguous()
    ckv, kpe = k[:, :, :rank], k[:, :, rank:]  # [slots, page 1, 512] / [.., 64]
    return lambda: wrapper.run(q_nope, q_pe, ckv, kpe)


def dense_candidates(c, timer, sgl):
    """Every dense kernel available: ours over all slots, SGLang's triton decode (splits tuned), FlashInfer's MLA
    decode (MLA), torch SDPA."""
    res = {}
    args, kw = method_args(c), budgets(1024, c["sm_scale"])
    res["dense_ours_splitk"] = timer(lambda: K.dense_method(*args, **kw))
    b, hq, d = c["q"].shape
    hkv = c["k"].shape[1]
    slots = K.dense_slots(c["r2t"], c["rows"], c["seq_lens"], hkv, c["r2t"].shape[1])
    if sgl is not None:
        best = None
        for splits in (16, 64, 128):
            try:
                t = timer(SGLangDecode(sgl, c["q"], c["k"], c["v"], slots, splits, MODELS[c["model"]]["mla"],
                                       native=True))
                t["num_kv_splits"] = splits
                best = t if best is None or t["median_us"] < best["median_us"] else best
            except Exception as e:  # noqa: BLE001
                res.setdefault("errors", {})[f"sglang_triton_{splits}"] = repr(e)[:300]
        if best:
            res["dense_sglang_triton"] = best
    if MODELS[c["model"]]["mla"]:
        try:
            res["dense_flashinfer_mla"] = timer(flashinfer_mla_decode(c))
        except Exception as e:  # noqa: BLE001  (no flashinfer, or its JIT failed: recorded, not fatal)
            res.setdefault("errors", {})["flashinfer_mla"] = repr(e)[:300]
    try:
        sl = slots[:, 0].long()
        kc = c["k"][sl].permute(0, 2, 1, 3).contiguous()  # [B, Hkv, L, D]
        vc = c["v"][sl].permute(0, 2, 1, 3).contiguous()
        q4 = c["q"][:, :, None, :]
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q4, kc, vc, scale=c["sm_scale"], enable_gqa=True)
        res["dense_torch_sdpa"] = timer(fn)
        del kc, vc
    except Exception as e:  # noqa: BLE001
        res.setdefault("errors", {})["torch_sdpa"] = repr(e)[:300]
    return res


def stage_breakdown(c, timer, kt, sgl, tune):
    """Each asynctls stage captured alone (its inputs precomputed), plus top-k and attention alternatives."""
    q, lens = c["q"], c["seq_lens"]
    out = {}
    scores = block_scores(q, c["kmin"], c["kmax"], c["table"], lens, BS)
    blocks = select_blocks(scores, lens, BS, KB, SINK, WINDOW)
    lab = (c["labels"], c["scale"], c["channels"], c["r2t"], c["rows"], lens)
    fsel = dict(block_size=BS, token_budget=kt, sink_tokens=SINK, local_window=WINDOW)
    tscores = candidate_scores(q, *lab, blocks, c["sm_scale"], block_size=BS)
    slots = select_token_slots(tscores, blocks, c["r2t"], c["rows"], lens, **fsel)
    out["1_block_scores"] = timer(lambda: block_scores(q, c["kmin"], c["kmax"], c["table"], lens, BS))
    out["2_select_blocks"] = timer(lambda: select_blocks(scores, lens, BS, KB, SINK, WINDOW))
    out["3_token_logits"] = timer(lambda: token_logits(q, *lab, blocks, c["sm_scale"], block_size=BS))
    out["3+4_token_logits_and_combine"] = timer(lambda: candidate_scores(q, *lab, blocks, c["sm_scale"],
                                                                         block_size=BS))
    out["5_select_token_slots"] = timer(lambda: select_token_slots(tscores, blocks, c["r2t"], c["rows"], lens,
                                                                   **fsel))
    out["6_sparse_decode"] = timer(lambda: sparse_decode(q, c["k"], c["v"], slots, c["sm_scale"]))
    # GQA's default folds the softmax combine (4) into the top-Kt (5): fine_select_candidates
    logits, stats = token_logits(q, *lab, blocks, c["sm_scale"], block_size=BS)
    out["4+5_select_token_slots_combine_folded"] = timer(lambda: select_token_slots(
        logits, blocks, c["r2t"], c["rows"], lens, stats=stats, **fsel))
    fine_rows(out, c, timer, q, lab, blocks, fsel)
    if tune:
        for nw in (8, 16, 32):
            out[f"tune_select_token_slots_combine_folded_warps{nw}"] = timer(lambda: select_token_slots(
                logits, blocks, c["r2t"], c["rows"], lens, stats=stats, num_warps=nw, **fsel))
    del logits, stats
    if tune:
        tune_rows(out, c, timer, q, lens, lab, blocks, scores, tscores, slots, fsel)
    alternatives(out, c, timer, q, lens, kt, scores, blocks, slots, tscores, sgl)
    return out


def fine_rows(out, c, timer, q, lab, blocks, fsel):
    """The fine stage (3-5) with each way of forming the group-mean softmax (fine_select.COMBINES), and the default
    (fold for G <= FOLD_COMBINE_MAX_GROUP, else its own launch)."""
    kw = dict(block_size=BS, token_budget=fsel["token_budget"], sink_tokens=SINK, local_window=WINDOW,
              sm_scale=c["sm_scale"])
    names = {"fold": "3-5_fine_folded", "logits": "3-5_fine_logits_combine"}
    for combine in (None,) + FS.COMBINES:
        out[names.get(combine, "3-5_fine_default")] = timer(
            lambda: fine_select_candidates(q, *lab, blocks, combine=combine, **kw))


def tune_rows(out, c, timer, q, lens, lab, blocks, scores, tscores, slots, fsel):
    for ns in (16, 32, 64):
        out[f"tune_token_logits_splits{ns}"] = timer(
            lambda: token_logits(q, *lab, blocks, c["sm_scale"], block_size=BS, num_splits=ns))
    for st in (1, 2, 3):
        out[f"tune_token_logits_stages{st}"] = timer(
            lambda: token_logits(q, *lab, blocks, c["sm_scale"], block_size=BS, num_stages=st))
    for bn, nw in ((16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)):
        out[f"tune_block_scores_n{bn}_warps{nw}"] = timer(
            lambda: block_scores(q, c["kmin"], c["kmax"], c["table"], lens, BS, block_n=bn, num_warps=nw))
    for nw in (8, 16, 32):
        out[f"tune_select_token_slots_warps{nw}"] = timer(
            lambda: select_token_slots(tscores, blocks, c["r2t"], c["rows"], lens, num_warps=nw, **fsel))
    mla = MODELS[c["model"]]["mla"]
    for ns in (8, 16, 32):
        for bh in ((16, 32) if mla else (16,)):
            out[f"tune_sparse_decode_splits{ns}_bh{bh}"] = timer(
                lambda: sparse_decode(q, c["k"], c["v"], slots, c["sm_scale"], num_splits=ns, block_h=bh))
    # (block_n, warps, dv_chunks), see sparse_decode.TILES; dv_chunks > 1 splits the output columns over programs.
    # ptxas sm_90 registers, MLA: default 32/8/1 231, 32/8/2 197, 64/8/4 196, 16/4/2 186, 16/4/4 167, 64/16/1 121,
    # none spill; above 128 at 8 warps only one program fits an SM
    tiles = ((16, 4, 4), (32, 8, 2), (64, 8, 4), (16, 4, 2), (64, 16, 1)) if mla else ((32, 4, 1), (64, 4, 2))
    for bn, nw, ndv in tiles:
        for ns in (0, 32) if mla else (0,):
            out[f"tune_sparse_decode_splits{ns or 'auto'}_n{bn}_warps{nw}_dv{ndv}"] = timer(lambda: sparse_decode(
                q, c["k"], c["v"], slots, c["sm_scale"], num_splits=ns, block_n=bn, num_warps=nw, dv_chunks=ndv))


def alternatives(out, c, timer, q, lens, kt, scores, blocks, slots, tscores, sgl):
    forced = R.forced_block_mask(lens, scores.shape[2], BS, SINK, WINDOW)[:, None]
    out["alt_select_blocks_torch_topk"] = timer(
        lambda: torch.topk(scores.masked_fill(forced, float("inf")), KB, dim=2))
    positions = R.candidate_positions(blocks, lens, BS)
    out["alt_select_tokens_ours"] = timer(lambda: select_tokens(tscores, positions, lens, kt, SINK, WINDOW))
    # exact 32-bit keys instead of the default bfloat16-resolution ones (kernels/_topk.py)
    out["alt_select_blocks_31bit"] = timer(lambda: select_blocks(scores, lens, BS, KB, SINK, WINDOW, key_bits=31))
    out["alt_select_token_slots_31bit"] = timer(lambda: select_token_slots(
        tscores, blocks, c["r2t"], c["rows"], lens, block_size=BS, token_budget=kt, sink_tokens=SINK,
        local_window=WINDOW, key_bits=31))
    # decode-time index append of one layer (the backend runs it once per layer and step): fused vs torch ops
    loc = c["r2t"][c["rows"], lens - 1]
    idx = (c["k"], loc, lens, c["channels"], c["labels"], c["scale"], c["kmin"], c["kmax"], BS)
    out["index_append_fused"] = timer(lambda: append_decode_index(*idx))
    out["index_append_torch"] = timer(lambda: R.append_decode_index(*idx))
    out["alt_select_tokens_torch_topk"] = timer(
        lambda: R.select_tokens(tscores, positions, lens, kt, SINK, WINDOW))
    if sgl is not None:
        try:
            best = None
            for splits in (4, 8, 16):
                t = timer(SGLangDecode(sgl, q, c["k"], c["v"], slots, splits, MODELS[c["model"]]["mla"]))
                t["num_kv_splits"] = splits
                best = t if best is None or t["median_us"] < best["median_us"] else best
            out["alt_sparse_decode_sglang_triton"] = best
        except Exception as e:  # noqa: BLE001
            out["alt_sparse_decode_sglang_triton"] = {"error": repr(e)[:300]}
    del positions


def run_shape(model, ctx, batch, timer, sgl, token_budgets, breakdown):
    c = make_case(model, ctx, batch)
    rows = []
    shape = dict(model=model, context=ctx, batch=batch)
    dense = dense_candidates(c, timer, sgl)
    errors = dense.pop("errors", None)
    for name, t in dense.items():
        rows.append(dict(shape, method="dense", kernel=name, **t))
    best = min(dense.items(), key=lambda kv: kv[1]["median_us"])
    rows.append(dict(shape, method="dense_best", kernel=best[0], **best[1], errors=errors))
    args = method_args(c)
    for kt in token_budgets:
        kw = budgets(kt, c["sm_scale"])
        for method in ("quest", "token_only", "asynctls"):
            if method == "quest" and kt != token_budgets[0]:
                continue  # quest ignores the token budget
            t = timer(lambda: K.METHODS[method](*args, **kw))
            row = dict(shape, method=method, token_budget=kt, **t)
            if method == "asynctls":
                nbytes = asynctls_bytes(c, kt)
                row.update(bytes=nbytes, gb_per_s=nbytes / (t["median_us"] * 1e-6) / 1e9)
            rows.append(row)

        if breakdown:
            rows.append(dict(shape, method="asynctls_stages", token_budget=kt,
                             stages=stage_breakdown(c, timer, kt, sgl, tune=kt == token_budgets[0])))
    del c
    torch.cuda.empty_cache()
    return rows

# ---------------------------------------------------------------------------------------------- report


def find(rows, **key):
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def summarize(rows, bandwidth):
    s, kernels = {}, {}
    for model in ("gqa", "mla"):
        a = find(rows, model=model, context=98304, batch=8, method="asynctls", token_budget=1024)
        d = find(rows, model=model, context=98304, batch=8, method="dense_best")
        if a and d:
            s[f"dense_over_asynctls_{model}_96k_b8"] = d["median_us"] / a["median_us"]
            kernels[model] = d["kernel"]
            if model == "gqa":
                qu = find(rows, model=model, context=98304, batch=8, method="quest")
                to = find(rows, model=model, context=98304, batch=8, method="token_only", token_budget=1024)
                s["quest_over_asynctls_gqa_96k_b8"] = qu["median_us"] / a["median_us"]
                s["tokenonly_over_asynctls_gqa_96k_b8"] = to["median_us"] / a["median_us"]
                s["roofline_fraction_gqa_96k_b8"] = a["gb_per_s"] * 1e9 / bandwidth
    if kernels:
        names = set(kernels.values())
        s["dense_kernel"] = names.pop() if len(names) == 1 else ", ".join(f"{m}: {k}" for m, k in kernels.items())
    return s


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method, style in (("dense_best", "k-"), ("quest", "b--"), ("token_only", "g-."), ("asynctls", "r-")):
            for batch, marker in ((1, "o"), (4, "s"), (8, "^")):
                pts = sorted((r["context"], r["median_us"]) for r in rows if r["model"] == model
                             and r["method"] == method and r["batch"] == batch
                             and r.get("token_budget", 1024) == 1024)
                if pts:
                    ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], style, marker=marker,
                            label=f"{method.replace('_best', '')} b{batch}")
        ax.set_yscale("log")
        ax.set_xlabel("context (k tokens)")
        ax.set_ylabel("µs per layer step (median)")
        ax.set_title(f"{model.upper()} decode attention, H100, k_t=1024")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="gqa,mla")
    p.add_argument("--contexts", default="32768,49152,98304,131072")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--token-budgets", default="1024,512,2048")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="op_latency_h100")
    p.add_argument("--breakdown-all", action="store_true", help="stage breakdown at every shape, not only 96k b8")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    timer = Timer(a.iters, a.warmup)
    try:
        sgl, sgl_how = load_sglang_decode()
    except Exception as e:  # noqa: BLE001
        sgl, sgl_how = None, f"unavailable: {e!r}"[:300]
    bandwidth, bw_t = hbm_bandwidth(timer)
    kts = [int(x) for x in a.token_budgets.split(",")]
    result = dict(benchmark="op_latency", command=" ".join(["python3"] + sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=importlib.import_module("triton").__version__, sglang=f"0.5.17 ({sgl_how})",
                  config=dict(block_size=BS, block_budget=KB, token_budgets=kts, sink_tokens=SINK,
                              local_window=WINDOW, label_channels={m: v["dc"] for m, v in MODELS.items()},
                              models=MODELS, dtype="bfloat16", timing="CUDA graph replay, CUDA events, L2 flushed "
                              "(sum over a 256 MiB buffer) before each replay", iters=a.iters, warmup=a.warmup,
                              hbm_bandwidth_bytes_per_s=bandwidth, hbm_copy=bw_t,
                              pool="16-token chunks of all requests shuffled",
                              label_layout="head-major storage ([Hkv, S, Dc/2] / [Hkv, S]) viewed as [S, Hkv, ...]",
                              skipped=[]),
                  rows=[], summary={})
    out_json = os.path.join(a.out, a.name + ".json")
    for model in a.models.split(","):
        for ctx in (int(x) for x in a.contexts.split(",")):
            for batch in (int(x) for x in a.batches.split(",")):
                headline = ctx == 98304 and batch == 8
                try:
                    rows = run_shape(model, ctx, batch, timer, sgl, kts if headline else kts[:1],
                                     headline or a.breakdown_all)
                except Exception as e:  # noqa: BLE001 (out of memory, or a failure: recorded, sweep goes on)
                    result["config"]["skipped"].append(dict(model=model, context=ctx, batch=batch, why=repr(e)[:300]))
                    print("skipped", model, ctx, batch, repr(e)[:300], flush=True)
                    torch.cuda.empty_cache()
                    continue
                result["rows"] += rows
                result["summary"] = summarize(result["rows"], bandwidth)
                with open(out_json, "w") as f:
                    json.dump(result, f, indent=1)
                for r in rows:
                    if "median_us" in r:
                        print(f"{model} {ctx} b{batch} {r['method']:>10} {r.get('kernel', r.get('token_budget', ''))}"
                              f" {r['median_us']:9.1f} us", flush=True)
                    else:
                        print(json.dumps({k: round(v["median_us"], 1) if "median_us" in v else v
                                          for k, v in r["stages"].items()}), flush=True)
    if result["rows"]:
        plot(result["rows"], os.path.join(a.out, a.name + ".png"))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
