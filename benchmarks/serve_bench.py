"""Served requests, the figure users judge us by: a real `sglang.launch_server` per method, driven by SGLang's own
`sglang.bench_serving`.

Per method (stock's default backend, stock FlashInfer, --enable-asynctls; same model and flags otherwise), on the
GPU host, one call each so no single command outlives the device's per-command limit:
    python3 benchmarks/serve_bench.py start --label fa3 --dir /root/sb -- --attention-backend fa3
    python3 benchmarks/serve_bench.py parity --label fa3 --dir /root/sb
    python3 benchmarks/serve_bench.py workload --label fa3 --dir /root/sb --name w1      # w2, w3
    python3 benchmarks/serve_bench.py stop --label fa3 --dir /root/sb
then, anywhere (ratios only between runs of one lease, the files of one --dir):
    python3 benchmarks/serve_bench.py summarize --dir DIR --baseline fa3 --ours asynctls \\
        --json benchmarks/results/serve_bench_h200.json
`start` detaches the server (its own session), so it outlives the call that started it; every step appends to
DIR/LABEL.json. Prompts are random token ids (`--dataset-name random-ids --tokenize-prompt`) over the dummy model's
full vocabulary (`benchmarks/gpu/model_dirs.py qwen3`), so no two share a prefix by accident.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from server_parity import environment

PORT = 31300
MODEL = os.environ.get("SERVE_BENCH_MODEL", "/root/qwen3_8b_fullvocab")
COMMON = ["--load-format", "dummy", "--host", "127.0.0.1", "--port", str(PORT), "--cuda-graph-max-bs", "16"]
# (requests, input tokens, output tokens, concurrency): the W1 RAG, W2 chat/agent, W3 long generation
WORKLOADS = {"w1": (16, 98304, 128, 4), "w2": (32, 49152, 1024, 8), "w3": (16, 32768, 4096, 16)}
STOP_GRACE_S = 8  # SIGTERM, then SIGKILL for what is left of the server's process group
METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "median_e2e_latency_ms", "request_throughput",
           "output_throughput", "duration", "completed")
LOG_LINES = re.compile(r"max_total_num_tokens|KV Cache is allocated|avail mem|Capture cuda graph end|asynctls backend"
                       r"|asynctls: the index|Attention backend|Traceback|Error")


def _state(args) -> dict:
    path = os.path.join(args.dir, f"{args.label}.json")
    return json.load(open(path)) if os.path.exists(path) else {"label": args.label}


def _save(args, state: dict) -> None:
    os.makedirs(args.dir, exist_ok=True)
    json.dump(state, open(os.path.join(args.dir, f"{args.label}.json"), "w"), indent=1)


def _gpu_free_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return round(int(out[0]) / 1024, 2) if out else float("nan")


def _healthy() -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5)
        return True
    except Exception:
        return False


def start(args) -> None:
    flags = [x for x in args.server_args if x != "--"]
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model, *COMMON, *flags]
    log_path = os.path.join(args.dir, f"{args.label}_server.log")
    os.makedirs(args.dir, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:  # its own session: it lives on after this command returns
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while not _healthy():
        if proc.poll() is not None or time.time() - t0 > args.ready_timeout:
            tail = open(log_path).read()[-3000:]
            _save(args, {**_state(args), "server_cmd": cmd, "start_error": tail})
            raise SystemExit(f"server {args.label} did not become ready:\n{tail}")
        time.sleep(2)
    lines = [ln.strip()[:300] for ln in open(log_path) if LOG_LINES.search(ln)]
    _save(args, {"label": args.label, "server_cmd": cmd, "pid": proc.pid, "ready_s": round(time.time() - t0, 1),
                 "gpu_free_gib_at_ready": _gpu_free_gib(), "server_log_lines": lines[-40:], **environment()})
    print(f"{args.label} ready in {time.time() - t0:.0f} s, {_gpu_free_gib()} GiB free")


def _generate(input_ids, new_tokens: int, logprobs: bool = False):
    """Greedy output ids; with logprobs, (ids, the chosen tokens' logprobs)."""
    body = {"input_ids": input_ids, "return_logprob": logprobs,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=600).read())
    if not logprobs:
        return out["output_ids"]
    return out["output_ids"], [lp for lp, *_ in out["meta_info"]["output_token_logprobs"]]


def parity(args) -> None:
    """Greedy output ids of 8 short prompts (dense under asynctls) and one 40k prompt (sparse), fixed seeds, and
    the short ones' logprobs. On dummy weights both are weak evidence: the logits are near uniform, and asynctls
    (fa3 inside) matched stock FlashInfer's logprobs exactly too (serve_bench_flashinfer_h200.json); real-weight
    parity is server_parity.py's."""
    import random

    rng = random.Random(0)
    short = [[rng.randrange(1000, 150000) for _ in range(rng.randrange(20, 2000))] for _ in range(8)]
    long_prompt = [rng.randrange(1000, 150000) for _ in range(40000)]
    t0 = time.time()
    state = _state(args)
    answers = [_generate(p, 32, logprobs=True) for p in short]
    state["parity"] = {"short": [ids for ids, _ in answers], "short_logprobs": [lps for _, lps in answers],
                       "long": _generate(long_prompt, 32), "seconds": round(time.time() - t0, 1)}
    _save(args, state)
    print(f"{args.label} parity prompts done in {time.time() - t0:.0f} s")


