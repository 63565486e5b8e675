"""Which of step t+1's newly selected rows a prefetch issued at step t could have fetched: the design evidence of
`--asynctls-host-prefetch-rows` (docs/offload.md "Prefetch"). CPU only, real weights.

    python benchmarks/prefetch_coverage.py --context 8192 --steps 64 --modules typing.py,inspect.py \
        --out benchmarks/results/prefetch_coverage_smollm2_cpu.json   (+ .png)

SmolLM2-135M-Instruct on the CPU (benchmarks/fidelity.py's Runner: packaged channels, k_t = context / fraction,
4x candidates, SmolLM2's per-layer schedule): a dense prefill of `--context` tokens of a stdlib file, then `--steps`
greedy decode steps through the AsyncTLS reference. Per step, layer and KV head it records the selected positions
S_t (k_t, sinks and window included), the coarse blocks M_t and the fine stage's ranking below the k_t cut-off
(the candidates of M_t ranked k_t + 1, k_t + 2, ...: what `select_token_slots(..., ahead=)` emits).

Newcomers N_{t+1} = S_{t+1} minus S_t: the rows a cache holding S_t misses. Predictors issued at step t:
  near_P     the next P candidates below the cut-off (P in --ps);
  new_blocks every row of the blocks that entered M_t (M_t minus M_{t-1}) not in S_t;
and coverage = |N_{t+1} n prediction_t| / |N_{t+1}|, pooled over layers, heads, steps and texts (row-weighted).
Cache view: the server's 8-way host-row cache (R = --lines rows per layer and KV head, set = position mod R / 8,
the lookup's policy, offload/reference.py) with every row a host row, without and with the near_P prefetch
(host_prefetch's policy), and with the step's own selected rows the lookup left uncached fetched too ("_lag", what
`--asynctls-host-prefetch-rows P` does; P = 0 with the lag is not a server setting): hit rate, rows fetched ahead
per step and head, share of them later read.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fidelity as harness  # noqa: E402  benchmarks/fidelity.py: the same Runner (model, channels, budgets)
from sglang_asynctls import calibrate  # noqa: E402
from sglang_asynctls import fidelity as fd  # noqa: E402
from sglang_asynctls import reference as ref  # noqa: E402

WAYS = 8


@contextlib.contextmanager
def capture(max_ahead: int):
    """Per reference selection, in call order (step-major, then layer): ("blocks", [Hkv] sets) from coarse_select
    and ("tokens", [Hkv] (selected positions, near-miss positions in rank order)) from select_tokens (batch row 0)."""
    seen = []
    inner_tokens, inner_blocks = ref.select_tokens, ref.coarse_select

    def blocks(*args, **kwargs):
        out = inner_blocks(*args, **kwargs)
        seen.append(("blocks", [set(x for x in row.tolist() if x >= 0) for row in out[0]]))
        return out

    def tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window):
        out = inner_tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
        wide = inner_tokens(scores, positions, seq_lens, token_budget + max_ahead, sink_tokens, local_window)
        heads = []
        for h in range(out.shape[1]):
            sel = out[0, h][out[0, h] >= 0].numpy()
            near = wide[0, h, token_budget:]
            near = near[near >= 0].numpy()
            heads.append((sel, near[~np.isin(near, sel)]))  # a tie may rank differently at another k
        seen.append(("tokens", heads))
        return out

    ref.select_tokens, ref.coarse_select = tokens, blocks
    try:
        yield seen
    finally:
        ref.select_tokens, ref.coarse_select = inner_tokens, inner_blocks


def coverage(steps: list, ps, block_size: int) -> dict:
    """steps: per step t of one (layer, KV head), (S_t positions, near-miss positions in rank order, M_t set).
    Row counts over t = 1..T-1 of newcomers and of those each predictor issued at t - 1 holds, and its size."""
    c = {"newcomers": 0, "selected": 0, "new_blocks_hit": 0, "new_blocks_rows": 0, "candidates_hit": 0,
         **{f"near_{p}_hit": 0 for p in ps}, **{f"near_{p}_rows": 0 for p in ps},
         **{f"near_{p}_or_blocks_hit": 0 for p in ps}}
    for t in range(1, len(steps)):
        (sel0, near0, m0), (sel1, _, _) = steps[t - 1], steps[t]
        new = np.setdiff1d(sel1, sel0)
        c["newcomers"] += len(new)
        c["selected"] += len(sel1)
        m_prev = steps[t - 2][2] if t >= 2 else m0
        entered = sorted(m0 - m_prev)
        rows = (np.array([b * block_size + i for b in entered for i in range(block_size)], np.int64)
                if entered else np.zeros(0, np.int64))
        rows = np.setdiff1d(rows, sel0)
        c["new_blocks_rows"] += len(rows)
        c["new_blocks_hit"] += len(np.intersect1d(new, rows))
        cand = np.array([b * block_size + i for b in m0 for i in range(block_size)], np.int64)
        c["candidates_hit"] += len(np.intersect1d(new, cand))  # any near-miss list's ceiling
        for p in ps:
            pred = near0[:p]
            c[f"near_{p}_rows"] += len(pred)
            c[f"near_{p}_hit"] += len(np.intersect1d(new, pred))
            c[f"near_{p}_or_blocks_hit"] += len(np.intersect1d(new, np.union1d(pred, rows)))
    return c


class Cache:
    """The host-row cache of one (layer, KV head) with the lookup's and host_prefetch's policies
    (offload/reference.py), positions as slots."""

    def __init__(self, lines: int):
        self.sets = lines // WAYS
        self.tag = np.full((self.sets, WAYS), -1, np.int64)
        self.stamp = np.full((self.sets, WAYS), -1, np.int64)
        self.fetched = np.zeros((self.sets, WAYS), bool)

    def _find(self, pos):
        s = pos % self.sets
        match = self.tag[s] == pos[:, None]
        return s, match.any(1), match.argmax(1)

    def _lru_order(self, s, now):
        key = np.where(self.stamp[s] != now, (self.stamp[s] + 1) * WAYS + np.arange(WAYS), np.iinfo(np.int64).max)
        return np.argsort(key, axis=1, kind="stable"), (self.stamp[s] != now).sum(1)

    def lookup(self, pos, now) -> tuple:
        """pos ascending (candidate order). Returns (hits, hits on lines fetched ahead, the positions read
        uncached: misses that took no line)."""
        s, hit, way = self._find(pos)
        self.stamp[s[hit], way[hit]] = now
        ahead = int(self.fetched[s[hit], way[hit]].sum())
        self.fetched[s[hit], way[hit]] = False
        miss_s, miss_p = s[~hit], pos[~hit]
        uniq, last = np.unique(miss_s[::-1], return_index=True)  # per set its highest-index miss fills
        filled = np.zeros(0, np.int64)
        if len(uniq):
            fill_p = miss_p[::-1][last]
            order, free = self._lru_order(uniq, now)
            ok = free > 0
            w = order[ok, 0]
            self.tag[uniq[ok], w], self.stamp[uniq[ok], w], self.fetched[uniq[ok], w] = fill_p[ok], now, False
            filled = fill_p[ok]
        return int(hit.sum()), ahead, np.setdiff1d(miss_p, filled)

    def prefetch(self, pos, now) -> int:
        """pos: the entries in order; by descending entry, the k-th uncached row of a set takes its k-th least
        recently used line not stamped now (host_prefetch's claim rounds)."""
        s, cached, _ = self._find(pos[::-1])
        pos = pos[::-1]
        s, p = s[~cached], pos[~cached]
        if not len(s):
            return 0
        o = np.argsort(s, kind="stable")
        s, p = s[o], p[o]
        uniq, first, inv = np.unique(s, return_index=True, return_inverse=True)
        rank = np.arange(len(s)) - first[inv]
        order, free = self._lru_order(uniq, now)
        ok = rank < free[inv]
        w = order[inv[ok], rank[ok]]
        self.tag[s[ok], w], self.stamp[s[ok], w], self.fetched[s[ok], w] = p[ok], now, True
        return int(ok.sum())


def simulate(steps: list, lines: int, p: int, seq0: int, lag: bool = False) -> dict:
    """Cache counts over steps 1..T-1 (step 0 fills it) with a near_p prefetch after each lookup (p = 0: none);
    lag: the prefetch also takes the step's own selected rows that the lookup left uncached (the one-step lag: one
    fill per set and step), after the near-misses in entry order (so first in their sets), as the server does."""
    cache = Cache(lines)
    c = {"lookups": 0, "hits": 0, "fetched": 0, "ahead_hits": 0}
    for t, (sel, near, _) in enumerate(steps):
        now = seq0 + t + 1
        hits, ahead, uncached = cache.lookup(np.sort(sel), now)
        if t:
            c["lookups"] += len(sel)
            c["hits"] += hits
            c["ahead_hits"] += ahead
        ahead = np.concatenate([np.sort(near[:p]), uncached]) if lag else np.sort(near[:p])
        if len(ahead) and t < len(steps) - 1:
            c["fetched"] += cache.prefetch(ahead, now)
    return c


def run_text(runner, module: str, args, ps) -> list:
    """Per (layer, KV head) of one text: its steps [(S_t, near-misses, M_t)]."""
    ids = torch.tensor(runner.tok(calibrate.stdlib_source(module)).input_ids[: args.context])
    if len(ids) < args.context:
        raise SystemExit(f"{module} has only {len(ids)} tokens; pick --context <= that")
    budget = runner.budget(args.context, args.fraction)
    kv = fd.DocumentKV(runner.model, ids[:-1], runner.channels, extra=args.steps + 1, block_size=budget.block_size)
    with capture(max(ps)) as seen:
        fd.generate(runner.model, kv, int(ids[-1]), budget, "asynctls", args.steps)
    layers = runner.model.shape.num_layers
    blocks = [x for kind, x in seen if kind == "blocks"]
    tokens = [x for kind, x in seen if kind == "tokens"]
    assert len(blocks) == len(tokens) == layers * args.steps
    heads = len(tokens[0])
    return [[[(tokens[t * layers + i][h][0], tokens[t * layers + i][h][1], blocks[t * layers + i][h])
              for t in range(args.steps)] for h in range(heads)] for i in range(layers)], len(ids) - 1


def summarize(per_layer_counts: list, sims: dict, ps) -> dict:
    tot = {k: sum(c[k] for c in per_layer_counts) for k in per_layer_counts[0]}
    n = max(tot["newcomers"], 1)
    out = {"newcomer_share_of_selected": round(tot["newcomers"] / max(tot["selected"], 1), 4),
           "coverage": {f"near_{p}": round(tot[f"near_{p}_hit"] / n, 4) for p in ps},
           "coverage_new_blocks": round(tot["new_blocks_hit"] / n, 4),
           "coverage_near_or_new_blocks": {f"near_{p}": round(tot[f"near_{p}_or_blocks_hit"] / n, 4) for p in ps},
           "coverage_ceiling_candidates_of_M_t": round(tot["candidates_hit"] / n, 4),
           "predicted_rows_per_step_head": {**{f"near_{p}": round(tot[f"near_{p}_rows"] / len(per_layer_counts)
                                                                   / STEPS_SEEN[0], 1) for p in ps},
                                            "new_blocks": round(tot["new_blocks_rows"] / len(per_layer_counts)
                                                                / STEPS_SEEN[0], 1)},
           "cache": {}}
    for name, cs in sims.items():
        t = {k: sum(c[k] for c in cs) for k in cs[0]}
        out["cache"][name] = {
            "hit_rate": round(t["hits"] / max(t["lookups"], 1), 4),
            "misses_per_step_head": round((t["lookups"] - t["hits"]) / len(cs) / STEPS_SEEN[0], 2),
            "fetched_per_step_head": round(t["fetched"] / len(cs) / STEPS_SEEN[0], 2),
            "fetched_later_read": round(t["ahead_hits"] / max(t["fetched"], 1), 4)}
    return out


STEPS_SEEN = [1]  # steps counted per (layer, head) sequence (T - 1), set by main


def plot(result: dict, path: Path, ps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    cov = [s["coverage"][f"near_{p}"] for p in ps]
    both = [s["coverage_near_or_new_blocks"][f"near_{p}"] for p in ps]
    axes[0].plot(ps, cov, "o-", label="near-misses (next P below the k_t cut-off)")
    axes[0].plot(ps, both, "s--", label="near-misses + rows of newly entered blocks")
    axes[0].axhline(s["coverage_ceiling_candidates_of_M_t"], color="#888", ls=":", label="ceiling: candidates of M_t")
    axes[0].set_xlabel("P")
    axes[0].set_ylabel("share of step t+1's newcomers")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    axes[0].set_title("predictor coverage", fontsize=9)
    hit = [s["cache"][f"prefetch_{p}"]["hit_rate"] for p in ps]
    hit_lag = [s["cache"][f"prefetch_{p}_lag"]["hit_rate"] for p in ps]
    fetched = [s["cache"][f"prefetch_{p}"]["fetched_per_step_head"] for p in ps]
    axes[1].plot(ps, hit, "o-", color="#2a7", label="near-misses")
    axes[1].plot(ps, hit_lag, "s--", color="#a72", label="+ the step's unfilled rows (lag)")
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].set_xlabel("P")
    axes[1].set_ylabel("host-row cache hit rate", color="#2a7")
    ax2 = axes[1].twinx()
    ax2.bar(ps, fetched, width=20, alpha=0.3, color="#27a")
    ax2.set_ylabel("rows fetched ahead / step / layer / KV head", color="#27a")
    axes[1].set_title(f"8-way cache, R = {result['config']['lines']} rows", fontsize=9)
    c = result["config"]
    fig.suptitle(f"SmolLM2 on CPU, {c['context']} tokens, {c['steps']} steps, {c['modules']} (CPU measurement)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/prefetch_coverage_smollm2_cpu.json")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--fraction", type=int, default=8)
    p.add_argument("--modules", default="typing.py,inspect.py", help="evaluation stdlib files, comma-separated")
    p.add_argument("--ps", default="0,64,128,256", help="near-miss counts P to measure")
    p.add_argument("--lines", type=int, default=2048, help="host-row cache rows R per layer and KV head")
    p.add_argument("--harness-args", default="", help="more benchmarks/fidelity.py flags")
    args = p.parse_args(argv)
    ps = [int(x) for x in args.ps.split(",")]
    h = harness.build_parser().parse_args(args.harness_args.split())
    start = time.time()
    runner = harness.Runner(h)
    STEPS_SEEN[0] = args.steps - 1
    counts, sims, per_layer = [], {f"prefetch_{q}{lag}": [] for q in ps for lag in ("", "_lag")}, []
    for module in args.modules.split(","):
        traces, seq0 = run_text(runner, module, args, ps)
        for i, heads in enumerate(traces):
            layer = [coverage(steps, ps, h.block_size) for steps in heads]
            counts += layer
            for q in ps:
                sims[f"prefetch_{q}"] += [simulate(steps, args.lines, q, seq0) for steps in heads]
                sims[f"prefetch_{q}_lag"] += [simulate(steps, args.lines, q, seq0, lag=True) for steps in heads]
            tot = {k: sum(c[k] for c in layer) for k in layer[0]}
            per_layer.append({"module": module, "layer": i, "newcomers_per_step_head":
                              round(tot["newcomers"] / len(heads) / STEPS_SEEN[0], 1),
                              **{f"coverage_near_{q}": round(tot[f"near_{q}_hit"] / max(tot["newcomers"], 1), 4)
                                 for q in ps}})
    result = {"benchmark": "prefetch_coverage", "machine": "CPU (a CPU measurement: selections of the reference "
              "path on real SmolLM2 weights; no GPU timing)", "command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **harness.versions(),
              "config": {**vars(args), "resolved_layer_schedule": runner.schedule,
                         "layer_budgets": runner.budget(args.context, args.fraction).layer_budgets,
                         "wall_s": round(time.time() - start, 1)},
              "definitions": {"newcomers": "rows selected at step t+1 and not at step t (sinks and window "
                                           "included in both selections)",
                              "coverage": "newcomers of step t+1 inside the prediction made at step t, row-weighted",
                              "cache": "every selected row treated as a host row; step 0 only fills the cache"},
              "summary": summarize(counts, sims, ps), "per_layer": per_layer}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"), ps)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
