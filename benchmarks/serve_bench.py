"""Served requests, the figure users judge us by: a real `sglang.launch_server` per method, driven by SGLang's own
`sglang.bench_serving` (benchmarks/../shared BENCHMARKS.md "Served requests").

Per method (stock's default backend, stock FlashInfer, --enable-asynctls; same model and flags otherwise), on the
GPU host, one call each so no single command outlives the device's per-command limit:
    python3 benchmarks/serve_bench.py start --label fa3 --dir /root/sb -- --attention-backend fa3
    python3 benchmarks/serve_bench.py parity --label fa3 --dir /root/sb
    python3 benchmarks/serve_bench.py workload --label fa3 --dir /root/sb --name w1      # w2, w3
    python3 benchmarks/serve_bench.py stop --label fa3 --dir /root/sb
then, anywhere:
    python3 benchmarks/serve_bench.py summarize --dir DIR --baseline fa3 --ours asynctls \\
        --json benchmarks/results/serve_bench_h200.json
`start` detaches the server (its own session), so it outlives the call that started it; every step appends to
DIR/LABEL.json. Prompts are random token ids (`--dataset-name random-ids --tokenize-prompt`) over the dummy model's
full vocabulary (benchmarks/gpu/qwen3_dummy_dir.py), so no two share a prefix by accident.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from host_env import environment

PORT = 31300
MODEL = os.environ.get("SERVE_BENCH_MODEL", "/root/qwen3_8b_fullvocab")
COMMON = ["--load-format", "dummy", "--host", "127.0.0.1", "--port", str(PORT), "--cuda-graph-max-bs", "16"]
# (requests, input tokens, output tokens, concurrency): the W1 RAG, W2 chat/agent, W3 long generation
WORKLOADS = {"w1": (16, 98304, 128, 4), "w2": (32, 49152, 1024, 8), "w3": (16, 32768, 4096, 16)}
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


def _generate(input_ids, new_tokens: int) -> list:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0,
                                                        "ignore_eos": True}}
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=600).read())
    return out["output_ids"]


def parity(args) -> None:
    """Greedy output ids of 8 short prompts (dense under asynctls) and one 40k prompt (sparse), fixed seeds."""
    import random

    rng = random.Random(0)
    short = [[rng.randrange(1000, 150000) for _ in range(rng.randrange(20, 2000))] for _ in range(8)]
    long_prompt = [rng.randrange(1000, 150000) for _ in range(40000)]
    t0 = time.time()
    state = _state(args)
    state["parity"] = {"short": [_generate(p, 32) for p in short], "long": _generate(long_prompt, 32),
                       "seconds": round(time.time() - t0, 1)}
    _save(args, state)
    print(f"{args.label} parity prompts done in {time.time() - t0:.0f} s")


def workload(args) -> None:
    if not _healthy():
        raise SystemExit(f"{args.label}: the server is not answering; see {args.label}_server.log")
    n, il, ol, conc = WORKLOADS[args.name]
    out_file = os.path.join(args.dir, f"{args.label}_{args.name}.jsonl")
    if os.path.exists(out_file):
        os.remove(out_file)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_serving_offline.py"),
           "--backend", "sglang", "--host", "127.0.0.1", "--port",
           str(PORT), "--model", args.model, "--tokenizer", args.model, "--dataset-name", "random-ids",
           "--tokenize-prompt", "--random-input-len", str(il), "--random-output-len", str(ol),
           "--random-range-ratio", "1", "--num-prompts", str(n), "--max-concurrency", str(conc),
           "--output-file", out_file, "--flush-cache", "--seed", "1"]
    t0 = time.time()
    mark = sum(1 for _ in open(os.path.join(args.dir, f"{args.label}_server.log")))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    state = _state(args)
    row = {"name": args.name, "requests": n, "input_len": il, "output_len": ol, "concurrency": conc,
           "command": " ".join(cmd), "wall_s": round(time.time() - t0, 1), "returncode": proc.returncode}
    if proc.returncode == 0 and os.path.exists(out_file):
        result = json.loads(open(out_file).read().strip().splitlines()[-1])
        row.update({k: result.get(k) for k in METRICS})
    else:
        row["error"] = (proc.stdout + proc.stderr)[-3000:]
    log = list(open(os.path.join(args.dir, f"{args.label}_server.log")))[mark:]
    row["decode_log"] = [ln.strip()[:240] for ln in log if "Decode batch" in ln][-6:]
    row["prefill_log"] = [ln.strip()[:240] for ln in log if "Prefill batch" in ln][-3:]
    state.setdefault("workloads", {})[args.name] = row
    _save(args, state)
    print(json.dumps({k: row.get(k) for k in ("name", "wall_s", "returncode", *METRICS)}))


def stop(args) -> None:
    pid = _state(args).get("pid")
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
            time.sleep(8)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"{args.label} stopped")


def main():
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
        from serve_bench_report import summarize

        summarize(args)
    else:
        {"start": start, "parity": parity, "workload": workload, "stop": stop}[args.cmd](args)


if __name__ == "__main__":
    main()
