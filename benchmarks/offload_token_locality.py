"""Token-level locality of AsyncTLS's final (k_t) selection on real weights: sizing a device "hot token cache".

    python benchmarks/offload_token_locality.py --context 8192 --steps 64 --modules typing.py,inspect.py
        --out benchmarks/results/offload_token_locality_smollm2.json   (+ .png)

Same run as offload_locality.py (whose run_text it calls): SmolLM2-135M-Instruct on the CPU, a dense prefill of
`--context` tokens of a stdlib file, then `--steps` greedy decode steps through the AsyncTLS reference with the
harness's defaults (k_t = context / fraction, 4x candidates, SmolLM2's per-layer schedule). Besides the coarse
blocks it records the fine stage's picked token positions (reference.select_tokens) per step, layer and KV head.

Counted tokens: every picked position except the forced ones, i.e. sink positions (< sink_tokens) and local-window
positions (>= seq_len - local_window; the open last block lies inside the window). Those are assumed to stay in
device memory. A token that leaves the window and is then picked counts as a new (missing) token.

Per layer, and pooled over layers, KV heads and texts (token-weighted), from step 1 on (step 0 fills the cache):
- token overlap |S_t n S_{t-1}| / |S_t|;
- hit rate of a per-(layer, KV head) cache of R = r x k_t(layer) token rows, r in --rs, for: fully-associative LRU;
  W-way set-associative LRU (W in --ways), set = pos mod (R / W) or a multiplicative hash of pos; direct-mapped
  (W = 1). All of a step's tokens are looked up against the cache as it was; hits refresh their line; misses take
  their set's LRU lines, but not lines hit or filled in this step (misses beyond those bypass: uncached misses);
- host bytes read per decode step of one request at Qwen3-8B sizes (36 layers x 8 KV heads, 512 B K+V a token and
  head), an extrapolation that assumes SmolLM2's selection statistics at the same context and k_t.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import offload_locality as loc  # benchmarks/offload_locality.py: the run (model, prefill, decode, block capture)
from sglang_asynctls import calibrate
from sglang_asynctls import reference as ref

QWEN3_8B = {"layers": 36, "kv_heads": 8, "bytes_per_token_head": 512}  # (K + V) x 128 dims x bf16
HASH_MUL = 2654435761  # Knuth's multiplicative hash: spreads positions that are equal mod the set count


@contextlib.contextmanager
def capture_tokens():
    """Per reference fine selection (one per layer and step, in call order): per KV head of batch row 0, the sorted
    unforced picked positions, and the number of forced positions picked."""
    seen = []
    inner = ref.select_tokens

    def spy(scores, positions, seq_lens, token_budget, sink_tokens, local_window):
        out = inner(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
        picked, n = out[0], int(seq_lens[0])
        free = (picked >= sink_tokens) & (picked < n - local_window)  # -1 padding fails the first test
        seen.append(([np.sort(p[f].numpy()) for p, f in zip(picked, free)],
                     int(((picked >= 0) & ~free).sum()) / picked.shape[0]))
        return out

    ref.select_tokens = spy
    try:
        yield seen
    finally:
        ref.select_tokens = inner


class SetAssocLRU:
    """A cache of sets x ways token rows with per-set LRU, fed one decode step (a set of positions) at a time.
    ways = lines and sets = 1 is fully-associative LRU; ways = 1 is direct-mapped."""

    def __init__(self, lines: int, ways: int, index: str = "mod"):
        self.sets, self.ways, self.index = max(1, lines // ways), ways, index
        self.tag = np.full((self.sets, ways), -1, np.int64)
        self.stamp = np.full((self.sets, ways), -1, np.int64)  # last step that hit or filled the line; -1 = empty
        self.t = 0

    def set_of(self, pos: np.ndarray) -> np.ndarray:
        if self.index == "hash":
            return (((pos * HASH_MUL) & 0xFFFFFFFF) >> 16) % self.sets
        return pos % self.sets

    def step(self, pos: np.ndarray) -> int:
        """Look up distinct positions; returns the hits. The cache then holds the step's hits and placed misses."""
        t, self.t = self.t, self.t + 1
        pos = np.asarray(pos, np.int64)
        s = self.set_of(pos)
        # hits: match set*2^32 + tag against the cache's lines (empty lines get a key no position has)
        keys = np.where(self.tag >= 0, np.arange(self.sets)[:, None] << 32 | self.tag, -1).ravel()
        order = np.argsort(keys)
        at = np.minimum(np.searchsorted(keys[order], s << 32 | pos), len(keys) - 1)
        hit = keys[order[at]] == (s << 32 | pos)
        self.stamp.flat[order[at[hit]]] = t
        # misses, grouped by set: the k-th miss of a set takes its k-th least recently used line if that line was
        # not touched in this step (touched lines carry stamp t, the largest, so they sort last)
        ms, mp = s[~hit], pos[~hit]
        if len(ms):
            o = np.argsort(ms, kind="stable")
            ms, mp = ms[o], mp[o]
            uniq, first, inv = np.unique(ms, return_index=True, return_inverse=True)
            rank = np.arange(len(ms)) - first[inv]
            lru = np.argsort(self.stamp[uniq], axis=1, kind="stable")  # [U, ways]
            free = (self.stamp[uniq] < t).sum(axis=1)
            ok = rank < np.minimum(free[inv], self.ways)
            way = lru[inv[ok], rank[ok]]
            self.tag[ms[ok], way] = mp[ok]
            self.stamp[ms[ok], way] = t
        return int(hit.sum())


