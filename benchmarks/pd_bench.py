"""Prefill/decode disaggregation with AsyncTLS on the decode side, served by SGLang's own PD stack.

A pair is a stock prefill server on GPU 0 and a decode server on GPU 1 (stock, or with --enable-asynctls: the only
difference), both at AsyncTLS's page size (SGLang's transfer refuses unequal page sizes), and sglang-router's mini
load balancer in front on serve_bench's port, so serve_bench drives the pair as it drives one server. SGLang 0.5.17
ships no load balancer of its own: `python -m sglang_router.launch_router --pd-disaggregation --mini-lb` is what
its PD tests run (sglang/test/server_fixtures/disaggregation_fixture.py), from the sglang-router package. One
device call each (a command may run 10 minutes):
    python3 benchmarks/pd_bench.py start --label pd_asynctls --dir /root/pd --decode-flags=--enable-asynctls
    python3 benchmarks/serve_bench.py parity --label pd_asynctls --dir /root/pd
    python3 benchmarks/serve_bench.py workload --label pd_asynctls --dir /root/pd --name w1     # w2, w3
    python3 benchmarks/serve_bench.py stop --label pd_asynctls --dir /root/pd
    (then the same with --label pd_stock and no --decode-flags)
    python3 benchmarks/serve_bench.py summarize --dir /root/pd --baseline pd_stock --ours pd_asynctls --json OUT
The KV moves through Mooncake (package mooncake-transfer-engine-cuda13) over TCP unless MOONCAKE_PROTOCOL says
otherwise (one host needs no RDMA NIC), or NIXL (--transfer-backend nixl, package nixl-cu13). `--gpus 0,0` puts
both servers on one GPU (give each a --mem-fraction-static share through the flags).

`smoke` needs one GPU and no transfer package: an AsyncTLS decode server alone with SGLang's fake transfer backend
(the path of its own warmup requests: no KV moves, the slots keep what they held), prompts short and long (past
--asynctls-dense-below: sparse decode) sent as arrived requests, then /server_info must count every one indexed on
arrival, and the shutdown must be clean. It checks the plumbing on a GPU (hook, Triton writer, CUDA graphs,
sparse decode over arrived slots), not outputs: the KV is no real prompt's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time

import serve_bench
from server_lifecycle import HOST, Server, gpu_free_gib, launch_cmd
from server_parity import environment

PREFILL_PORT, DECODE_PORT, BOOTSTRAP_PORT = 31310, 31320, 31330
PAGE_SIZE = 64  # AsyncTLS's block: the decode server's page size, so the prefill server's too
COMMON = ["--load-format", "dummy", "--cuda-graph-max-bs", "16", "--page-size", str(PAGE_SIZE)]
FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # sglang/srt/disaggregation/utils.py: a request the fake transfer serves
SMOKE_PROMPTS = [(n, 16) for n in (37, 611, 2047)] + [(20011, 32), (12289, 32)]  # (input, output tokens)


def pair_commands(model: str, decode_flags=(), prefill_flags=(), transfer_backend="mooncake", gpus=(0, 1)) -> dict:
    """argv of the prefill server, the decode server and the router of one PD pair."""
    transfer = ["--disaggregation-transfer-backend", transfer_backend]
    prefill = launch_cmd(model, PREFILL_PORT, [*COMMON, *transfer, "--base-gpu-id", str(gpus[0]),
                                               "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                               str(BOOTSTRAP_PORT), *prefill_flags])
    decode = launch_cmd(model, DECODE_PORT, [*COMMON, *transfer, "--base-gpu-id", str(gpus[1]),
                                             "--disaggregation-mode", "decode", *decode_flags])
    router = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--mini-lb",
              "--prefill", f"http://{HOST}:{PREFILL_PORT}", str(BOOTSTRAP_PORT), "--decode",
              f"http://{HOST}:{DECODE_PORT}", "--host", HOST, "--port", str(serve_bench.PORT)]
    return {"prefill": prefill, "decode": decode, "router": router}


def transfer_env(transfer_backend: str) -> dict:
    if transfer_backend != "mooncake":
        return {}
    # SGLang's own PD tests set the connection pool; TCP moves GPU memory where no RDMA device is
    return {"MOONCAKE_PROTOCOL": os.environ.get("MOONCAKE_PROTOCOL", "tcp"), "MC_TCP_ENABLE_CONNECTION_POOL": "true"}


def smoke_command(model: str, flags=()) -> list:
    return launch_cmd(model, DECODE_PORT, [*COMMON, "--disaggregation-mode", "decode",
                                           "--disaggregation-transfer-backend", "fake", "--enable-asynctls",
                                           "--asynctls-dense-below", "4096", *flags])


def _servers(args) -> dict:
    gpus = [int(g) for g in args.gpus.split(",")]
    visible = sorted(set(gpus))  # as SGLang's PD tests: both GPUs visible, each server at its --base-gpu-id
    cmds = pair_commands(args.model, shlex.split(args.decode_flags), shlex.split(args.prefill_flags),
                         args.transfer_backend, [visible.index(g) for g in gpus])
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, visible)), **transfer_env(args.transfer_backend)}
    logs = {"prefill": "prefill_server", "decode": "server", "router": "router"}  # serve_bench reads these
    ports = {"prefill": PREFILL_PORT, "decode": DECODE_PORT, "router": serve_bench.PORT}
    gpu = {"prefill": gpus[0], "decode": gpus[1], "router": gpus[1]}
    return {name: Server(cmd, os.path.join(args.dir, f"{args.label}_{logs[name]}.log"), ports[name], gpu[name], env)
            for name, cmd in cmds.items()}


def start_order(gpus: str) -> list:
    """Servers on two GPUs load at once; on one GPU one after the other (each sizes its pool from the memory it
    finds free); the router last, once both answer."""
    one_gpu = len(set(gpus.split(","))) == 1
    return [("prefill",), ("decode",), ("router",)] if one_gpu else [("prefill", "decode"), ("router",)]


def start(args) -> None:
    os.makedirs(args.dir, exist_ok=True)
    servers, t0 = _servers(args), time.time()
    state = {"label": args.label, "server_cmd": {n: s.cmd for n, s in servers.items()}, "pids": []}
    for names in start_order(args.gpus):
        for name in names:
            servers[name].start()
            state["pids"].insert(0, servers[name].proc.pid)
        for name in names:
            outcome = servers[name].wait_ready(args.ready_timeout - (time.time() - t0))
            if outcome != "ready":
                serve_bench._save(args, {**state, "start_error": f"{name}: {outcome}",
                                         "log_tail": servers[name].log_text()[-3000:]})
                serve_bench.stop(args)
                raise SystemExit(f"{args.label}: the {name} server is {outcome}:\n{servers[name].log_text()[-3000:]}")
    lines = [ln.strip()[:300] for name in ("prefill", "decode") for ln in servers[name].log_text().splitlines()
             if serve_bench.LOG_LINES.search(ln)]
    state.update({"ready_s": round(time.time() - t0, 1), "gpu_free_gib_at_ready": gpu_free_gib(servers["decode"].gpu),
                  "prefill_gpu_free_gib_at_ready": gpu_free_gib(servers["prefill"].gpu),
                  "server_log_lines": lines[-40:], **environment()})
    serve_bench._save(args, state)
    print(f"{args.label} ready in {state['ready_s']:.0f} s, decode GPU {state['gpu_free_gib_at_ready']} GiB free")


def _arrived(server: Server, input_len: int, output_len: int, room: int, rng) -> dict:
    body = {"input_ids": [rng.randrange(1000, 150000) for _ in range(input_len)], "bootstrap_host": FAKE_BOOTSTRAP_HOST,
            "bootstrap_room": room, "sampling_params": {"max_new_tokens": output_len, "temperature": 0,
                                                        "ignore_eos": True}}
    out = server.post("/generate", body, timeout=300)
    return {"input_len": input_len, "output_tokens": len(out.get("output_ids") or [])}


def smoke(args) -> None:
    """One GPU: the decode side alone, KV 'arrived' through the fake transfer; see the module docstring."""
    os.makedirs(args.dir, exist_ok=True)
    server = Server(smoke_command(args.model, shlex.split(args.flags)), os.path.join(args.dir, "smoke_server.log"),
                    DECODE_PORT, args.gpu)
    free_before = gpu_free_gib(args.gpu)
    server.start()
    result = {"benchmark": "pd_smoke", "command": server.cmd, "ready": server.wait_ready(args.ready_timeout),
              "requests": [], "arrivals_indexed": 0}
    try:
        if result["ready"] == "ready":
            before, rng = _index_counters(server), random.Random(0)
            for i, (n, m) in enumerate(SMOKE_PROMPTS):
                result["requests"].append(_arrived(server, n, m, 100 + i, rng))
            result["index_before"], result["index_after"] = before, _index_counters(server)
            result["arrivals_indexed"] = (result["index_after"].get("index_arrivals", 0)
                                          - before.get("index_arrivals", 0))
    except Exception as e:  # a failed request is a result; the server is still stopped and checked
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["shutdown"] = server.stop(free_before=free_before)
    result["passed"] = smoke_passed(result)
    result.update(environment())
    if not result["passed"]:
        result["log_tail"] = server.log_text()[-3000:]
    json.dump(result, open(os.path.join(args.dir, "pd_smoke.json"), "w"), indent=1)
    print(json.dumps({k: result.get(k) for k in ("ready", "arrivals_indexed", "passed")}))


def smoke_passed(result: dict) -> bool:
    """Ready; every prompt answered with its token count and counted as indexed on arrival; a clean shutdown."""
    answered = [r["output_tokens"] for r in result["requests"]] == [m for _, m in SMOKE_PROMPTS]
    return (result["ready"] == "ready" and answered and result["arrivals_indexed"] >= len(SMOKE_PROMPTS)
            and bool(result["shutdown"].get("clean")))


def _index_counters(server: Server) -> dict:
    states = server.get("/server_info").get("internal_states") or [{}]
    return ((states[0] or {}).get("asynctls") or {}).get("index") or {}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--label", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--model", default=serve_bench.MODEL)
    s.add_argument("--decode-flags", default="", help="e.g. --enable-asynctls (absent: the stock pair)")
    s.add_argument("--prefill-flags", default="")
    s.add_argument("--transfer-backend", default="mooncake", choices=("mooncake", "nixl"))
    s.add_argument("--gpus", default="0,1", help="prefill GPU, decode GPU")
    s.add_argument("--ready-timeout", type=float, default=540)
    s = sub.add_parser("smoke")
    s.add_argument("--dir", required=True)
    s.add_argument("--model", default=serve_bench.MODEL)
    s.add_argument("--gpu", type=int, default=0)
    s.add_argument("--flags", default="", help="more decode-server flags")
    s.add_argument("--ready-timeout", type=float, default=420)
    args = p.parse_args()
    {"start": start, "smoke": smoke}[args.cmd](args)


if __name__ == "__main__":
    main()
