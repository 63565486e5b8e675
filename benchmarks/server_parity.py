"""Behaviour of a real SGLang 0.5.17 server with and without --enable-asynctls on SmolLM2 (real weights).

Run once per server configuration, then compare:
    python3 benchmarks/server_parity.py run --label stock --out /root/stock.json -- --attention-backend triton
    python3 benchmarks/server_parity.py run --label asynctls --out /root/ours.json -- --enable-asynctls ...
    python3 benchmarks/server_parity.py compare /root/stock.json /root/ours.json --json RESULT.json
Short prompts (below --asynctls-dense-below) must give exactly the stock greedy output; the long passkey prompt
must give the same answer; a second turn sharing the first turn's prefix must do no index work for that prefix
(read from the server log's "asynctls index:" lines).
Also home of `environment()`: what every result file records about the host (GPU, torch / triton / SGLang / this
package's versions).
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


def version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "absent"


def environment() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpu": gpus[0] if gpus else "none", "gpu_count": len(gpus), "torch": torch.__version__,
            **{pkg: version(pkg) for pkg in ("triton", "sglang", "sglang-asynctls")}}


PORT = 31234
SHORT = ["The capital of France is", "def fibonacci(n):", "List three colors:", "Water boils at",
         "Once upon a time, there was a", "The square root of 144 is", "import numpy as np\n",
         "Translate to French: good morning"]
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tokenizer, target_tokens: int, key: str, depth: float) -> str:
    lines = [FILLER] * (target_tokens // len(tokenizer.encode(FILLER)))
    lines.insert(int(len(lines) * depth), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = "What is the pass key? Answer with the number only."
    msgs = [{"role": "user", "content": "".join(lines) + "\n" + question}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def post(path: str, body: dict, timeout=600) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def wait_ready(proc, log_path: str, limit_s: float) -> None:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n" + open(log_path).read()[-4000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5)
            return
        except Exception:
            time.sleep(2)
    raise TimeoutError("server not ready:\n" + open(log_path).read()[-4000:])


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def generate(text: str, new_tokens: int) -> str:
    sp = {"temperature": 0, "max_new_tokens": new_tokens}
    return post("/generate", {"text": text, "sampling_params": sp})["text"]


def server_cmd(model: str, server_args) -> list:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", str(PORT),
            "--context-length", "8192", "--cuda-graph-max-bs", "8", *server_args]


def run(args) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    random.seed(0)
    keys = [str(random.randint(10000, 99999)) for _ in range(3)]
    long_prompts = [passkey_prompt(tok, args.long_tokens, k, d) for k, d in zip(keys, (0.2, 0.5, 0.8))]
    log_path = args.out + ".log"
    cmd = server_cmd(args.model, args.server_args)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, log_path, args.ready_timeout)
        ready_s = time.time() - t0
        out = {"label": args.label, "cmd": cmd, "ready_s": round(ready_s, 1), "keys": keys,
               "short": [generate(p, 32) for p in SHORT],
               "long": [generate(p, 12) for p in long_prompts],
               "long_prompt_tokens": [len(tok.encode(p)) for p in long_prompts]}
        turn2 = long_prompts[1] + out["long"][1] + "\nNow repeat the pass key twice."
        mark = sum(1 for _ in open(log_path))
        out["turn2"] = generate(turn2, 16)
        out["turn2_index_lines"] = [ln.strip() for ln in list(open(log_path))[mark:] if "asynctls index:" in ln]
        out["first_turn_index_lines"] = [ln.strip() for ln in open(log_path) if "asynctls index:" in ln][:8]
    finally:
        stop_server(proc)
    json.dump(out, open(args.out, "w"), indent=1)
    print(json.dumps(out, indent=1)[:3000])


def compare(args) -> None:
    a, b = json.load(open(args.stock)), json.load(open(args.ours))
    short_equal = [x == y for x, y in zip(a["short"], b["short"])]
    found = lambda res: [k in o for k, o in zip(res["keys"], res["long"])]  # noqa: E731
    pages = [int(m.group(1)) for ln in b["turn2_index_lines"] for m in [re.search(r"wrote (\d+) pages", ln)] if m]
    reused = [int(m.group(1)) for ln in b["turn2_index_lines"]
              for m in [re.search(r"(\d+) prefix tokens reused", ln)] if m]
    summary = {"short_prompts_identical": all(short_equal), "short_identical_count": sum(short_equal),
               "passkey_found_stock": found(a), "passkey_found_asynctls": found(b),
               "long_answers_equal": [x == y for x, y in zip(a["long"], b["long"])],
               "turn2_pages_written": sum(pages), "turn2_prefix_tokens_reused": sum(reused),
               "turn2_equal": a["turn2"] == b["turn2"]}
    result = {"benchmark": "server_parity", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv), **environment(), "stock": a, "asynctls": b, "summary": summary}
    json.dump(result, open(args.json, "w"), indent=1)
    print(json.dumps(summary, indent=1))


def add_run_command(sub, default_model: str, ready_timeout: float):
    """The `run` subcommand of the server benchmarks (this one, offload_capacity.py): a label, an output file, the
    model, and the server's own flags after `--` (read them with server_flags)."""
    r = sub.add_parser("run")
    r.add_argument("--label", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--model", default=default_model)
    r.add_argument("--ready-timeout", type=float, default=ready_timeout)
    r.add_argument("server_args", nargs=argparse.REMAINDER)
    return r


def server_flags(args) -> list:
    return [x for x in args.server_args if x != "--"]


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = add_run_command(sub, os.environ.get("SMOLLM2_DIR", "/root/smollm2"), 420)
    r.add_argument("--long-tokens", type=int, default=6000)
    c = sub.add_parser("compare")
    c.add_argument("stock")
    c.add_argument("ours")
    c.add_argument("--json", required=True)
    args = p.parse_args()
    if args.cmd == "run":
        args.server_args = server_flags(args)
        run(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
