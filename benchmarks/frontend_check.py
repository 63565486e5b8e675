"""Issue 4's client check on a GPU host: start a server (stock or --enable-asynctls), run the multi-turn frontend
program and the OpenAI-compatible chat call of docs/examples/multiturn_frontend.py against it, record the answers.

    python3 benchmarks/frontend_check.py --label asynctls --out /root/out/frontend_asynctls.json -- --enable-asynctls
    python3 benchmarks/frontend_check.py --label stock --out /root/out/frontend_stock.json -- --attention-backend triton
The document (~2.7k tokens) is above `--asynctls-dense-below` only if the server is started with a lower value
(e.g. `--asynctls-dense-below 2048`), which makes the sparse path answer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from server_parity import PORT, environment, stop_server, wait_ready  # noqa: E402


def load_example():
    path = os.path.join(os.path.dirname(HERE), "docs", "examples", "multiturn_frontend.py")
    spec = importlib.util.spec_from_file_location("multiturn_frontend", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=os.environ.get("SMOLLM2_DIR", "/root/smollm2"))
    p.add_argument("--ready-timeout", type=float, default=420)
    p.add_argument("server_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    example = load_example()
    extra = [x for x in a.server_args if x != "--"]
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", a.model, "--port", str(PORT),
           "--context-length", "8192", "--cuda-graph-max-bs", "8", *extra]
    log_path = a.out + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    out = {"label": a.label, "cmd": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **environment(),
           "secret": example.SECRET}
    try:
        wait_ready(proc, log_path, a.ready_timeout)
        url = f"http://127.0.0.1:{PORT}"
        for name, call in (("frontend", example.run_frontend), ("openai_chat", example.run_openai_chat)):
            try:
                out[name] = call(url)
                out[name + "_found_secret"] = example.SECRET in json.dumps(out[name])
            except Exception as e:  # noqa: BLE001 (recorded: the check is whether each client works)
                out[name + "_error"] = repr(e)[:1000]
        out["index_lines"] = [ln.strip() for ln in open(log_path) if "asynctls index:" in ln][:8]
    finally:
        stop_server(proc)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "cmd"}, indent=1))


if __name__ == "__main__":
    main()
