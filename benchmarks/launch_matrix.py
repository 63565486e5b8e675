"""Does every model and flag combination start, answer, report its free memory and shut down cleanly? One real
`sglang.launch_server` per cell of launch_cells.py, on the GPU host:

    python3 benchmarks/launch_matrix.py run --out /root/lm/launch_matrix.json --resume /root/lm/launch_matrix.json \\
        --budget-s 540 --git-rev REV [--only 'stock.smollm2.*,asynctls.smollm2.*'] [--gpus 0,1,2,3]
    python3 benchmarks/launch_matrix.py summarize /root/lm/launch_matrix.json    # summary + PNG again, anywhere

Per cell: start (own process group, one GPU), wait for /health, record nvidia-smi's free memory at ready, send one
short and one long request (token ids; the long one longer than the server's --asynctls-dense-below, so it decodes
sparsely: the path is recorded from the server's own config and the request's prompt tokens), SIGTERM, and check the
launcher exited, no process of its group is left, the port is free and the GPU memory came back. A refusal cell must
end before ready with its documented one-line refusal. The JSON is rewritten after every cell; `--resume` skips
cells already recorded and `--budget-s` starts no cell it cannot finish and cuts (and does not record) one the
deadline reaches, so a run fits one device call. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import os
import platform
import queue
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_cells as lc  # noqa: E402
from server_lifecycle import Server, gpu_free_gib, gpu_info, launch_cmd  # noqa: E402

BASE_PORT = 31400
STOP_RESERVE_S = 100  # the requests and a shutdown (SIGTERM grace 60 s, then the memory check) after ready
LOG_TAIL = 2500


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "sglang", "sglang-asynctls", "sgl-kernel", "flashinfer-python"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def git_rev(given) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def model_vocab(path: str) -> int:
    return int(json.load(open(os.path.join(path, "config.json")))["vocab_size"])


def prompt_ids(n: int, vocab: int, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randrange(1000, min(vocab, 151936)) for _ in range(n)]  # within the dummy dirs' tokenizer too


def ask(server: Server, ids: list, timeout: float) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": lc.NEW_TOKENS,
                                                  "ignore_eos": True}}
    t0 = time.time()
    try:
        meta = server.post("/generate", body, timeout=timeout)["meta_info"]
        return {"prompt_tokens": meta.get("prompt_tokens"), "completion_tokens": meta.get("completion_tokens"),
                "seconds": round(time.time() - t0, 2)}
    except Exception as e:  # recorded, the cell fails on it
        return {"error": f"{type(e).__name__}: {e}"[:500], "seconds": round(time.time() - t0, 2)}


def serve(cell: lc.Cell, server: Server, model: lc.Model, rec: dict, deadline: float) -> None:
    """The part after ready: memory, server facts, the two requests."""
    time.sleep(2)  # nvidia-smi lags the last allocations of the warmup by a moment
    rec["gpu_free_gib_at_ready"] = gpu_free_gib(server.gpu)
    info = None
    try:
        info = server.get("/server_info")
        rec["max_total_num_tokens"] = info.get("max_total_num_tokens")
        rec["attention_backend"] = info.get("attention_backend")
        rec["page_size"] = info.get("page_size")
    except Exception as e:
        rec["server_info_error"] = f"{type(e).__name__}: {e}"[:300]
    vocab = model_vocab(model.path)
    timeout = max(30.0, min(300.0, deadline - time.time() - 70))
    rec["short"] = ask(server, prompt_ids(lc.SHORT_TOKENS, vocab, 1), timeout)
    rec["long"] = ask(server, prompt_ids(model.long_tokens, vocab, 2), timeout)
    if cell.kind == "asynctls":
        rec["dense_below"], rec["dense_below_source"] = lc.dense_below_of(info, server.log_text())
        rec["long_path"] = lc.long_path(rec["long"].get("prompt_tokens"), rec["dense_below"])


def run_cell(cell: lc.Cell, gpu: int, port: int, log_dir: str, deadline: float, cell_timeout: float):
    """The cell's record, or None when the budget's deadline cut it (then it is not recorded and runs again on
    --resume)."""
    model = lc.MODELS[cell.model]
    cmd = launch_cmd(model.path, port, cell.flags)
    log_path = os.path.join(log_dir, f"{cell.name}.log")
    rec = {"name": cell.name, "kind": cell.kind, "model": cell.model, "config": cell.config, "mem": cell.mem,
           "command": " ".join(cmd), "gpu_index": gpu, "log": log_path, "started": time.strftime("%H:%M:%S")}
    free_before = rec["gpu_free_gib_before"] = gpu_free_gib(gpu)
    server = Server(cmd, log_path, port, gpu)
    t0 = time.time()
    server.start()
    limit = min(cell_timeout, deadline - time.time() - STOP_RESERVE_S)
    rec["outcome"] = server.wait_ready(max(0.0, limit))
    rec["ready_s"] = round(time.time() - t0, 1)
    cut = rec["outcome"] == "timeout" and limit < cell_timeout
    if rec["outcome"] == "ready" and cell.kind != "refusal":
        serve(cell, server, model, rec, deadline)
    rec["stop"] = server.stop(free_before=free_before)
    rec["returncode"] = server.proc.returncode
    log_text = server.log_text()
    if cell.kind == "refusal":
        why = lc.refusal_verdict(cell, rec["outcome"], rec["returncode"], log_text, rec["stop"])
        rec["refusal_lines"] = [ln for ln in log_text.splitlines() if cell.expect in ln][:3]
    else:
        why = lc.served_verdict(cell, rec)
    rec["status"], rec["failures"] = ("failed", why) if why else ("passed", [])
    rec["seconds"] = round(time.time() - t0, 1)
    if why:
        rec["log_tail"] = log_text[-LOG_TAIL:]
    return None if cut else rec


def one_line(rec: dict, stock: dict) -> str:
    gap, ours, theirs = "", rec.get("gpu_free_gib_at_ready"), (stock or {}).get("gpu_free_gib_at_ready")
    if ours is not None and theirs is not None:
        gap = f" (stock {theirs}, gap {theirs - ours:+.2f})"
    path = f" long {rec['long_path']} ({rec['long'].get('prompt_tokens')} vs {rec.get('dense_below')})" \
        if rec.get("long_path") else ""
    return (f"{rec['name']:42s} {rec['status'].upper():6s} ready {rec['ready_s']:5.0f} s {rec['outcome']:7s} "
            f"free {rec.get('gpu_free_gib_at_ready')} GiB{gap}{path} stop {rec['stop'].get('seconds')} s "
            f"clean {rec['stop'].get('clean')} {'; '.join(rec['failures'])[:300]}")


class Results:
    """The JSON on disk, rewritten (atomically) after every cell; workers on several GPUs share it."""

    def __init__(self, path: str, resume: str, invocation: dict, env: dict):
        self.path, self.lock = path, threading.Lock()
        old = json.load(open(resume)) if resume and os.path.exists(resume) else {}
        self.data = {"benchmark": "launch_matrix", **env, "matrix": definition(), "cells": old.get("cells", {}),
                     "runs": old.get("runs", []) + [invocation], "cut": []}

    def add(self, rec: dict) -> None:
        with self.lock:
            self.data["cells"][rec["name"]] = rec
            self.write()

    def cut(self, name: str) -> None:
        with self.lock:
            self.data["cut"].append(name)
            self.write()

    def needed_s(self, model: str, floor: float) -> float:
        """Budget a cell of this model needs: its slowest start so far (x 1.2) plus the requests and shutdown."""
        with self.lock:
            readies = [c["ready_s"] for c in self.data["cells"].values()
                       if c.get("model") == model and c.get("outcome") == "ready"]
        return max(floor, STOP_RESERVE_S + 1.2 * max(readies)) if readies else floor

    def write(self) -> None:
        self.data["summary"] = lc.summarize(lc.build_cells(), self.data["cells"])
        self.data["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp = self.path + ".tmp"
        json.dump(self.data, open(tmp, "w"), indent=1)
        os.replace(tmp, self.path)


def definition() -> dict:
    return {"common_flags": lc.COMMON, "new_tokens": lc.NEW_TOKENS, "short_tokens": lc.SHORT_TOKENS,
            "models": {m.name: m.__dict__ for m in lc.MODELS.values()},
            "configs": {c.name: c.__dict__ for c in lc.CONFIGS.values()}, "mems": lc.MEMS,
            "refusals": [r.__dict__ for r in lc.REFUSALS],
            "cells": {c.name: {"flags": list(c.flags), "stock_ref": c.stock_ref} for c in lc.build_cells()}}


def run(args) -> None:
    t_start = time.time()
    deadline = t_start + args.budget_s
    for override in args.model_dir or []:
        name, path = override.split("=", 1)
        lc.MODELS[name] = dataclasses.replace(lc.MODELS[name], path=path)
    gpus = [int(g) for g in args.gpus.split(",")]
    invocation = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "budget_s": args.budget_s, "gpus": gpus}
    env = {**gpu_info(gpus[0]), "gpu_count_used": len(gpus), **versions(), "sglang_asynctls_git_rev": git_rev(
        args.git_rev)}
    results = Results(args.out, args.resume, invocation, env)
    cells = lc.pending(lc.select(lc.build_cells(), args.only), results.data["cells"], args.retry_failed)
    os.makedirs(args.log_dir, exist_ok=True)
    print(f"{len(cells)} cells to run on GPU(s) {gpus}, budget {args.budget_s:.0f} s", flush=True)
    todo: "queue.Queue[lc.Cell]" = queue.Queue()
    for c in cells:
        todo.put(c)

    not_started = []

    def worker(slot: int) -> None:
        while True:  # each cell is taken once: bounded by the cell count
            try:
                cell = todo.get_nowait()
            except queue.Empty:
                return
            if deadline - time.time() < results.needed_s(cell.model, args.min_cell_s):
                not_started.append(cell.name)  # a cheaper model's cell may still fit
                continue
            rec = run_cell(cell, gpus[slot], BASE_PORT + slot, args.log_dir, deadline, args.cell_timeout)
            if rec is None:
                results.cut(cell.name)
                print(f"{cell.name:42s} CUT by the budget (not recorded)", flush=True)
                continue
            results.add(rec)
            print(one_line(rec, results.data["cells"].get(cell.stock_ref or "")), flush=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(gpus))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    invocation["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    invocation["not_started"] = not_started
    results.write()
    plot(results.data, os.path.splitext(args.out)[0] + ".png")
    s = results.data["summary"]
    print(json.dumps({k: s[k] for k in ("launch_passed", "launch_total", "stock_passed", "stock_total",
                                        "max_free_mem_gap_gb")}), f"{time.time() - t_start:.0f} s", flush=True)


def plot(data: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no PNG (run `summarize` where it is installed)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = data["cells"]
    ours = [c for c in lc.build_cells() if c.kind == "asynctls" and c.name in cells]
    if not ours:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(ours)), 4.5))
    xs = range(len(ours))
    value = lambda rec: (rec or {}).get("gpu_free_gib_at_ready") or 0  # noqa: E731  (not ready: 0)
    ax.bar([x - 0.2 for x in xs], [value(cells.get(c.stock_ref)) for c in ours], 0.4, label="stock")
    ax.bar([x + 0.2 for x in xs], [value(cells[c.name]) for c in ours], 0.4, label="--enable-asynctls")
    for x, c in zip(xs, ours):
        if cells[c.name].get("status") != "passed":
            ax.text(x + 0.2, 0.2, "FAIL", rotation=90, ha="center", fontsize=7, color="red")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([c.name.removeprefix("asynctls.") for c in ours], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("free GPU memory at ready (GiB)")
    s = data["summary"]
    ax.set_title(f"launch matrix, {data.get('gpu')}: {s['launch_passed']}/{s['launch_total']} passed, "
                 f"max gap {s['max_free_mem_gap_gb']} GiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(args) -> None:
    data = json.load(open(args.json))
    data["summary"] = lc.summarize(lc.build_cells(), data["cells"])
    json.dump(data, open(args.json, "w"), indent=1)
    plot(data, os.path.splitext(args.json)[0] + ".png")
    print(json.dumps(data["summary"], indent=1))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--resume", default=None, help="a JSON of earlier runs: its recorded cells are skipped")
    r.add_argument("--retry-failed", action="store_true", help="with --resume: run failed cells again")
    r.add_argument("--only", default=None, help="comma-separated patterns over cell names, e.g. 'stock.qwen3.*'")
    r.add_argument("--budget-s", type=float, default=540)
    r.add_argument("--cell-timeout", type=float, default=300, help="seconds a server may take to become ready")
    r.add_argument("--min-cell-s", type=float, default=150,
                   help="start no cell with less budget left than this (or than its model's slowest start so far "
                        "x 1.2 + 100 s)")
    r.add_argument("--gpus", default="0", help="nvidia-smi indices; one cell at a time on each")
    r.add_argument("--log-dir", default="/root/lm/logs")
    r.add_argument("--git-rev", default=None)
    r.add_argument("--model-dir", action="append", metavar="NAME=PATH", help="another directory for a model")
    s = sub.add_parser("summarize")
    s.add_argument("json")
    args = p.parse_args()
    run(args) if args.cmd == "run" else summarize(args)


if __name__ == "__main__":
    main()
