"""Issue 5, on real weights: how much of the coarse selection M_t the offload engine would have to copy per step.

    python benchmarks/offload_locality.py [--context 8192 --steps 64 --fraction 8 --trace T.pt]
        --out benchmarks/results/offload_locality_smollm2.json   (+ .png)

SmolLM2-135M-Instruct (real weights, CPU or --device cuda): per evaluation text (Python stdlib source, never the
calibration text), a dense prefill of `--context` tokens, then `--steps` greedy decode steps through the AsyncTLS
reference with the harness's defaults (k_t = context / fraction, 4x candidates, SmolLM2's per-layer schedule). The
coarse selection of every step, layer and KV head is recorded (a [T, L, 1, Hkv, Kb] int32 trace for
offload_engine.py --trace when --trace is given). Per layer:
- overlap: |M_t n M_{t-1}| / |M_t|, the paper's locality (C_t = M_{t-1});
- LRU hit rate with R = r x k_b resident blocks (the engine's resident set), r in --rs;
- blocks to copy per step and head = misses, and the bytes they are for SmolLM2 (64 tokens x 64 dims x K+V x bf16 =
  16 KiB a head-block) and for Qwen3-8B (32 KiB) at the same miss rate.
Forced blocks (sink, local window, the open last block) are not counted: the engine keeps them in device pages.
Stall time needs the GPU (offload_engine.py); this measures only what the copies would be.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import torch

import fidelity as harness  # benchmarks/fidelity.py: the same Runner (model, channels, budgets)
from sglang_asynctls import calibrate
from sglang_asynctls import fidelity as fd
from sglang_asynctls import reference as ref

HEAD_BLOCK_BYTES = {"smollm2": 64 * 64 * 2 * 2, "qwen3_8b": 64 * 128 * 2 * 2}


@contextlib.contextmanager
def capture_blocks():
    """Record the block ids [B, Hkv, Kb] every reference coarse selection returns, in call (= layer) order."""
    seen = []
    inner = ref.coarse_select

    def spy(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen.append(out.clone())
        return out

    ref.coarse_select = spy
    try:
        yield seen
    finally:
        ref.coarse_select = inner


def unforced(ids: torch.Tensor, seq_len: int, block_size: int, sink: int, window: int) -> set:
    """Selected block ids minus the ones the engine keeps on the device anyway."""
    out = set()
    for b in ids.tolist():
        start = b * block_size
        if b < 0 or start < sink or start + block_size > seq_len - window:
            continue
        out.add(b)
    return out


def lru_misses(steps: list, capacity: int) -> list:
    """Blocks of each step's set not already in an LRU cache of `capacity` blocks (the cache then takes them)."""
    cache: OrderedDict = OrderedDict()
    misses = []
    for blocks in steps:
        misses.append(len([b for b in blocks if b not in cache]))
        for b in blocks:
            cache[b] = True
            cache.move_to_end(b)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return misses


def layer_figures(trace: torch.Tensor, seq0: int, budget: fd.Budget, rs, layer: int) -> dict:
    """trace [T, Hkv, Kb] of one layer (batch row 0); step t decodes with seq_len seq0 + t + 1."""
    steps, hkv, kb = trace.shape
    kb_eff = budget.kwargs("asynctls", layer)["block_budget"]
    over, miss, blocks = [], {r: [] for r in rs}, 0
    for h in range(hkv):
        sets = [unforced(trace[t, h], seq0 + t + 1, budget.block_size, budget.sink_tokens, budget.local_window)
                for t in range(steps)]
        blocks += sum(map(len, sets)) / (steps * hkv)
        over += [len(sets[t] & sets[t - 1]) / max(1, len(sets[t])) for t in range(1, steps)]
        for r in rs:
            m = lru_misses(sets, r * kb_eff)
            miss[r] += [x / max(1, len(s)) for x, s in zip(m[1:], sets[1:])]  # step 0 fills the cache
    return {"k_b": kb_eff, "scored_blocks_per_head": round(blocks, 2),
            "overlap": round(sum(over) / len(over), 4),
            **{f"lru_hit_r{r}": round(1 - sum(v) / len(v), 4) for r, v in miss.items()},
            **{f"copied_blocks_per_head_step_r{r}": round(sum(v) / len(v) * blocks, 3) for r, v in miss.items()}}


