"""How many 96k-token requests one GPU serves at once, stock SGLang against --asynctls-host-kv-gib.

    python3 benchmarks/offload_capacity.py run --label stock --requests 6 --out /root/cap_stock.json \
        -- --attention-backend flashinfer
    python3 benchmarks/offload_capacity.py run --label asynctls_host --requests 12 --out /root/cap_host.json \
        -- --enable-asynctls --asynctls-host-kv-gib 100
    python3 benchmarks/offload_capacity.py summarize /root/cap_stock.json /root/cap_host.json \
        --json benchmarks/results/offload_capacity_h100.json

Prefetch A/B (docs/offload.md "Prefetch"): the same batch all-resident, then offloaded with the prefetch off and on
(`run --scrape-metrics` keeps the server's sglang:asynctls_* gauges too), then

    python3 benchmarks/offload_capacity.py prefetch-ab --resident R.json --off OFF.json --on ON128.json \
        --on ON256.json --json benchmarks/results/prefetch_ab_h200.json

`run` starts a server on the dummy-weight Qwen3-8B (docs/gpu_host.md), sends --requests prompts of
--input-len random token ids at once (greedy, ignore_eos, --output-len new tokens: long enough that the first
request is still decoding when the last one is admitted), and reads the scheduler's own log: the KV capacity it
allocated, the most requests it ran at once (#running-req of its decode batches) and the decode throughput it
reported at that batch. Nothing is estimated: a request that does not fit waits in SGLang's queue.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# the same port, launch flags and readiness probe as the parity runs
from server_parity import PORT, add_run_command, environment, server_flags, stop_server, wait_ready

COMMON = ["--load-format", "dummy", "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(PORT),
          "--context-length", "131072", "--cuda-graph-max-bs", "16"]
DECODE = re.compile(r"Decode batch.*?#running-req: (\d+).*?#token: (\d+).*?gen throughput \(token/s\): ([\d.]+)")
PREFILL = re.compile(r"Prefill batch.*?#new-token: (\d+).*?#running-req: (\d+)")
# the backend's host-read telemetry, logged right after SGLang's decode line (patches/host_read_stats.py)
HOST_READS = re.compile(r"asynctls host reads: rows/step ([\d,]+), host share ([\d.]+), cache hit ([\d.]+), "
                        r"PCIe MB/step ([\d.]+) \((\d+) steps\)")
# the prefetch figures that follow on the same line (servers since --asynctls-host-prefetch-rows)
PREFETCH = re.compile(r"late rows/step ([\d,]+), ahead rows/step ([\d,]+) \(([\d.]+) MB\), ahead used ([\d.]+), "
                      r"block overlap ([\d.]+), stall est ms/step ([\d.]+)")


def host_reads_at(text: str, running: int) -> list:
    """The telemetry lines that follow a decode line of `running` requests: one per log interval."""
    out, last = [], None
    for line in text.splitlines():
        d = DECODE.search(line)
        if d:
            last = int(d.group(1))
            continue
        h = HOST_READS.search(line)
        if h and last == running:
            row = {"rows_per_step": int(h.group(1).replace(",", "")), "host_share": float(h.group(2)),
                   "cache_hit": float(h.group(3)), "pcie_mb_per_step": float(h.group(4)), "steps": int(h.group(5))}
            p = PREFETCH.search(line)
            if p:
                row.update(late_rows_per_step=int(p.group(1).replace(",", "")),
                           ahead_rows_per_step=int(p.group(2).replace(",", "")), ahead_mb_per_step=float(p.group(3)),
                           prefetch_hit_rate=float(p.group(4)), block_overlap=float(p.group(5)),
                           stall_ms_per_step_estimate=float(p.group(6)))
            out.append(row)
    return out


def scrape_asynctls_metrics(port: int = PORT) -> dict:
    """The server's sglang:asynctls_* gauges from /metrics (needs --enable-metrics): name -> value (last sample)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for ln in text.splitlines():
        if ln.startswith("sglang:asynctls_"):
            name, value = ln.rsplit(" ", 1)
            out[name.split("{", 1)[0]] = float(value)
    return out


