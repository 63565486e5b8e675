"""End-to-end decode throughput: stock SGLang 0.5.17 (flashinfer, triton) vs --enable-asynctls, same install,
same dummy-weight Qwen3-8B, same flags except the attention path (a decode step explains a served result;
it never stands in for it).

    python3 benchmarks/e2e_throughput.py run --methods flashinfer triton asynctls --points 1x32768 2x98304 4x49152
    python3 benchmarks/e2e_throughput.py summarize --json benchmarks/results/e2e_throughput_h100.json
`run` appends one row per (method, batch, input) to RESULTS (jsonl) so a sweep can span several device calls.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from server_parity import version

METHOD_ARGS = {
    "flashinfer": ["--attention-backend", "flashinfer"],
    "triton": ["--attention-backend", "triton"],
    "fa3": ["--attention-backend", "fa3"],
    "asynctls": ["--enable-asynctls"],
}
COMMON = ["--load-format", "dummy", "--mem-fraction-static", "0.6", "--output-len", "32", "--cuda-graph-max-bs", "8"]


PROFILE_STEPS = 3


def one_batch_cmd(method: str, batch: int, input_len: int, model: str, raw: str, extra, common=()) -> list:
    """extra: flags for the asynctls method only; common: flags for every method (e.g. --tp-size), after COMMON
    so they override it."""
    return [sys.executable, os.path.abspath(__file__), "one-batch", "--model-path", model, *COMMON, *common,
            "--batch-size", str(batch), "--input-len", str(input_len), "--result-filename", raw,
            "--run-name", method, *METHOD_ARGS[method], *(extra if method == "asynctls" else [])]


def run_point(method: str, batch: int, input_len: int, model: str, raw: str, timeout: int, extra,
              profile_dir: str = "", common=()) -> dict:
    cmd = one_batch_cmd(method, batch, input_len, model, raw, extra, common)
    prefix = os.path.join(profile_dir, f"{method}_b{batch}_n{input_len}") if profile_dir else ""
    if prefix:  # GPU kernels of 3 decode steps (from step 8), for the step-time breakdown
        cmd += ["--profile", "--profile-stage", "decode", "--profile-activities", "GPU", "--profile-start-step",
                "8", "--profile-steps", str(PROFILE_STEPS), "--profile-prefix", prefix]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    row = {"method": method, "batch": batch, "input_len": input_len, "rc": proc.returncode,
           "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd)}
    lines = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines()
             if ln.startswith(("Prefill.", "Decode.", "Total.")) or "Error" in ln]
    row["log"] = lines[-8:]
    # bench_one_batch runs the point twice in one process (the first as warm-up) and writes the last run's numbers;
    # with --profile-dir the profiled steps fall in that last run, so keep both medians visible
    row["median_decode_latency_runs_s"] = [float(ln.split("median latency:")[1].split()[0]) for ln in lines
                                           if ln.startswith("Decode.") and "median latency:" in ln]
    if proc.returncode == 0 and os.path.exists(raw):
        last = json.loads(open(raw).read().strip().splitlines()[-1])
        row["median_decode_latency_s"] = last.get("median_decode_latency")
        row["median_decode_tok_s"] = last.get("median_decode_throughput")
        row["prefill_latency_s"] = last.get("prefill_latency")
    else:
        row["tail"] = (proc.stdout + proc.stderr)[-3000:]
    if prefix and proc.returncode == 0:
        import glob

        traces = sorted(glob.glob(prefix + "*decode*.trace.json*"))
        row["step_breakdown"] = breakdown(traces[-1], PROFILE_STEPS) if traces else {"error": "no trace written"}
    return row


def cmd_run(args) -> None:
    for method in args.methods:
        for point in args.points:
            b, n = (int(x) for x in point.split("x"))
            row = run_point(method, b, n, args.model, args.raw, args.timeout, args.asynctls_args, args.profile_dir)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k not in ("command", "tail", "step_breakdown")}))
            if "step_breakdown" in row:
                print(json.dumps({k: v for k, v in row["step_breakdown"].items() if k != "top_kernels_us_per_step"}))
            if "tail" in row:
                print(row["tail"][-1500:])


def _ratio(rows, b, n, num, den):
    get = lambda m: next((r.get("median_decode_tok_s") for r in rows  # noqa: E731
                          if r["method"] == m and r["batch"] == b and r["input_len"] == n), None)
    x, y = get(num), get(den)
    return round(x / y, 3) if x and y else None


def cmd_summarize(args) -> None:
    import torch

    rows = [json.loads(ln) for ln in open(args.results)]
    summary = {"decode_speedup_96k_b2": _ratio(rows, 2, 98304, "asynctls", "flashinfer"),
               "decode_speedup_48k_b4": _ratio(rows, 4, 49152, "asynctls", "flashinfer"),
               "decode_speedup_96k_b2_vs_triton": _ratio(rows, 2, 98304, "asynctls", "triton"),
               "decode_speedup_32k_b1": _ratio(rows, 1, 32768, "asynctls", "flashinfer")}
    notes = {}
    if args.soak:  # the soak is a server run of its own (benchmarks/soak.py); its figures join this summary
        soak = json.load(open(args.soak))
        summary.update(soak_requests=soak["requests"], soak_aborted=soak["outcome"]["aborted"],
                       # the index is addressed by KV slot and page and the backend keeps no per-request state,
                       # so the KV slots still in use after the flush are everything that could leak
                       soak_leaked_slots=soak["used_tokens_after_flush"])
        notes["soak"] = {k: soak[k] for k in ("command", "outcome", "seconds", "used_tokens_before_flush",
                                              "used_tokens_after_flush", "leak_warnings_in_log")}
        notes["soak"]["file"] = args.soak
    out = {"benchmark": "e2e_throughput", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           "torch": torch.__version__, "triton": version("triton"), "sglang": version("sglang"),
           "config": {"model": args.model, "common_flags": COMMON}, "rows": rows, "summary": summary,
           "summary_notes": notes}
    json.dump(out, open(args.json, "w"), indent=1)
    _plot(rows, args.json.replace(".json", ".png"))
    print(json.dumps(summary, indent=1))


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({(r["batch"], r["input_len"]) for r in rows})
    methods = sorted({r["method"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ys = [next((r.get("median_decode_tok_s") or 0 for r in rows if r["method"] == m
                    and (r["batch"], r["input_len"]) == p), 0) for p in points]
        ax.bar([j + i * w for j in range(len(points))], ys, w, label=m)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(points))])
    ax.set_xticklabels([f"b{b} x {n // 1024}k" for b, n in points])
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title("Qwen3-8B (dummy weights), SGLang 0.5.17 bench_one_batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------ where a decode step's GPU time goes
# Kernel times from a torch-profiler chrome trace (bench_one_batch --profile --profile-stage decode
# --profile-activities GPU), per step, grouped by what they do. Kernels inside CUDA-graph replays are recorded by
# CUPTI like any other; `idle_us_per_step` is the step's span minus the sum of its kernels (launch gaps, host waits).
# first match wins; names are Triton/CUDA kernel names as the profiler reports them
GROUPS = [
    ("asynctls_index_append", ("_append_decode_index_kernel", "_quantize_labels_kernel")),
    ("asynctls_coarse", ("_block_scores_kernel", "_select_blocks_kernel")),
    ("asynctls_fine", ("_token_logits_kernel", "_token_scores_kernel", "_select_tokens_kernel",
                       "_candidate_slots_kernel")),
    ("asynctls_attention", ("_sparse_decode_kernel", "_splitk_combine_kernel")),
    ("dense_attention", ("_fwd_kernel_stage", "_fwd_grouped_kernel_stage", "BatchDecode", "BatchPrefill",
                         "MergeStates", "create_flashinfer_kv_indices")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitKreduce")),
    ("norm_rope_act", ("rmsnorm", "qknorm", "rope", "act_and_mul", "fused_add")),
    ("kv_store", ("store_kvcache", "set_kv", "write_req_to_token")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def breakdown(path: str, steps: int) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise SystemExit(f"{path}: no GPU kernel events (was --profile-activities GPU given?)")
    by_name, by_group = defaultdict(float), defaultdict(float)
    for e in kernels:
        by_name[e["name"]] += e["dur"]
        by_group[group_of(e["name"])] += e["dur"]
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    busy = sum(by_group.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": steps, "kernel_launches_per_step": round(len(kernels) / steps, 1),
            "kernel_us_per_step": round(busy / steps, 1), "span_us_per_step": round(span / steps, 1),
            "idle_us_per_step": round((span - busy) / steps, 1),
            "groups_us_per_step": {g: round(t / steps, 1) for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "top_kernels_us_per_step": {n[:90]: round(t / steps, 1) for n, t in top}}


def one_batch(argv) -> None:
    """`python -m sglang.bench_one_batch ARGV` with SGLang's plugins loaded first (the stock module does not load
    them), so `--enable-asynctls` and the `--asynctls-*` flags parse."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.benchmark.one_batch import cli_main

    sys.argv = [sys.argv[0], *argv]
    cli_main()