def run_text(runner, module: str, context: int, steps: int, fraction: int, rs) -> dict:
    ids = torch.tensor(runner.tok(calibrate.stdlib_source(module)).input_ids[:context])
    if len(ids) < context:
        raise SystemExit(f"{module} has only {len(ids)} tokens; pick --context <= that")
    budget = runner.budget(context, fraction)
    kv = fd.DocumentKV(runner.model, ids[:-1], runner.channels, extra=steps + 1, block_size=budget.block_size)
    with capture_blocks() as seen:
        fd.generate(runner.model, kv, int(ids[-1]), budget, "asynctls", steps)
    layers = runner.model.shape.num_layers
    kb = max(x.shape[2] for x in seen)  # layers differ in k_b (the candidate schedule): pad with -1
    seen = [torch.nn.functional.pad(x, (0, kb - x.shape[2]), value=-1) for x in seen]
    trace = torch.stack([torch.stack(seen[t * layers:(t + 1) * layers]) for t in range(steps)])  # [T, L, 1, H, Kb]
    seq0 = len(ids) - 1
    per_layer = [layer_figures(trace[:, i, 0], seq0, budget, rs, i) for i in range(layers)]
    return {"module": module, "context": context, "per_layer": per_layer, "trace": trace}


def summarize(texts: list, rs) -> dict:
    rows = [l for t in texts for l in t["per_layer"]]
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0] if k != "k_b"}
    layers = len(texts[0]["per_layer"])
    # layers whose k_b covers every block (2x candidates at 8k) are trivially local: also the mean without them
    nb = texts[0]["context"] // 64
    sel = [r for r in rows if r["k_b"] < nb] or rows
    out = {"mean_block_overlap": mean["overlap"], **{f"lru_hit_r{r}": mean[f"lru_hit_r{r}"] for r in rs},
           "selective_layers": len(sel) // len(texts),
           "mean_block_overlap_selective_layers": round(sum(r["overlap"] for r in sel) / len(sel), 4),
           **{f"lru_hit_r{r}_selective_layers": round(sum(x[f"lru_hit_r{r}"] for x in sel) / len(sel), 4)
              for r in rs},
           "overlap_min_layer": min(sum(t["per_layer"][i]["overlap"] for t in texts) / len(texts)
                                    for i in range(layers))}
    heads = texts[0]["trace"].shape[3]
    for r in rs:
        per_step = sum(r_["copied_blocks_per_head_step_r" + str(r)] for r_ in rows) / len(texts) * heads
        out[f"copied_head_blocks_per_step_r{r}"] = round(per_step, 1)  # all layers and heads of one request
        out[f"pcie_bytes_per_step_r{r}_smollm2"] = int(per_step * HEAD_BLOCK_BYTES["smollm2"])
    return out


def plot(result: dict, path: Path, rs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for t in result["texts"]:
        ax.plot([l["overlap"] for l in t["per_layer"]], label=f"overlap, {t['module']}")
        for r in rs:
            ax.plot([l[f"lru_hit_r{r}"] for l in t["per_layer"]], ls="--", label=f"LRU hit r={r}, {t['module']}")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"SmolLM2, {result['config']['context']} tokens, {result['config']['steps']} decode steps: "
                 f"coarse selection locality", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/offload_locality_smollm2.json")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--fraction", type=int, default=8)
    p.add_argument("--modules", default="typing.py,inspect.py", help="evaluation stdlib files, comma-separated")
    p.add_argument("--rs", default="1,2", help="resident set sizes R = r x k_b to simulate")
    p.add_argument("--trace", default="", help="also save the [T, L, 1, Hkv, Kb] trace of the first text here")
    p.add_argument("--harness-args", default="", help="more benchmarks/fidelity.py flags (e.g. '--device cuda')")
    args = p.parse_args(argv)
    h = harness.build_parser().parse_args(args.harness_args.split())
    if h.device != "cpu":
        torch.set_default_device(h.device)
    rs = [int(r) for r in args.rs.split(",")]
    start = time.time()
    runner = harness.Runner(h)
    texts = [run_text(runner, m, args.context, args.steps, args.fraction, rs) for m in args.modules.split(",")]
    if args.trace:
        torch.save(texts[0]["trace"].cpu(), args.trace)
    result = {"benchmark": "offload_locality", "command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **harness.versions(),
              "config": {**{k: v for k, v in vars(args).items()}, "resolved_layer_schedule": runner.schedule,
                         "budget": asdict(runner.budget(args.context, args.fraction)),
                         "python_stdlib": str(calibrate.stdlib_dir()), "wall_s": round(time.time() - start, 1)},
              "summary": summarize(texts, rs),
              "texts": [{k: v for k, v in t.items() if k != "trace"} for t in texts]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"), rs)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
