"""serve_bench.py's summary: per-method rows, the ratios asynctls / stock default the issue asks for, and a plot.

Ratios are taken only between runs of one lease (the files in one --dir); a missing run leaves its keys null.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

from serve_bench import METRICS, WORKLOADS


def _runs(directory: str) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        state = json.load(open(path))
        if "label" in state and "server_cmd" in state:
            runs[state["label"]] = state
    return runs


def _metric(run: dict, workload: str, key: str):
    row = (run or {}).get("workloads", {}).get(workload, {})
    return row.get(key) if row.get("returncode") == 0 else None


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def _prefill_ratio(one_batch_path, ours: str, baseline: str):
    """bench_one_batch prefill of 2 x 98,304 tokens, ours / baseline (e2e_throughput.py rows)."""
    if not one_batch_path or not os.path.exists(one_batch_path):
        return None, []
    rows = [json.loads(line) for line in open(one_batch_path) if line.strip()]
    pick = lambda m: next((r.get("prefill_latency_s") for r in reversed(rows)  # noqa: E731
                           if r["method"] == m and r["batch"] == 2 and r["input_len"] == 98304), None)
    return _ratio(pick(ours), pick(baseline)), rows


def _parity(ours: dict, base: dict) -> dict:
    a, b = (ours or {}).get("parity"), (base or {}).get("parity")
    if not a or not b:
        return {"short_identical": None}
    same = [x == y for x, y in zip(a["short"], b["short"])]
    return {"short_identical": sum(same), "short_total": len(same), "long_identical": a["long"] == b["long"],
            "long_first_diverging_token": next((i for i, (x, y) in enumerate(zip(a["long"], b["long"])) if x != y),
                                               None)}


def summarize(args) -> None:
    runs = _runs(args.dir)
    ours, base = runs.get(args.ours), runs.get(args.baseline)
    rows = [{"method": label, "workload": w, **{k: _metric(run, w, k) for k in METRICS}}
            for label, run in runs.items() for w in WORKLOADS if w in run.get("workloads", {})]
    e2e = {w: _ratio(_metric(ours, w, "median_e2e_latency_ms"), _metric(base, w, "median_e2e_latency_ms"))
           for w in WORKLOADS}
    ttft = [_ratio(_metric(ours, w, "median_ttft_ms"), _metric(base, w, "median_ttft_ms")) for w in WORKLOADS]
    tok_s = {w: _ratio(_metric(ours, w, "output_throughput"), _metric(base, w, "output_throughput"))
             for w in WORKLOADS}
    prefill, one_batch_rows = _prefill_ratio(args.one_batch, args.ours, args.baseline)
    # free memory at ready: from the runs, or from servers started again in --memory-dir (after a sizing fix)
    memory_runs = _runs(args.memory_dir) if args.memory_dir else runs
    free = {label: run.get("gpu_free_gib_at_ready") for label, run in memory_runs.items()}
    summary = {"baseline_backend": args.baseline,
               **{f"{w}_e2e_ratio": e2e[w] for w in WORKLOADS},
               "ttft_ratio_max": max((t for t in ttft if t is not None), default=None),
               "w2_output_tok_s_ratio": tok_s["w2"], "w3_output_tok_s_ratio": tok_s["w3"],
               "w1_output_tok_s_ratio": tok_s["w1"], "prefill_ratio_96k_b2": prefill,
               "gpu_free_gib_at_ready": free, "gpu_free_source": args.memory_dir or args.dir,
               "free_mem_gap_gib": (round(free[args.baseline] - free[args.ours], 2)
                                    if free.get(args.baseline) is not None and free.get(args.ours) is not None
                                    else None),
               "parity_vs_baseline": _parity(ours, base)}
    any_run = next(iter(runs.values()), {})
    result = {"benchmark": "serve_bench", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              **{k: any_run.get(k) for k in ("gpu", "gpu_count", "torch", "triton", "sglang", "sglang-asynctls")},
              "config": {"workloads": {w: dict(zip(("requests", "input_len", "output_len", "concurrency"), v))
                                       for w, v in WORKLOADS.items()},
                         "server_cmds": {label: run["server_cmd"] for label, run in runs.items()}},
              "rows": rows, "summary": summary, "runs": runs, "one_batch_rows": one_batch_rows,
              "memory_runs": memory_runs if args.memory_dir else None, "note": args.note}
    json.dump(result, open(args.json, "w"), indent=1)
    _plot(rows, os.path.splitext(args.json)[0] + ".png", result.get("gpu") or "?")
    print(json.dumps(summary, indent=1))


def _plot(rows, path: str, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, [("median_e2e_latency_ms", "median E2E latency (s)"),
                                       ("median_ttft_ms", "median TTFT (s)"),
                                       ("output_throughput", "output tok/s")]):
        for i, m in enumerate(methods):
            ys = [next((r[key] for r in rows if r["method"] == m and r["workload"] == w), None) or 0
                  for w in WORKLOADS]
            ys = [y / 1000 for y in ys] if key.endswith("_ms") else ys
            ax.bar([j + i * 0.8 / len(methods) for j in range(len(WORKLOADS))], ys, 0.8 / len(methods), label=m)
        ax.set_xticks([j + 0.4 - 0.4 / len(methods) for j in range(len(WORKLOADS))])
        ax.set_xticklabels([f"{w}: {n} x {il // 1024}k\n-> {ol}, c {c}" for w, (n, il, ol, c) in WORKLOADS.items()],
                           fontsize=8)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"sglang.bench_serving, dummy Qwen3-8B, {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