def _one(input_len: int, output_len: int, seed: int, timeout: float) -> dict:
    rng = random.Random(seed)
    body = {"input_ids": [rng.randint(10, 100000) for _ in range(input_len)],
            "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.time()
    try:
        meta = json.loads(urllib.request.urlopen(req, timeout=timeout).read()).get("meta_info", {})
        return {"ok": True, "completion_tokens": meta.get("completion_tokens"), "e2e_s": round(time.time() - t0, 2)}
    except Exception as e:  # a timeout or a server error is a result too
        return {"ok": False, "error": str(e)[:300], "e2e_s": round(time.time() - t0, 2)}


def parse_log(text: str) -> dict:
    decode = [(int(r), int(t), float(g)) for r, t, g in DECODE.findall(text)]
    prefill = [(int(n), int(r)) for n, r in PREFILL.findall(text)]
    cap = re.search(r"max_total_num_tokens=(\d+)", text)
    host = re.search(r"asynctls host tier: (\d+) KV tokens on the GPU \+ (\d+)", text)
    top = max((r for r, _, _ in decode), default=0)
    at_top = [g for r, _, g in decode if r == top]
    return {"max_total_num_tokens": int(cap.group(1)) if cap else None,
            "device_tokens": int(host.group(1)) if host else None, "host_tokens": int(host.group(2)) if host else 0,
            "max_running_decode": top, "max_running_prefill": max((r for _, r in prefill), default=0),
            "decode_log_lines": len(decode),
            "gen_tok_s_at_max_running": sorted(at_top)[len(at_top) // 2] if at_top else None,
            "gen_tok_s_at_max_running_all": at_top[-20:],
            "max_tokens_in_use": max((t for _, t, _ in decode), default=0),
            "host_reads_at_max_running": host_reads_at(text, top)}


def cmd_run(a) -> None:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", a.model, *COMMON, *a.server_args]
    log_path = a.out + ".log"
    t_start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rec = {"label": a.label, "benchmark_command": "python3 " + " ".join(sys.argv), "command": " ".join(cmd), "requests": a.requests, "input_len": a.input_len,
           "output_len": a.output_len, "environment": environment(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        wait_ready(proc, log_path, a.ready_timeout)
        rec["ready_s"] = round(time.time() - t_start, 1)
        t0 = time.time()
        with ThreadPoolExecutor(a.requests) as ex:
            rec["results"] = list(ex.map(lambda i: _one(a.input_len, a.output_len, i, a.request_timeout),
                                         range(a.requests)))
        rec["wall_s"] = round(time.time() - t0, 1)
        if a.scrape_metrics:
            try:
                rec["metrics_asynctls"] = scrape_asynctls_metrics()
            except Exception as e:  # a server without --enable-metrics: the log line still has every figure
                rec["metrics_asynctls"] = {"error": str(e)[:300]}
    finally:
        stop_server(proc)
    text = open(log_path, errors="replace").read()
    rec.update(parse_log(text))
    rec["log_tail"] = [ln for ln in text.splitlines() if "asynctls" in ln or "Error" in ln][-12:]
    json.dump(rec, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("environment", "results")}, indent=1))


def _versus(stock: dict, run: dict) -> dict:
    """A run's concurrency and decode tok/s at its largest batch, as ratios to the stock run."""
    tok = run["gen_tok_s_at_max_running"]
    return {"label": run["label"], "date": run["date"], "max_running_decode": run["max_running_decode"],
            "gen_tok_s_at_max_running": tok,
            "concurrency_ratio": run["max_running_decode"] / stock["max_running_decode"],
            "aggregate_tok_s_ratio": tok / stock["gen_tok_s_at_max_running"] if tok else None,
            "pcie_bytes_per_step": _median_pcie_bytes(run),
            "cache_hit": [h["cache_hit"] for h in run.get("host_reads_at_max_running", [])]}


def cmd_summarize(a) -> None:
    stock, ours = json.load(open(a.stock)), json.load(open(a.ours))
    extra = {os.path.basename(p): json.load(open(p)) for p in a.extra}
    cmp = _versus(stock, ours)
    out = {"benchmark": "offload_capacity", "command": " ".join(sys.argv),
           "runs": {"stock": stock, "asynctls": ours, **extra},
           "versus_stock": [cmp] + [_versus(stock, r) for r in extra.values()],
           "summary": {"max_concurrent_96k_stock": stock["max_running_decode"],
                       "max_concurrent_96k_asynctls": ours["max_running_decode"],
                       "concurrency_ratio_96k": cmp["concurrency_ratio"],
                       "aggregate_tok_s_ratio_96k": cmp["aggregate_tok_s_ratio"],
                       "stall_share": None,
                       "pcie_bytes_per_step": cmp["pcie_bytes_per_step"]},
           "notes": {"stall_share": "not applicable to the served path: nothing is copied ahead and waited for; the "
                                    "attention kernel reads the rows the host-row cache does not hold straight from "
                                    "host memory, so PCIe time is inside the decode step the tok/s figures measure.",
                     "pcie_bytes_per_step": "the server's own count (host-read telemetry): K+V bytes of the selected "
                                            "host-slot rows the cache did not serve, per decode step, median of the "
                                            "log intervals at the largest batch"}}
    json.dump(out, open(a.json, "w"), indent=1)
    _plot(stock, [ours, *extra.values()], a.json.replace(".json", ".png"))
    print(json.dumps(out["summary"], indent=1))
    print(json.dumps(out["versus_stock"], indent=1))


def _median(vals):
    vals = sorted(v for v in vals if v is not None)
    return vals[len(vals) // 2] if vals else None


def prefetch_row(run: dict, resident: dict) -> dict:
    """One offloaded run against the all-resident one at the same batch: decode step time from SGLang's gen
    throughput (#running-req / tok/s), stall_share = (offloaded step - resident step) / offloaded step, and the
    host-read telemetry's medians over the log intervals at that batch."""
    batch, tok = run["max_running_decode"], run["gen_tok_s_at_max_running"]
    res_tok = resident["gen_tok_s_at_max_running"] if resident["max_running_decode"] == batch else None
    step_ms = batch / tok * 1e3 if tok else None
    res_ms = batch / res_tok * 1e3 if res_tok else None
    reads = run.get("host_reads_at_max_running", [])
    row = {"label": run["label"], "batch": batch, "decode_step_ms": step_ms, "resident_step_ms": res_ms,
           "stall_share": (step_ms - res_ms) / step_ms if step_ms and res_ms else None,
           "metrics_asynctls": run.get("metrics_asynctls")}
    for key in ("cache_hit", "pcie_mb_per_step", "late_rows_per_step", "ahead_rows_per_step", "ahead_mb_per_step",
                "prefetch_hit_rate", "block_overlap", "stall_ms_per_step_estimate"):
        row[key] = _median(h.get(key) for h in reads)
    return row


def cmd_prefetch_ab(a) -> None:
    resident = json.load(open(a.resident))
    runs = [json.load(open(p)) for p in [a.off, *a.on]]
    rows = [prefetch_row(r, resident) for r in runs]
    if resident["max_running_decode"] != rows[0]["batch"]:
        print(f"warning: the resident run decoded {resident['max_running_decode']} requests at once, the offloaded "
              f"{rows[0]['batch']}: no stall share (it needs the same batch)", file=sys.stderr)
    out = {"benchmark": "offload_capacity prefetch-ab", "command": " ".join(sys.argv),
           "runs": {"resident": resident, **{r["label"]: r for r in runs}}, "rows": rows,
           "summary": {"stall_share_off": rows[0]["stall_share"],
                       "stall_share_on": {r["label"]: r["stall_share"] for r in rows[1:]},
                       "prefetch_hit_rate_on": {r["label"]: r["prefetch_hit_rate"] for r in rows[1:]},
                       "cache_hit_off": rows[0]["cache_hit"],
                       "cache_hit_on": {r["label"]: r["cache_hit"] for r in rows[1:]},
                       "goal": "stall_share <= 0.05"}}
    json.dump(out, open(a.json, "w"), indent=1)
    _plot_ab(rows, a.json.replace(".json", ".png"))
    print(json.dumps(out["summary"], indent=1))


def _plot_ab(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    labels = [r["label"].replace("_", "\n") for r in rows]
    for ax, key, title in ((axes[0], "decode_step_ms", "decode step (ms)"), (axes[1], "stall_share", "stall share"),
                           (axes[2], "late_rows_per_step", "host rows read late a step")):
        vals = [r[key] or 0 for r in rows]
        ax.bar(labels, vals, color=["#888"] + ["#2a7"] * (len(rows) - 1))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    if rows[0]["resident_step_ms"]:
        axes[0].axhline(rows[0]["resident_step_ms"], ls="--", color="#27a", label="all resident")
        axes[0].legend(fontsize=7)
    axes[1].axhline(0.05, ls=":", color="#a22")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _median_pcie_bytes(run: dict):
    vals = sorted(h["pcie_mb_per_step"] * 1e6 for h in run.get("host_reads_at_max_running", []))
    return vals[len(vals) // 2] if vals else None


def _plot(stock: dict, runs: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(runs), 3.8))
    labels = [r["label"].replace("asynctls_", "").replace("_", "\n") for r in [stock, *runs]]
    for ax, key, title in ((axes[0], "max_running_decode", "96k requests decoding at once"),
                           (axes[1], "gen_tok_s_at_max_running", "decode tok/s at that batch")):
        vals = [r[key] or 0 for r in [stock, *runs]]
        ax.bar(labels, vals, color=["#888"] + ["#2a7"] * len(runs))
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Qwen3-8B (dummy weights), {runs[0]['input_len']}-token prompts, "
                 f"{runs[0]['environment']['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    # a fresh machine compiles the asynctls kernels during CUDA-graph capture: minutes before the server is ready
    r = add_run_command(sub, os.environ.get("MODEL", "/root/qwen3_8b_dummy"), 600)
    r.add_argument("--requests", type=int, default=12)
    r.add_argument("--input-len", type=int, default=98304)
    r.add_argument("--output-len", type=int, default=256)
    r.add_argument("--request-timeout", type=float, default=480)
    r.add_argument("--scrape-metrics", action="store_true", help="keep the server's sglang:asynctls_* gauges "
                   "(/metrics; launch it with --enable-metrics)")
    s = sub.add_parser("summarize")
    s.add_argument("stock")
    s.add_argument("ours")
    s.add_argument("--json", required=True)
    s.add_argument("--extra", action="append", default=[], help="more `run` JSONs, compared with stock too")
    ab = sub.add_parser("prefetch-ab", help="offloaded runs (prefetch off, then on) against an all-resident one")
    ab.add_argument("--resident", required=True, help="`run` JSON of the same batch without the host tier")
    ab.add_argument("--off", required=True, help="`run` JSON with the host tier, prefetch off")
    ab.add_argument("--on", action="append", default=[], help="`run` JSON with the prefetch on (repeatable)")
    ab.add_argument("--json", required=True)
    a = p.parse_args()
    if a.cmd == "run":
        a.server_args = server_flags(a)
        cmd_run(a)
    elif a.cmd == "prefetch-ab":
        cmd_prefetch_ab(a)
    else:
        cmd_summarize(a)


if __name__ == "__main__":
    main()