def main():
    if sys.argv[1:2] == ["one-batch"]:
        return one_batch(sys.argv[2:])
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", nargs="+", default=list(METHOD_ARGS))
    r.add_argument("--points", nargs="+", default=["1x32768", "2x98304", "4x49152"])
    r.add_argument("--model", default=os.environ.get("MODEL", "/root/qwen3_8b_dummy"))
    r.add_argument("--results", default="/root/e2e_rows.jsonl")
    r.add_argument("--raw", default="/root/e2e_raw.jsonl")
    r.add_argument("--timeout", type=int, default=420)
    r.add_argument("--asynctls-args", nargs="*", default=[])
    r.add_argument("--profile-dir", default="", help="also profile 3 decode steps; breakdown kept in the row")
    s = sub.add_parser("summarize")
    s.add_argument("--results", default="/root/e2e_rows.jsonl")
    s.add_argument("--model", default=os.environ.get("MODEL", "/root/qwen3_8b_dummy"))
    s.add_argument("--json", required=True)
    s.add_argument("--soak", default="", help="soak.py's JSON: adds the soak_* summary keys")
    t = sub.add_parser("profile", help="the kernel-time breakdown of a decode trace")
    t.add_argument("trace")
    t.add_argument("--steps", type=int, required=True)
    args = p.parse_args()
    if args.cmd == "profile":
        print(json.dumps(breakdown(args.trace, args.steps), indent=1))
    else:
        cmd_run(args) if args.cmd == "run" else cmd_summarize(args)


if __name__ == "__main__":
    main()
