"""MLA under a fa3 or FlashInfer inner backend: the same greedy answers as the stock backend of that name, and its
prefill, on a dummy GLM-4.7-Flash-shaped model (`benchmarks/gpu/model_dirs.py glm --layers 8`).

On the GPU host (docs/gpu_host.md), each step one device call:
    bash benchmarks/gpu/host.sh mla-parity fa3             # stock fa3, then --enable-asynctls with fa3 inside
    bash benchmarks/gpu/host.sh mla-one-batch fa3 asynctls  # bench_one_batch, 2 x 98,304
then, with the returned files in one directory:
    python3 benchmarks/mla_inner.py summarize --dir DIR --json benchmarks/results/mla_inner_h200.json
A pair counts only when both servers ran in the same lease (the files of one --dir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from serve_bench import parity_match, runs_in

INNERS = ("fa3", "flashinfer", "triton")


def _one_batch(path: str) -> dict:
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    return {r["method"]: r for r in rows if r.get("rc") == 0}


def summarize(args) -> None:
    runs = runs_in(args.dir)
    pairs = {i: {"parity": parity_match(runs[f"asynctls_{i}"], runs[i]),
                 "ready_s": {i: runs[i].get("ready_s"), "asynctls": runs[f"asynctls_{i}"].get("ready_s")},
                 "gpu_free_gib_at_ready": {i: runs[i].get("gpu_free_gib_at_ready"),
                                           "asynctls": runs[f"asynctls_{i}"].get("gpu_free_gib_at_ready")}}
             for i in INNERS if i in runs and f"asynctls_{i}" in runs}
    ob = _one_batch(os.path.join(args.dir, "one_batch.jsonl"))
    ratio = lambda key, base: (round(ob["asynctls"][key] / ob[base][key], 4)  # noqa: E731
                               if "asynctls" in ob and base in ob else None)
    summary = {}
    for i, p in pairs.items():
        summary[f"{i}_short_identical"] = f"{p['parity']['short_identical']}/{p['parity'].get('short_total')}"
        summary[f"{i}_short_logprob_max_abs_diff"] = p["parity"].get("short_logprob_max_abs_diff")
    summary.update({"prefill_ratio_2x98k_vs_fa3": ratio("prefill_latency_s", "fa3"),
                    "decode_step_ratio_2x98k_vs_fa3": ratio("median_decode_latency_s", "fa3")})
    any_run = next(iter(runs.values()), {})
    result = {"benchmark": "mla_inner", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              **{k: any_run.get(k) for k in ("gpu", "torch", "triton", "sglang", "sglang-asynctls")},
              "model": "GLM-4.7-Flash shape cut to 8 layers (benchmarks/gpu/model_dirs.py glm), dummy weights",
              "server_cmds": {label: run.get("server_cmd") for label, run in runs.items()},
              "summary": summary, "pairs": pairs, "one_batch_rows": list(ob.values()), "note": args.note}
    json.dump(result, open(args.json, "w"), indent=1)
    if ob:
        _plot(ob, os.path.splitext(args.json)[0] + ".png", result.get("gpu") or "?")
    print(json.dumps(summary, indent=1))


def _plot(ob: dict, path: str, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted(ob)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (key, title, scale) in zip(axes, [("prefill_latency_s", "prefill, 2 x 98,304 (s)", 1),
                                              ("median_decode_latency_s", "decode step (ms)", 1000)]):
        ax.bar(methods, [ob[m][key] * scale for m in methods])
        ax.set_title(title)
    fig.suptitle(f"bench_one_batch, dummy GLM-4.7-Flash (8 layers), {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    s = p.add_subparsers(dest="cmd", required=True).add_parser("summarize")
    s.add_argument("--dir", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--note", default="")
    summarize(p.parse_args())


if __name__ == "__main__":
    main()