def policies(ways_list) -> dict:
    """name -> (ways or None for fully-associative, set index)."""
    out = {"lru_full": (None, "mod")}
    for w in ways_list:
        for index in ("mod", "hash"):
            out[f"{'direct' if w == 1 else f'w{w}'}_{index}"] = (w, index)
    return out


def simulate(steps: list, lines: int, ways, index: str) -> tuple:
    """(hits, lookups) over steps[1:] of one (layer, KV head) cache; step 0 only fills it."""
    cache = SetAssocLRU(lines, ways or lines, index)
    cache.step(steps[0])
    return sum(cache.step(s) for s in steps[1:]), sum(len(s) for s in steps[1:])


def layer_counts(steps_by_head: list, kt: int, rs, pols) -> dict:
    """Pooled counts of one layer of one text: overlap and, per (policy, r), hits over lookups."""
    c = {"inter": 0, "lookups": 0, "tokens": 0}
    for steps in steps_by_head:
        c["inter"] += sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(steps[1:], steps))
        c["lookups"] += sum(len(s) for s in steps[1:])
        c["tokens"] += sum(len(s) for s in steps)
        for name, (ways, index) in pols.items():
            for r in rs:
                c[(name, r)] = c.get((name, r), 0) + simulate(steps, r * kt, ways, index)[0]
    return c


def run_text(runner, module: str, args, rs, pols) -> dict:
    with capture_tokens() as seen:
        blocks = loc.run_text(runner, module, args.context, args.steps, args.fraction, [1])
    layers = runner.model.shape.num_layers
    budget = runner.budget(args.context, args.fraction)
    heads = len(seen[0][0])
    per_layer = []
    for i in range(layers):
        kt = budget.kwargs("asynctls", i)["token_budget"]
        calls = seen[i::layers]  # call order is step-major: step t, layer i is call t * layers + i
        c = layer_counts([[call[0][h] for call in calls] for h in range(heads)], kt, rs, pols)
        per_layer.append({"layer": i, "k_t": kt, "k_b": blocks["per_layer"][i]["k_b"], "counts": c,
                          "forced_per_head_step": sum(call[1] for call in calls) / len(calls),
                          "block_overlap": blocks["per_layer"][i]["overlap"]})
    return {"module": module, "heads": heads, "per_layer": per_layer}


def rates(c: dict, rs, pols) -> dict:
    return {"token_overlap": round(c["inter"] / c["lookups"], 4),
            **{f"{name}_r{r}": round(c[(name, r)] / c["lookups"], 4) for name in pols for r in rs}}


