"""Soak a server started with --enable-asynctls: mixed long/short requests, random client aborts, then a cache flush;
report what is left allocated (KV slots; the AsyncTLS index is addressed by KV slot and page, so it leaks exactly
when KV slots leak, and the backend keeps no per-request state).

    python3 benchmarks/soak.py --requests 240 --out soak.json -- --enable-asynctls ...
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_parity import FILLER, PORT, environment, post, stop_server, wait_ready  # noqa: E402  (same port, probe)


def one_request(i: int, rng: random.Random, long_words: int, abort_share: float) -> str:
    long = rng.random() < 0.3
    text = (FILLER * (long_words // 20 if long else 3)) + f" Request {i}: say something."
    sp = {"temperature": 0, "max_new_tokens": rng.choice([8, 32, 64]), "ignore_eos": True}
    if rng.random() >= abort_share:
        post("/generate", {"text": text, "sampling_params": sp}, timeout=300)
        return "done"
    body = json.dumps({"text": text, "sampling_params": sp, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/generate", body, {"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=300)
    for _ in range(rng.randint(0, 3)):  # read a few chunks, then hang up: SGLang aborts the request
        resp.readline()
    resp.close()
    return "aborted"


def used_tokens() -> int:
    data = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v1/loads", timeout=30).read())
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                found.append(v) if k == "num_used_tokens" else walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(data)
    return int(sum(found))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--abort-share", type=float, default=0.25)
    p.add_argument("--long-words", type=int, default=5000)
    p.add_argument("--model", default=os.environ.get("SMOLLM2_DIR", "/root/smollm2"))
    p.add_argument("--out", required=True)
    p.add_argument("--time-limit", type=float, default=400)
    p.add_argument("server_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    server_args = [x for x in args.server_args if x != "--"]
    log_path = args.out + ".log"
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model, "--port", str(PORT),
           "--context-length", "8192", "--cuda-graph-max-bs", "16", *server_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, log_path, 420)
        rngs = [random.Random(i) for i in range(args.requests)]
        t0, outcome, lock = time.time(), {"done": 0, "aborted": 0, "error": 0}, threading.Lock()

        def task(i):
            if time.time() - t0 > args.time_limit:
                return
            try:
                r = one_request(i, rngs[i], args.long_words, args.abort_share)
            except Exception:
                r = "error"
            with lock:
                outcome[r] += 1
        with ThreadPoolExecutor(args.concurrency) as ex:
            list(ex.map(task, range(args.requests)))
        time.sleep(3)  # let the scheduler finish aborting
        before = used_tokens()
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/flush_cache", timeout=60).read()
        time.sleep(3)
        after = used_tokens()
        log_text = open(log_path).read()
        result = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **environment(),
                  "requests": args.requests, "outcome": outcome, "seconds": round(time.time() - t0, 1),
                  "used_tokens_before_flush": before, "used_tokens_after_flush": after,
                  "leak_warnings_in_log": log_text.lower().count("leak")}
    finally:
        stop_server(proc)
    json.dump(result, open(args.out, "w"), indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
