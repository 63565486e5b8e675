"""Long-context fidelity of a real SGLang server (greedy /generate), the same prompts against several launches.

    python benchmarks/fidelity_server.py prompts --model DIR --out P.jsonl          # 5 tasks x 8k/16k/32k x 24
    python benchmarks/fidelity_server.py plan --prompts P.jsonl --model DIR --dir RUNS   # the launch commands
    python benchmarks/fidelity_server.py run --prompts P.jsonl --out RUNS/dense.json --launch DIR
    python benchmarks/fidelity_server.py run --prompts P.jsonl --out RUNS/kt1024.json --token-budget 1024 --launch DIR
    python benchmarks/fidelity_server.py summarize RUNS/*.json --prompts P.jsonl --out RESULT.json   # + RESULT.png

Budgets: the server's k_t is one per launch, so a launch runs one k_t and serves every context c whose fraction
c / k_t is one asked for (--fractions 8,16,32): k_t 1024 serves 8k at 1/8, 16k at 1/16 and 32k at 1/32, and the
matrix is dense + k_t in {256, 512, 1024, 2048, 4096} (6 launches, not 10). Each sparse launch gets the reference
harness's budget for that k_t (`fidelity.Budget.fraction_of`: k_b * 64 = 4 k_t, sink and window shrunk below
k_t 1024) and --asynctls-dense-below 4096, under every prompt (>= 8,128 tokens): every answer token is decoded
sparse. The dense launch is stock SGLang (no asynctls flag). --url talks to a server already running instead of
--launch; then the flags it was started with are the caller's business (`plan` prints them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fidelity_server_prompts as prompt_set  # noqa: E402
import fidelity_server_report as report  # noqa: E402
import server_parity  # noqa: E402

DENSE_BELOW = 4096
RUN_KEYS = ("date", "token_budget", "block_budget", "served", "server_flags", "environment", "ready_s", "wall_s")
SERVER_CONTEXT = 32768


def served_contexts(token_budget: int, contexts, fractions) -> dict:
    """context -> fraction for the contexts a launch at k_t = token_budget serves."""
    return {str(c): f for c in contexts for f in fractions if c // f == token_budget}


def asynctls_flags(token_budget: int, dense_below: int = DENSE_BELOW, block_budget: int = None) -> list:
    """The reference harness's budget for k_t (k_b * 64 = 4 k_t unless block_budget is given)."""
    from sglang_asynctls.fidelity import Budget

    b = Budget.fraction_of(token_budget, 1)
    return ["--enable-asynctls", "--asynctls-token-budget", str(b.token_budget), "--asynctls-block-budget",
            str(block_budget or b.block_budget), "--asynctls-sink-tokens", str(b.sink_tokens),
            "--asynctls-local-window", str(b.local_window), "--asynctls-dense-below", str(dense_below)]


