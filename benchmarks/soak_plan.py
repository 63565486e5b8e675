"""What the soak sends and how its outcome is judged; pure (no server), so the CPU tests check it.

Traffic (token ids, so lengths are exact; a few text prompts take the tokenizer path):
- mixed: short, long (sparse-decoded: at least dense_below tokens, a quarter just below it so decode crosses into the
  sparse path), streamed to the end, streamed then disconnected, streamed then aborted through /abort_request,
  longer than the context (must be refused with an HTTP 4xx, the server staying up), and 3-turn conversations that
  share one long prefix (radix-cache reuse of prefix and index);
- burst: more tokens at once than the KV pool holds: queued, none dropped, with retraction under pressure;
- determinism: one fixed set, sequential at temperature 0 after a cache flush, run twice.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

SHORT_TEXTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "Water boils at",
               "Once upon a time, there was a", "The square root of 144 is", "import numpy as np\n",
               "Translate to French: good morning"]
# requests in the mixed phase, by kind (a "turns" task is TURNS requests)
SHARES = {"short": 0.26, "long": 0.16, "stream": 0.13, "disconnect": 0.11, "abort": 0.11, "overlong": 0.04,
          "turns": 0.19}
TURNS = 3
CUT_KINDS = ("disconnect", "abort")
ERROR_OUTCOMES = ("error", "wrong_length", "accepted_overlong")
LEAK_KEYS = ("kv_slots_in_use", "host_slots_in_use", "host_cache_lines_live", "request_rows_in_use",
             "running_requests", "waiting_requests")
RETRACT = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")
SGLANG_LEAK = re.compile(r"memory leak detected|Mem Leak Detected|double free|use-after-free")
HOST_READS = re.compile(r"asynctls host reads: rows/step ([\d,]+), host share ([\d.]+)")


@dataclass(frozen=True)
class Shape:
    vocab: int
    context: int
    dense_below: int


@dataclass(frozen=True)
class Task:
    index: int
    kind: str
    max_new_tokens: int
    input_ids: Tuple[int, ...] = ()
    text: str = ""
    cut_after: int = 0  # stream chunks read before the disconnect / abort
    follow_ups: Tuple[Tuple[int, ...], ...] = ()  # turns: ids appended after each answer

    @property
    def requests(self) -> int:
        return 1 + len(self.follow_ups)


def _ids(rng: random.Random, n: int, vocab: int) -> Tuple[int, ...]:
    return tuple(rng.randrange(1000, vocab) for _ in range(n))


def _task(kind: str, i: int, rng: random.Random, s: Shape, prefix: Tuple[int, ...]) -> Task:
    if kind == "short":
        if rng.random() < 0.5:
            return Task(i, kind, rng.choice([8, 32, 64]), text=rng.choice(SHORT_TEXTS) + f" (request {i})")
        return Task(i, kind, rng.choice([8, 32, 64]), _ids(rng, rng.randint(8, 200), s.vocab))
    if kind == "long":
        n = (rng.randint(s.dense_below - 48, s.dense_below - 1) if rng.random() < 0.25  # crosses while decoding
             else rng.randint(s.dense_below, s.context - 1100))
        return Task(i, kind, rng.choice([16, 64]), _ids(rng, n, s.vocab))
    if kind == "stream":
        return Task(i, kind, rng.choice([16, 64, 128]), _ids(rng, rng.randint(16, s.context - 1100), s.vocab))
    if kind in CUT_KINDS:  # long enough to be cut mid-stream
        n = rng.choice([rng.randint(16, 512), rng.randint(s.dense_below, s.context - 1100)])
        return Task(i, kind, 512, _ids(rng, n, s.vocab), cut_after=rng.randint(1, 4))
    if kind == "overlong":
        return Task(i, kind, 16, _ids(rng, s.context + rng.randint(1, 2000), s.vocab))
    if kind == "turns":
        return Task(i, kind, 48, prefix + _ids(rng, rng.randint(64, 256), s.vocab),
                    follow_ups=tuple(_ids(rng, rng.randint(32, 128), s.vocab) for _ in range(TURNS - 1)))
    raise ValueError(kind)


def counts(n_requests: int, min_cut: int) -> dict:
    """Tasks per kind so the requests add up to n_requests, at least min_cut of them cut mid-stream."""
    per_task = {k: TURNS if k == "turns" else 1 for k in SHARES}
    out = {k: int(SHARES[k] * n_requests / per_task[k]) for k in SHARES}
    while out["disconnect"] + out["abort"] < min_cut:
        out["disconnect" if out["disconnect"] <= out["abort"] else "abort"] += 1
    out["short"] += max(0, n_requests - sum(out[k] * per_task[k] for k in out))  # the remainder
    return out


def mixed_plan(n_requests: int, min_cut: int, s: Shape, seed: int = 0) -> List[Task]:
    rng = random.Random(seed)
    prefix = _ids(rng, s.dense_below + 256, s.vocab)  # every conversation shares it, so turn 1 is sparse too
    kinds = [k for k, n in counts(n_requests, min_cut).items() for _ in range(n)]
    rng.shuffle(kinds)
    return [_task(k, i, rng, s, prefix) for i, k in enumerate(kinds)]


def burst_plan(pool_tokens: int, s: Shape, seed: int = 1, prompt: int = 1024, new: int = 256,
               factor: float = 2.0, cap: int = 128) -> List[Task]:
    """factor x the KV pool's tokens at once (capped at cap requests)."""
    rng = random.Random(seed)
    n = min(cap, math.ceil(factor * pool_tokens / (prompt + new)))
    return [Task(i, "burst", new, _ids(rng, prompt, s.vocab)) for i in range(n)]