def workload(args) -> None:
    if not _healthy():
        raise SystemExit(f"{args.label}: the server is not answering; see {args.label}_server.log")
    n, il, ol, conc = WORKLOADS[args.name]
    out_file = os.path.join(args.dir, f"{args.label}_{args.name}.jsonl")
    if os.path.exists(out_file):
        os.remove(out_file)
    cmd = [sys.executable, os.path.abspath(__file__), "drive", "--backend", "sglang", "--host", "127.0.0.1", "--port",
           str(PORT), "--model", args.model, "--tokenizer", args.model, "--dataset-name", "random-ids",
           "--tokenize-prompt", "--random-input-len", str(il), "--random-output-len", str(ol),
           "--random-range-ratio", "1", "--num-prompts", str(n), "--max-concurrency", str(conc),
           "--output-file", out_file, "--flush-cache", "--seed", "1"]
    t0 = time.time()
    marks = {path: sum(1 for _ in open(path)) for path in _server_logs(args)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    state = _state(args)
    row = {"name": args.name, "requests": n, "input_len": il, "output_len": ol, "concurrency": conc,
           "command": " ".join(cmd), "wall_s": round(time.time() - t0, 1), "returncode": proc.returncode}
    if proc.returncode == 0 and os.path.exists(out_file):
        result = json.loads(open(out_file).read().strip().splitlines()[-1])
        row.update({k: result.get(k) for k in METRICS})
    else:
        row["error"] = (proc.stdout + proc.stderr)[-3000:]
    log = [line for path, mark in marks.items() for line in list(open(path))[mark:]]
    row["decode_log"] = [ln.strip()[:240] for ln in log if "Decode batch" in ln][-6:]
    row["prefill_log"] = [ln.strip()[:240] for ln in log if "Prefill batch" in ln][-3:]
    state.setdefault("workloads", {})[args.name] = row
    _save(args, state)
    print(json.dumps({k: row.get(k) for k in ("name", "wall_s", "returncode", *METRICS)}))


def _server_logs(args) -> list:
    """The server's log; a PD pair (pd_bench.py) logs decode there and prefill beside it."""
    paths = [os.path.join(args.dir, f"{args.label}_{name}.log") for name in ("server", "prefill_server")]
    return [p for p in paths if os.path.exists(p)]


def stop(args) -> None:
    state = _state(args)
    pids = state.get("pids") or [state.get("pid")]  # a PD pair (pd_bench.py): router, decode, prefill
    for pid in filter(None, pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(STOP_GRACE_S)
    for pid in filter(None, pids):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"{args.label} stopped")


def drive(argv) -> None:
    """`python -m sglang.bench_serving ARGV` on hosts without Hugging Face `datasets`: SGLang 0.5.17's bench_serving
    imports `datasets.load_dataset` at import time for its MMMU loader alone, which the random datasets never call;
    where `datasets` is missing, a module whose load_dataset refuses with a clear message stands in."""
    import types

    try:
        import datasets  # noqa: F401
    except ImportError:
        missing = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("Hugging Face `datasets` is not installed on this host; use a random dataset")

        missing.load_dataset = load_dataset
        sys.modules["datasets"] = missing
    from sglang.benchmark.serving import cli_main

    sys.argv = [sys.argv[0], *argv]
    cli_main()


# ---------------------------------------------------------------------------------------------------- the summary
def runs_in(directory: str) -> dict:
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


def parity_match(ours: dict, base: dict) -> dict:
    a, b = (ours or {}).get("parity"), (base or {}).get("parity")
    if not a or not b:
        return {"short_identical": None}
    same = [x == y for x, y in zip(a["short"], b["short"])]
    # over the prompts whose ids agree (None: a run without logprobs)
    diffs = [abs(p - q) for ok, x, y in zip(same, a.get("short_logprobs") or [], b.get("short_logprobs") or [])
             if ok for p, q in zip(x, y) if p is not None and q is not None]
    return {"short_identical": sum(same), "short_total": len(same),
            "short_logprob_max_abs_diff": max(diffs) if diffs else None, "long_identical": a["long"] == b["long"],
            "long_first_diverging_token": next((i for i, (x, y) in enumerate(zip(a["long"], b["long"])) if x != y),
                                               None)}


def summarize(args) -> None:
    runs = runs_in(args.dir)
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
    memory_runs = runs_in(args.memory_dir) if args.memory_dir else runs
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
               "parity_vs_baseline": parity_match(ours, base)}
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


def main():
    if sys.argv[1:2] == ["drive"]:  # bench_serving's own CLI, run by `workload`
        return drive(sys.argv[2:])
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("start", "parity", "workload", "stop"):
        s = sub.add_parser(name)
        s.add_argument("--label", required=True)
        s.add_argument("--dir", required=True)
        s.add_argument("--model", default=MODEL)
        if name == "start":
            s.add_argument("--ready-timeout", type=float, default=420)
            s.add_argument("server_args", nargs=argparse.REMAINDER)
        if name == "workload":
            s.add_argument("--name", choices=sorted(WORKLOADS), required=True)
            s.add_argument("--timeout", type=float, default=560)
    s = sub.add_parser("summarize")
    s.add_argument("--dir", required=True)
    s.add_argument("--baseline", required=True)
    s.add_argument("--ours", default="asynctls")
    s.add_argument("--json", required=True)
    s.add_argument("--one-batch", default=None, help="e2e_throughput.py rows (jsonl) with 2 x 98,304 points")
    s.add_argument("--memory-dir", default=None, help="runs whose free memory at ready the summary reports")
    s.add_argument("--note", default="", help="what a reader must know about these runs")
    args = p.parse_args()
    if args.cmd == "summarize":
        summarize(args)
    else:
        {"start": start, "parity": parity, "workload": workload, "stop": stop}[args.cmd](args)


if __name__ == "__main__":
    main()