def token_budgets(contexts, fractions) -> list:
    return sorted({c // f for c in contexts for f in fractions})


def read_prompts(path) -> list:
    """JSONL, or JSONL.gz (the 32k set is 37.5 MB plain, 9.4 MB gzipped: one device call carries it)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(url: str, prompt: dict, timeout: float) -> dict:
    body = {"input_ids": prompt["input_ids"],
            "sampling_params": {"temperature": 0, "max_new_tokens": prompt["max_new_tokens"]}}
    req = urllib.request.Request(f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.time()
    try:
        out = json.loads(urllib.request.urlopen(req, timeout=timeout).read())
    except Exception as e:  # one failed prompt is recorded, the run goes on
        return {"error": f"{type(e).__name__}: {e}"}
    return {"text": out["text"], "output_ids": out.get("output_ids"), "e2e_s": round(time.time() - t0, 3)}


def send_all(url: str, prompts: list, concurrency: int, timeout: float, wait_s: float = None) -> dict:
    """id -> output; haystacks asked several questions go in order, so the radix cache shares their context.
    A prompt still unanswered after wait_s is recorded as an error (the run still writes what it measured)."""
    from tqdm import tqdm

    pool = concurrent.futures.ThreadPoolExecutor(concurrency)
    futures = {pool.submit(generate, url, p, timeout): p["id"] for p in prompts}
    answered = {}
    try:
        for f in tqdm(concurrent.futures.as_completed(futures, timeout=wait_s), total=len(futures),
                      desc="prompts", unit="prompt"):
            answered[futures[f]] = f.result()
    except concurrent.futures.TimeoutError:
        pass
    pool.shutdown(wait=False, cancel_futures=True)  # requests still in flight end when the server stops
    late = {"error": f"not answered within the run's deadline ({wait_s:.0f} s left for requests)"} if wait_s else {}
    return {p["id"]: answered.get(p["id"], late) for p in prompts}


def run(args) -> None:
    started = time.time()
    prompts = read_prompts(args.prompts)
    contexts = sorted({p["context"] for p in prompts})
    served = (served_contexts(args.token_budget, contexts, args.fractions) if args.token_budget
              else {str(c): None for c in contexts})
    if not served:
        sys.exit(f"k_t {args.token_budget} serves no context of {contexts} at fractions {args.fractions}")
    todo = [p for p in prompts if str(p["context"]) in served]
    if args.block_budget and not args.token_budget:
        sys.exit("--block-budget needs --token-budget (the dense run has no budgets)")
    flags = (asynctls_flags(args.token_budget, args.dense_below, args.block_budget) if args.token_budget
             else []) + args.server_args
    result = {"label": args.label or (f"kt{args.token_budget}" if args.token_budget else "dense"),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
              "token_budget": args.token_budget, "block_budget": args.block_budget, "served": served,
              "server_flags": flags, "environment": server_parity.environment(), "prompts_file": str(args.prompts)}
    proc = None
    if args.launch:
        url = f"http://127.0.0.1:{server_parity.PORT}"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.launch, "--port",
               str(server_parity.PORT), "--context-length", str(SERVER_CONTEXT), *flags]
        log = args.out.with_suffix(".log")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        result["server_cmd"] = cmd
        t0 = time.time()
        server_parity.wait_ready(proc, str(log), args.ready_timeout)
        result["ready_s"] = round(time.time() - t0, 1)
    else:
        url = args.url
    try:
        t0 = time.time()
        wait_s = max(1.0, args.deadline_s - (time.time() - started)) if args.deadline_s else None
        result["outputs"] = send_all(url, todo, args.concurrency, args.timeout, wait_s)
        result["wall_s"] = round(time.time() - t0, 1)
    finally:
        if proc is not None:
            server_parity.stop_server(proc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result) + "\n")
    bad = sum(1 for o in result["outputs"].values() if o.get("error"))
    print(f"wrote {args.out}: {len(todo)} prompts ({bad} failed) in {result['wall_s']} s")


def plan(args) -> None:
    prompts = read_prompts(args.prompts)
    contexts = sorted({p["context"] for p in prompts})
    base = f"python benchmarks/fidelity_server.py run --prompts {args.prompts} --launch {args.model}"
    print(f"{base} --out {args.dir}/dense.json")
    for kt in token_budgets(contexts, args.fractions):
        served = ", ".join(f"{int(c) // 1024}k at 1/{f}" for c, f in served_contexts(kt, contexts,
                                                                                      args.fractions).items())
        print(f"{base} --token-budget {kt} --out {args.dir}/kt{kt}.json    # {served}: {' '.join(asynctls_flags(kt))}")


def prompts_cmd(args) -> None:
    import os
    import platform

    from sglang_asynctls import calibrate, code_lines, hf_model, needles

    if args.stdlib:
        os.environ[calibrate.STDLIB_ENV] = args.stdlib
    tok = hf_model.load_tokenizer(args.model)
    prompts = prompt_set.build_prompts(tok, args.contexts, args.per_task, args.seed, args.tasks)
    args.out.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    meta = {"model": args.model, "seed": args.seed, "per_task": args.per_task, "contexts": args.contexts,
            "python": platform.python_version(), "stdlib": str(calibrate.stdlib_dir()),
            "text_sha256_16": calibrate.text_digest([*code_lines.CODE_MODULES, needles.HAYSTACK_FILE])}
    args.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}: {len(prompts)} prompts, {prompt_set.prompts_per_task(prompts)} per task and context")


def summarize(args) -> None:
    prompts = read_prompts(args.prompts)
    runs = [json.loads(Path(r).read_text()) for r in args.runs]
    result = report.summarize(prompts, runs, args.fractions)
    dates = sorted(r["date"] for r in runs if r.get("date"))
    result = {"benchmark": "fidelity_server", "command": " ".join(["python"] + sys.argv),
              "date": f"{dates[0]} .. {dates[-1]}" if dates else None, "build": args.build,
              "runs": {r["label"]: {k: r.get(k) for k in RUN_KEYS} for r in runs}, **result}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    env = runs[0].get("environment", {})
    report.plot(result, args.out.with_suffix(".png"), f"{args.title} ({env.get('gpu', '?')})")
    print(json.dumps(result["summary"], indent=1))


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prompts", help="build the prompt set (token ids) with the model's tokenizer")
    pr.add_argument("--model", required=True, help="HF model dir (its tokenizer)")
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--contexts", type=_ints, default=list(prompt_set.CONTEXTS))
    pr.add_argument("--per-task", type=int, default=24)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--tasks", type=lambda s: s.split(","), default=list(prompt_set.TASKS))
    pr.add_argument("--stdlib", default=None, help="a copied stdlib dir (texts differ between Python versions)")
    for name in ("plan", "run", "summarize"):
        s = sub.add_parser(name)
        s.add_argument("--prompts", required=True)
        s.add_argument("--fractions", type=_ints, default=[8, 16, 32], help="token budgets as fractions 1/f")
    pl = sub.choices["plan"]
    pl.add_argument("--model", required=True)
    pl.add_argument("--dir", required=True, help="where the runs go")
    r = sub.choices["run"]
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--token-budget", type=int, default=None, help="k_t of this launch; none = dense (stock)")
    r.add_argument("--label", default=None)
    r.add_argument("--block-budget", type=int, default=None, help="k_b of this launch (default 4 k_t / 64)")
    r.add_argument("--dense-below", type=int, default=DENSE_BELOW)
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:30000")
    where.add_argument("--launch", metavar="MODEL_DIR", help="launch sglang.launch_server on this model")
    r.add_argument("--ready-timeout", type=float, default=600)
    r.add_argument("--timeout", type=float, default=600, help="seconds per request")
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--deadline-s", type=float, default=None,
                   help="the whole run, launch included, stops waiting this many seconds after it began (under a "
                        "per-call limit); prompts not answered by then are errors, not wrong answers")
    r.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more server flags")
    sm = sub.choices["summarize"]
    sm.add_argument("runs", nargs="+")
    sm.add_argument("--out", required=True, type=Path)
    sm.add_argument("--build", default=None, help="the commit the runs' working tree was at (the host has no .git)")
    sm.add_argument("--title", default="Qwen2.5-Coder fidelity through SGLang")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        args.server_args = [x for x in args.server_args if x != "--"]
    {"prompts": prompts_cmd, "plan": plan, "run": run, "summarize": summarize}[args.cmd](args)


if __name__ == "__main__":
    main()