def summarize(texts: list, rs, pols, steps: int) -> dict:
    layers = len(texts[0]["per_layer"])
    merged = []  # per layer, counts pooled over texts
    for i in range(layers):
        rows = [t["per_layer"][i] for t in texts]
        c = {k: sum(r["counts"][k] for r in rows) for k in rows[0]["counts"]}
        heads = texts[0]["heads"]
        merged.append({"layer": i, "k_t": rows[0]["k_t"], "k_b": rows[0]["k_b"],
                       "unforced_per_head_step": round(c["tokens"] / (len(texts) * heads * steps), 1),
                       "forced_per_head_step": round(sum(r["forced_per_head_step"] for r in rows) / len(rows), 1),
                       "block_overlap": round(sum(r["block_overlap"] for r in rows) / len(rows), 4),
                       **rates(c, rs, pols), "_c": c})
    total = {k: sum(m["_c"][k] for m in merged) for k in merged[0]["_c"]}
    overall = rates(total, rs, pols)
    lowest = {k: min(((m[k], m["layer"]) for m in merged)) for k in overall}
    # Qwen3-8B extrapolation: the mean SmolLM2 layer's tokens per head and step, at the pooled miss rates
    q = QWEN3_8B
    unit = q["layers"] * q["kv_heads"] * q["bytes_per_token_head"]
    unforced = sum(m["unforced_per_head_step"] for m in merged) / layers
    forced = sum(m["forced_per_head_step"] for m in merged) / layers
    extrap = {"assumption": "Qwen3-8B (36 layers x 8 KV heads x 512 B) reading SmolLM2's mean per-layer token "
                            "counts and pooled miss rates at this context and k_t: an extrapolation, not a run",
              "mean_unforced_tokens_per_head_step": round(unforced, 1),
              "mean_forced_tokens_per_head_step": round(forced, 1),
              "no_cache_all_kt_bytes": int((unforced + forced) * unit),
              "no_cache_unforced_bytes": int(unforced * unit),
              **{f"{name}_r{r}_bytes": int(unforced * (1 - overall[f"{name}_r{r}"]) * unit)
                 for name in pols for r in rs},
              "note": "cached figures count only misses of unforced tokens (sink and window rows assumed on the "
                      "device); add no_cache_all_kt_bytes - no_cache_unforced_bytes if those are read from host too"}
    for m in merged:
        del m["_c"]
    return {"overall": overall, "lowest_layer": {k: {"rate": v, "layer": l} for k, (v, l) in lowest.items()},
            "qwen3_8b_host_bytes_per_step": extrap, "per_layer": merged}


def plot(summary: dict, path: Path, rs, pols, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {w: f"C{i}" for i, w in enumerate(dict.fromkeys(w for w, _ in pols.values()))}  # one per W
    low = sorted({v["layer"] for v in summary["lowest_layer"].values()})
    for ax, key, label in ((axes[0], "overall", "pooled over layers"),
                           (axes[1], "lowest_layer", f"lowest layer of each point (layers {low})")):
        for name, (w, index) in pols.items():
            ys = [summary[key][f"{name}_r{r}"] for r in rs]
            ys = [y["rate"] if isinstance(y, dict) else y for y in ys]
            ax.plot(rs, ys, marker="o", color=colors[w], ls="--" if index == "hash" else "-", label=name)
        ov = summary[key]["token_overlap"]
        ax.axhline(ov["rate"] if isinstance(ov, dict) else ov, color="k", lw=0.8, ls=":", label="token overlap")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.set_xlabel("r (cache lines R = r x k_t per layer and KV head)")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("hit rate (unforced tokens, steps >= 1)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/offload_token_locality_smollm2.json")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--fraction", type=int, default=8)
    p.add_argument("--modules", default="typing.py,inspect.py", help="evaluation stdlib files, comma-separated")
    p.add_argument("--rs", default="1,2,4", help="cache sizes R = r x k_t per layer and KV head")
    p.add_argument("--ways", default="1,4,8,16", help="set-associative ways (1 = direct-mapped)")
    p.add_argument("--harness-args", default="", help="more benchmarks/fidelity.py flags")
    args = p.parse_args(argv)
    rs, pols = [int(r) for r in args.rs.split(",")], policies([int(w) for w in args.ways.split(",")])
    start = time.time()
    runner = loc.harness.Runner(loc.harness.build_parser().parse_args(args.harness_args.split()))
    texts = []
    for m in args.modules.split(","):
        texts.append(run_text(runner, m, args, rs, pols))
        print(f"{m}: done at {time.time() - start:.0f} s", flush=True)
    summary = summarize(texts, rs, pols, args.steps)
    budget = runner.budget(args.context, args.fraction)
    result = {"benchmark": "offload_token_locality", "command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": "CPU", **loc.harness.versions(),
              "config": {**vars(args), "k_t_per_layer": [budget.kwargs("asynctls", i)["token_budget"]
                                                         for i in range(runner.model.shape.num_layers)],
                         "policies": {k: {"ways": w or "R", "index": i} for k, (w, i) in pols.items()},
                         "resolved_layer_schedule": runner.schedule, "budget": asdict(budget),
                         "python_stdlib": str(calibrate.stdlib_dir()), "wall_s": round(time.time() - start, 1)},
              "excluded": "sink positions (< sink_tokens) and local-window positions (>= seq_len - local_window), "
                          "assumed device-resident; step 0 only fills the caches",
              **summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"), rs, pols,
         f"SmolLM2, {args.context} tokens, {args.steps} decode steps, {args.modules}: token cache hit rate")
    print(json.dumps({k: summary[k] for k in ("overall", "lowest_layer", "qwen3_8b_host_bytes_per_step")},
                     indent=1))
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
