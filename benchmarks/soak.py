"""Soak one real SmolLM2 server with --enable-asynctls (soak_plan.py says what is sent and how it is judged), then
flush its cache and read what is left allocated; one run per preset, each within one device call:

    python3 benchmarks/soak.py run --preset plain --out /root/soak/plain.json
    python3 benchmarks/soak.py run --preset host --out /root/soak/host.json       # with the host tier
    python3 benchmarks/soak.py summarize /root/soak/plain.json /root/soak/host.json --json RESULT.json

Leaks are read from /server_info (patches/pool_usage.py) once the server is idle after the traffic: KV slots the radix
cache cannot evict, request rows, requests and host-row cache lines of live rows must be 0; then after /flush_cache
everything (KV and host slots included) must be 0; the same again after the determinism passes. SGLang's own idle
memory check is counted from the log. Traffic goes to 127.0.0.1 only; every
loop is bounded in count and every wait in time (--time-limit covers the whole run, start included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soak_plan as sp  # noqa: E402
from launch_matrix import git_rev, versions  # noqa: E402
from server_lifecycle import Server, gpu_free_gib, gpu_info, launch_cmd  # noqa: E402

PORT = 31240
# SmolLM2's context; budgets that make the coarse stage prune at 8k (the server-parity runs' choice); few request
# rows and an eager scheduler (conservativeness 0.3) so a small pool must queue and retract
BASE = ["--context-length", "8192", "--cuda-graph-max-bs", "16", "--max-running-requests", "16",
        "--schedule-conservativeness", "0.3", "--enable-asynctls", "--asynctls-dense-below", "2048",
        "--asynctls-block-budget", "32", "--asynctls-token-budget", "512", "--asynctls-label-channels", "16"]
PRESETS = {
    "plain": BASE + ["--max-total-tokens", "16384"],
    # ~4k slots in HBM + 0.25 GiB of host slots (~11.6k tokens of SmolLM2): most traffic lands in host slots
    "host": BASE + ["--max-total-tokens", "4096", "--asynctls-host-kv-gib", "0.25",
                    "--asynctls-host-cache-tokens", "1024", "--decode-log-interval", "10"],
}


def _body(task: sp.Task, ids=None, stream=False, rid=None) -> dict:
    body = {"sampling_params": {"temperature": 0, "max_new_tokens": task.max_new_tokens, "ignore_eos": True},
            "stream": stream}
    if task.text and ids is None:
        body["text"] = task.text
    else:
        body["input_ids"] = list(ids if ids is not None else task.input_ids)
    if rid:
        body["rid"] = rid
    return body


def generate(server: Server, body: dict, timeout: float):
    """(HTTP status, parsed body or error text)."""
    req = urllib.request.Request(server.url("/generate"), json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        return 200, json.loads(urllib.request.urlopen(req, timeout=timeout).read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]


def stream(server: Server, task: sp.Task, rid: str, timeout: float) -> dict:
    """Read the stream; for a cut kind, hang up (disconnect) or ask /abort_request (abort) after task.cut_after
    chunks. Bounded: at most 2 x max_new_tokens + 16 lines."""
    req = urllib.request.Request(server.url("/generate"), json.dumps(_body(task, stream=True, rid=rid)).encode(),
                                 {"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=timeout)
    chunks, last, cut = 0, {}, False
    for _ in range(2 * task.max_new_tokens + 16):
        line = resp.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if not line.startswith(b"data: "):
            continue
        last, chunks = json.loads(line[6:]), chunks + 1
        if (last.get("meta_info") or {}).get("finish_reason"):
            break
        if task.kind in sp.CUT_KINDS and chunks == task.cut_after and not cut:
            cut = True
            if task.kind == "disconnect":
                break
            _abort(server, rid)
    resp.close()
    meta = last.get("meta_info") or {}
    finish = (meta.get("finish_reason") or {}).get("type")
    return {"chunks": chunks, "cut": cut, "finish": finish, "completion_tokens": meta.get("completion_tokens"),
            "error": last.get("error")}


def _abort(server: Server, rid: str) -> None:
    req = urllib.request.Request(server.url("/abort_request"), json.dumps({"rid": rid}).encode(),
                                 {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


def run_task(server: Server, task: sp.Task, label: str, deadline: float) -> dict:
    """One task's outcome: done, aborted, finished_before_cut, rejected, wrong_length, accepted_overlong, error
    or skipped (past the deadline)."""
    out = {"index": task.index, "kind": task.kind, "requests": task.requests}
    timeout = deadline - time.time()
    if timeout < 5:
        return {**out, "outcome": "skipped", "requests": 0}
    try:
        if task.kind in ("stream", *sp.CUT_KINDS):
            r = stream(server, task, f"soak-{label}-{task.index}", min(timeout, 300))
            if task.kind == "stream":
                out["outcome"] = "done" if r["completion_tokens"] == task.max_new_tokens else "wrong_length"
            else:  # a cut counts when it came before the end: the abort's finish reason, or a hang-up mid-stream
                mid = r["cut"] and (task.kind == "disconnect" or r["finish"] == "abort")
                out["outcome"] = "aborted" if mid else "finished_before_cut"
            return {**out, **{k: r[k] for k in ("chunks", "finish", "completion_tokens")}}
        ids, outputs = list(task.input_ids), []
        for turn in range(task.requests):
            status, body = generate(server, _body(task, None if task.text else ids), min(timeout, 300))
            if task.kind == "overlong":
                ok = status in range(400, 500) and "context length" in str(body)
                return {**out, "outcome": "rejected" if ok else "accepted_overlong", "status": status}
            if status != 200 or body["meta_info"]["completion_tokens"] != task.max_new_tokens:
                return {**out, "outcome": "wrong_length" if status == 200 else "error", "status": status,
                        "detail": str(body)[:300]}
            outputs.append((body.get("text"), body.get("output_ids")))
            if turn < len(task.follow_ups):
                ids = ids + list(body.get("output_ids") or []) + list(task.follow_ups[turn])
        return {**out, "outcome": "done", "outputs": outputs}
    except Exception as e:  # recorded: an error outcome fails the soak
        return {**out, "outcome": "error", "detail": f"{type(e).__name__}: {e}"[:300]}


def run_phase(server, tasks, label, deadline, workers) -> list:
    with ThreadPoolExecutor(max(1, workers)) as ex:
        return list(ex.map(lambda t: run_task(server, t, label, deadline), tasks))


def loads(server: Server) -> dict:
    data, found = server.get("/v1/loads"), {}

    def walk(x):  # per-DP entries; sum what they report
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("num_used_tokens", "num_running_reqs", "num_waiting_reqs") and isinstance(v, (int, float)):
                    found[k] = found.get(k, 0) + int(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(data)
    return found


def wait_idle(server: Server, limit_s: float = 60) -> bool:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        now = loads(server)
        if not now.get("num_running_reqs") and not now.get("num_waiting_reqs"):
            return True
        time.sleep(1)
    return False


def flush(server: Server, tries: int = 15) -> bool:
    for _ in range(tries):  # refused (400) while requests are still being aborted
        try:
            urllib.request.urlopen(server.url("/flush_cache"), timeout=60).read()
            return True
        except urllib.error.HTTPError:
            time.sleep(2)
    return False


def pool_report(server: Server) -> dict:
    states = server.get("/server_info").get("internal_states") or [{}]
    return (states[0] or {}).get("asynctls") or {"error": "no asynctls report in /server_info internal_states"}


def leak_check(server: Server) -> dict:
    idle = wait_idle(server)
    before = pool_report(server)
    flushed = flush(server)
    time.sleep(2)
    after = pool_report(server)
    return {"idle": idle, "flushed": flushed, "before_flush": before, "after_flush": after, "loads": loads(server),
            "leaked": _sum(sp.idle_leaks(before), sp.flushed_leaks(after)) if idle and flushed else None}


def _sum(*counts):
    return None if any(c is None for c in counts) else sum(counts)


def determinism(server: Server, tasks, label, deadline) -> list:
    """The outputs of one sequential pass after a flush (None for a task that failed)."""
    flush(server)
    results = [run_task(server, t, f"{label}-det", deadline) for t in tasks]
    return [r.get("outputs") if r["outcome"] == "done" else None for r in results]


def run(args) -> None:
    t0 = time.time()
    deadline = t0 + args.time_limit
    flags = PRESETS[args.preset] + [x for x in args.server_args if x != "--"]
    cmd = launch_cmd(args.model, args.port, flags)
    log_path = os.path.splitext(args.out)[0] + "_server.log"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"benchmark": "soak", "label": args.preset, "command": " ".join(cmd), "argv": " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **gpu_info(args.gpu), **versions(),
              "sglang_asynctls_git_rev": git_rev(args.git_rev), "log": log_path}
    free_before = gpu_free_gib(args.gpu)
    server = Server(cmd, log_path, args.port, args.gpu)
    server.start()
    try:
        result["outcome"] = server.wait_ready(min(args.ready_timeout, deadline - time.time() - 60))
        result["ready_s"] = round(time.time() - t0, 1)
        if result["outcome"] == "ready":
            try:
                soak(server, args, result, deadline)
            except Exception as e:  # recorded; the run then has no summary and fails every goal
                result["soak_error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        result["stop"] = server.stop(free_before=free_before)
    log = sp.log_facts(server.log_text())
    result["log_facts"] = log
    if "leak_final" in result:
        result["summary"] = sp.run_summary(result["mixed"], result["burst"],
                                           [result["leak_after_traffic"]["leaked"], result["leak_final"]["leaked"]],
                                           log, (result["det_a"], result["det_b"]), result["det_requests"],
                                           result["alive"],
                                           result["burst_tokens"], result["pool_tokens"])
    else:
        result["log_tail"] = server.log_text()[-3000:]
    result["seconds"] = round(time.time() - t0, 1)
    json.dump(result, open(args.out, "w"), indent=1)
    print(json.dumps(result.get("summary") or {k: result.get(k) for k in ("outcome", "log_tail")}, indent=1))


def soak(server: Server, args, result: dict, deadline: float) -> None:
    info = server.get("/server_info")
    report = pool_report(server)
    flags = result["command"].split()
    dense_below = report.get("config", {}).get("dense_below") or flags[flags.index("--asynctls-dense-below") + 1]
    shape = sp.Shape(int(json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]),
                     int(info["context_length"]), int(dense_below))
    result.update(shape=shape.__dict__, pool_tokens=info.get("max_total_num_tokens"))
    t = time.time()
    result["mixed"] = run_phase(server, sp.mixed_plan(args.requests, args.min_aborted, shape, args.seed),
                                args.preset, deadline - 120, args.concurrency)
    result["alive_after_mixed"] = server.healthy()
    burst = sp.burst_plan(result["pool_tokens"] or 0, shape)
    result["burst_tokens"] = sum(len(b.input_ids) + b.max_new_tokens for b in burst)
    result["burst"] = run_phase(server, burst, args.preset, deadline - 75, len(burst))
    result["traffic_s"] = round(time.time() - t, 1)
    result["leak_after_traffic"] = leak_check(server)
    det = sp.determinism_plan(shape)
    result["det_a"] = determinism(server, det, args.preset, deadline - 40)
    result["det_b"] = determinism(server, det, args.preset, deadline - 25)
    result["det_requests"] = 2 * sum(t.requests for t in det)
    result["leak_final"] = leak_check(server)
    result["alive"] = result["alive_after_mixed"] and server.healthy()
    for o in result["mixed"] + result["burst"]:
        o.pop("outputs", None)  # the determinism passes keep theirs; the rest would only bloat the file


def summarize(args) -> None:
    runs = {}
    for path in args.runs:
        r = json.load(open(path))
        runs[r["label"]] = r
    summaries = {label: r.get("summary") or {"requests": 0, "aborted": 0, "leaked": None, "deterministic": False,
                                              "errors": 0, "burst_sent": 0, "burst_completed": 0,
                                              "burst_exceeds_pool": False, "overlong_sent": 0,
                                              "overlong_rejected": 0, "retractions": 0, "server_alive": False}
                 for label, r in runs.items()}
    any_run = next(iter(runs.values()), {})
    out = {"benchmark": "soak", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
           **{k: any_run.get(k) for k in ("gpu", "driver", "python", "torch", "triton", "sglang", "sglang-asynctls",
                                          "sglang_asynctls_git_rev")},
           "summary": sp.soak_summary(summaries), "runs": {label: {"summary": summaries[label], **{
               k: r.get(k) for k in ("command", "argv", "date", "ready_s", "seconds", "traffic_s", "shape",
                                     "pool_tokens", "burst_tokens", "log_facts", "leak_after_traffic", "leak_final",
                                     "stop", "outcome")}} for label, r in runs.items()}}
    json.dump(out, open(args.json, "w"), indent=1)
    print(json.dumps(out["summary"], indent=1))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--preset", choices=sorted(PRESETS), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--model", default=os.environ.get("SMOLLM2_DIR", "/root/smollm2"))
    r.add_argument("--requests", type=int, default=300, help="requests of the mixed phase")
    r.add_argument("--min-aborted", type=int, default=40, help="disconnects + aborts among them")
    r.add_argument("--concurrency", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--time-limit", type=float, default=540, help="seconds for the whole run, start included")
    r.add_argument("--ready-timeout", type=float, default=300)
    r.add_argument("--port", type=int, default=PORT)
    r.add_argument("--gpu", type=int, default=0)
    r.add_argument("--git-rev", default=None)
    r.add_argument("server_args", nargs=argparse.REMAINDER, help="more server flags, after --")
    s = sub.add_parser("summarize")
    s.add_argument("runs", nargs="+")
    s.add_argument("--json", required=True)
    args = p.parse_args()
    run(args) if args.cmd == "run" else summarize(args)


if __name__ == "__main__":
    main()