def determinism_plan(s: Shape, seed: int = 2) -> List[Task]:
    rng = random.Random(seed)
    prefix = _ids(rng, s.dense_below + 128, s.vocab)
    short = [Task(i, "short", 32, text=t) for i, t in enumerate(SHORT_TEXTS)]
    long = [Task(100 + i, "long", 32, _ids(rng, rng.randint(s.dense_below, s.context - 1100), s.vocab))
            for i in range(6)]
    turns = [Task(200 + i, "turns", 32, prefix + _ids(rng, 64, s.vocab), follow_ups=(_ids(rng, 48, s.vocab),) * 2)
             for i in range(2)]
    return short + long + turns


# ----------------------------------------------------------------------------------------------- judging
def _complete(usage: Optional[dict]) -> bool:
    return bool(usage) and "error" not in usage and all(k in usage for k in (*LEAK_KEYS, "kv_slots_evictable"))


def idle_leaks(usage: Optional[dict]) -> Optional[int]:
    """Held by nothing, on an idle server before the flush (patches/pool_usage.py's report): KV slots beyond what
    the radix cache can evict (SGLang's own idle invariant), request rows, requests, host-row cache lines of live
    rows. None when there is no complete report to read. (The flush clears SGLang's pools wholesale, so the counts
    after it check the flush and the report, not the traffic.)"""
    if not _complete(usage):
        return None
    held = int(usage["kv_slots_in_use"]) - int(usage["kv_slots_evictable"])
    return held + sum(int(usage[k]) for k in LEAK_KEYS if k not in ("kv_slots_in_use", "host_slots_in_use"))


def flushed_leaks(usage: Optional[dict]) -> Optional[int]:
    """Anything still allocated after /flush_cache."""
    return sum(int(usage[k]) for k in LEAK_KEYS) if _complete(usage) else None


def log_facts(log_text: str) -> dict:
    retracted = [int(m) for m in RETRACT.findall(log_text)]
    shares = [float(s) for _, s in HOST_READS.findall(log_text)]
    return {"retractions": len(retracted), "retracted_requests": sum(retracted),
            "sglang_leak_warnings": len(SGLANG_LEAK.findall(log_text)),
            "tracebacks": log_text.count("Traceback"),
            "host_read_lines": len(shares), "max_host_share": max(shares, default=None)}


def run_summary(outcomes: List[dict], burst: List[dict], leaks: List[Optional[int]], log: dict,
                det: Tuple[list, list], det_requests: int, alive: bool, burst_tokens: int,
                pool_tokens: Optional[int]) -> dict:
    """outcomes / burst: one dict per task ({"kind", "outcome", "requests"}); leaks: soak.leak_check's count
    after the traffic and after the determinism passes; det: the two passes' outputs, det_requests the requests both sent."""
    every = outcomes + burst
    by = lambda name: sum(o["outcome"] == name for o in every)  # noqa: E731
    overlong = [o for o in outcomes if o["kind"] == "overlong"]
    leaked = None if any(x is None for x in leaks) or not leaks else sum(leaks) + log["sglang_leak_warnings"]
    return {"requests": sum(o["requests"] for o in every) + det_requests,
            "aborted": by("aborted"), "finished_before_cut": by("finished_before_cut"),
            "errors": sum(by(k) for k in ERROR_OUTCOMES),
            "overlong_rejected": sum(o["outcome"] == "rejected" for o in overlong), "overlong_sent": len(overlong),
            "burst_sent": len(burst), "burst_completed": sum(o["outcome"] == "done" for o in burst),
            "burst_exceeds_pool": pool_tokens is not None and burst_tokens > pool_tokens,
            "retractions": log["retractions"], "leaked": leaked,
            "deterministic": bool(det[0]) and det[0] == det[1] and all(x is not None for x in det[0]),
            "server_alive": alive}


def soak_summary(runs: dict) -> dict:
    """runs: label -> run_summary. Every run must meet the goals, so counts are the least over the runs."""
    rs = list(runs.values())
    leaks = [r["leaked"] for r in rs]
    return {"soak_requests": min((r["requests"] for r in rs), default=0),
            "soak_aborted": min((r["aborted"] for r in rs), default=0),
            "soak_leaked": None if not rs or any(x is None for x in leaks) else sum(leaks),
            "soak_deterministic": bool(rs) and all(r["deterministic"] for r in rs),
            "soak_errors": sum(r["errors"] for r in rs),
            "soak_burst_all_complete": bool(rs) and all(r["burst_sent"] and r["burst_completed"] == r["burst_sent"]
                                                       and r["burst_exceeds_pool"] for r in rs),
            "soak_overlong_rejected": bool(rs) and all(r["overlong_sent"] and r["overlong_rejected"] ==
                                                      r["overlong_sent"] for r in rs),
            "soak_retractions": {label: r["retractions"] for label, r in runs.items()},
            "soak_server_alive": bool(rs) and all(r["server_alive"] for r in rs),
            "soak_runs": sorted(runs)}
