"""The soak: its traffic plan (kinds, counts, lengths against the server's context and dense_below), the judging
(leaks, determinism, goals over runs), and on the CPU a whole run against a stand-in server (stdlib HTTP: streams,
/abort_request, refusals of overlong prompts, the pool report) that can leak or answer at random on request."""

import json
import os
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import soak  # noqa: E402
import soak_plan as sp  # noqa: E402

SHAPE = sp.Shape(vocab=49152, context=8192, dense_below=2048)


def test_counts_reach_the_requests_and_the_cut_minimum():
    for n, cut in ((300, 40), (40, 6), (300, 90)):
        c = sp.counts(n, cut)
        requests = sum(v * (sp.TURNS if k == "turns" else 1) for k, v in c.items())
        assert n <= requests <= n + cut and c["disconnect"] + c["abort"] >= cut, (n, cut, c)
        assert all(v > 0 for v in c.values()) or n < 100


def test_mixed_plan_lengths_fit_the_server():
    plan = sp.mixed_plan(300, 40, SHAPE, seed=0)
    assert sum(t.requests for t in plan) >= 300 and len({t.index for t in plan}) == len(plan)
    by = {k: [t for t in plan if t.kind == k] for k in sp.SHARES}
    assert len(by["disconnect"]) + len(by["abort"]) >= 40
    for t in plan:
        n = len(t.input_ids) + sum(len(f) for f in t.follow_ups) + t.requests * t.max_new_tokens
        if t.kind == "overlong":
            assert len(t.input_ids) > SHAPE.context
        else:
            assert n < SHAPE.context, (t.kind, n)
        assert all(1000 <= i < SHAPE.vocab for i in t.input_ids)
    long = [len(t.input_ids) for t in by["long"]]
    assert any(n >= SHAPE.dense_below for n in long) and any(n < SHAPE.dense_below for n in long)
    prefixes = {t.input_ids[:SHAPE.dense_below] for t in by["turns"]}
    assert len(prefixes) == 1 and all(len(t.input_ids) > SHAPE.dense_below for t in by["turns"])
    assert all(1 <= t.cut_after <= 4 and t.max_new_tokens > 4 for t in by["abort"] + by["disconnect"])
    assert sp.mixed_plan(300, 40, SHAPE, seed=0) == plan != sp.mixed_plan(300, 40, SHAPE, seed=1)


def test_burst_exceeds_the_pool():
    burst = sp.burst_plan(16384, SHAPE)
    assert sum(len(t.input_ids) + t.max_new_tokens for t in burst) >= 2 * 16384
    assert len(sp.burst_plan(10**7, SHAPE)) == 128  # capped


def test_determinism_plan_has_sparse_and_multi_turn_requests():
    plan = sp.determinism_plan(SHAPE)
    assert plan == sp.determinism_plan(SHAPE)
    assert any(t.text for t in plan) and any(len(t.input_ids) >= SHAPE.dense_below for t in plan)
    assert any(t.follow_ups for t in plan)


def _usage(**over):
    return {**{k: 0 for k in sp.LEAK_KEYS}, "kv_slots_evictable": 0, "host_cache_lines_tagged": 12, **over}


def test_leaks_before_and_after_the_flush():
    assert sp.idle_leaks(_usage()) == sp.flushed_leaks(_usage()) == 0  # stale lines of free rows are no leak
    cached = _usage(kv_slots_in_use=640, kv_slots_evictable=640, host_slots_in_use=128)  # the radix cache's
    assert sp.idle_leaks(cached) == 0 and sp.flushed_leaks(cached) == 768
    held = _usage(kv_slots_in_use=704, kv_slots_evictable=640, request_rows_in_use=1, host_cache_lines_live=8)
    assert sp.idle_leaks(held) == 64 + 1 + 8
    assert sp.flushed_leaks(_usage(host_slots_in_use=64, request_rows_in_use=1)) == 65
    for bad in ({"error": "no report"}, None, {"kv_slots_in_use": 0}):  # a partial report is no proof
        assert sp.idle_leaks(bad) is None and sp.flushed_leaks(bad) is None


def test_log_facts():
    log = ("KV cache pool is full. Retract requests. #retracted_reqs: 3, #new_tokens_gained: 900\n"
           "KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 300\n"
           "asynctls host reads: rows/step 1,234, host share 0.412, cache hit 0.9, PCIe MB/step 1.00 (10 steps)\n"
           "token_to_kv_pool_allocator memory leak detected! available_size=1\n")
    f = sp.log_facts(log)
    assert (f["retractions"], f["retracted_requests"], f["sglang_leak_warnings"]) == (2, 4, 1)
    assert f["host_read_lines"] == 1 and f["max_host_share"] == 0.412


def _summary(leaks=(0, 0), det=([1], [1]), outcomes=None, burst=None, warnings=0):
    outcomes = outcomes or [{"kind": "short", "outcome": "done", "requests": 1},
                            {"kind": "turns", "outcome": "done", "requests": 3},
                            {"kind": "abort", "outcome": "aborted", "requests": 1},
                            {"kind": "overlong", "outcome": "rejected", "requests": 1}]
    burst = burst or [{"kind": "burst", "outcome": "done", "requests": 1}] * 3
    log = {"retractions": 2, "sglang_leak_warnings": warnings}
    return sp.run_summary(outcomes, burst, list(leaks), log, det, 2 * len(det[0]), True, burst_tokens=300,
                          pool_tokens=100)


def test_run_summary():
    s = _summary()
    assert (s["requests"], s["aborted"], s["errors"], s["leaked"], s["deterministic"]) == (11, 1, 0, 0, True)
    assert s["burst_completed"] == s["burst_sent"] == 3 and s["burst_exceeds_pool"]
    assert _summary(leaks=(0, 5))["leaked"] == 5 and _summary(leaks=(0, None))["leaked"] is None
    assert _summary(warnings=1)["leaked"] == 1
    assert not _summary(det=([1], [2]))["deterministic"] and not _summary(det=([], []))["deterministic"]
    assert not _summary(det=([None], [None]))["deterministic"]
    errs = _summary(outcomes=[{"kind": "overlong", "outcome": "accepted_overlong", "requests": 1}])
    assert errs["errors"] == 1 and errs["overlong_rejected"] == 0


def test_soak_summary_takes_the_least_of_the_runs():
    a, b = _summary(), _summary(leaks=(2, 0))
    b["requests"], b["aborted"] = 400, 45
    s = sp.soak_summary({"plain": a, "host": b})
    assert (s["soak_requests"], s["soak_aborted"], s["soak_leaked"], s["soak_deterministic"]) == (11, 1, 2, True)
    assert s["soak_runs"] == ["host", "plain"] and s["soak_burst_all_complete"] and s["soak_overlong_rejected"]
    assert sp.soak_summary({"plain": a, "host": _summary(leaks=(None, 0))})["soak_leaked"] is None
    assert sp.soak_summary({})["soak_deterministic"] is False


# ------------------------------------------------------------------------------ a whole run, stand-in server
# SGLang's HTTP surface as the soak and the launch matrix use it (tests/test_launch_matrix.py runs it too): streams,
# /abort_request, overlong refusals, the pool report; flags make it leak, answer at random, refuse at launch, leave a
# child behind or ignore SIGTERM
FAKE = textwrap.dedent("""
    import hashlib, json, random, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    argv = sys.argv
    if "--fake-refuse" in argv or ("--asynctls-host-cache-tokens" in argv and "--max-running-requests" not in argv):
        print("sglang-asynctls: error: --asynctls-host-cache-tokens needs --max-running-requests: rows")
        sys.exit(2)
    port = int(argv[argv.index("--port") + 1])
    db = int(argv[argv.index("--asynctls-dense-below") + 1]) if "--asynctls-dense-below" in argv else 8192
    if "--fake-child" in argv:  # a scheduler-like child the launcher forgets to end
        import subprocess
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    aborted, lock, active, cached, arrived = set(), threading.Lock(), [0], [0], [0]
    def tokens(body):
        ids = body.get("input_ids") or body["text"].split()
        if "--fake-random" in argv:
            return [random.randrange(50000) for _ in range(body["sampling_params"]["max_new_tokens"])]
        h = int(hashlib.md5(json.dumps(ids).encode()).hexdigest(), 16)
        return [(h >> i) % 49152 for i in range(body["sampling_params"]["max_new_tokens"])]
    class H(BaseHTTPRequestHandler):
        def _send(self, body, code=200):
            data = json.dumps(body).encode()
            self.send_response(code); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            if self.path.startswith("/flush_cache"):
                cached[0] = 0
            if self.path == "/health" or self.path.startswith("/flush_cache"):
                return self._send("ok")
            if self.path == "/v1/loads":
                return self._send({"loads": [{"num_used_tokens": 0, "num_running_reqs": active[0],
                                              "num_waiting_reqs": 0}]})
            held = 64 if "--fake-leak" in argv else 0  # what a leak would hold; cached[0]: the radix cache's
            report = {"kv_slots_in_use": held + cached[0], "kv_slots_evictable": cached[0],
                      "host_slots_in_use": cached[0] // 2,
                      "host_cache_lines_live": 0, "host_cache_lines_tagged": 0, "request_rows_in_use": 0,
                      "running_requests": 0, "waiting_requests": 0, "config": {"dense_below": db},
                      "index": {"index_arrivals": arrived[0]}}
            self._send({"context_length": 8192, "max_total_num_tokens": 4096,
                        "internal_states": [{"asynctls": report}]})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            cached[0] = 640
            arrived[0] += "bootstrap_host" in body  # a PD decode server's arrived request (pd_bench.py smoke)
            if self.path == "/abort_request":
                aborted.add(body["rid"])
                return self._send({})
            n_in = len(body.get("input_ids") or body.get("text", "").split())
            if n_in >= 8192:
                return self._send({"object": "error", "message": f"The input ({n_in} tokens) is longer than the "
                                   "model's context length (8192 tokens).", "code": 400}, 400)
            out = tokens(body)
            if not body.get("stream"):
                return self._send({"text": "x", "output_ids": out, "meta_info": {
                    "prompt_tokens": n_in, "completion_tokens": len(out), "finish_reason": {"type": "length"}}})
            self.send_response(200); self.end_headers()
            with lock:
                active[0] += 1
            try:
                for i in range(len(out)):
                    done = body.get("rid") in aborted and {"type": "abort"} or (
                        i == len(out) - 1 and {"type": "length"} or None)
                    chunk = {"meta_info": {"completion_tokens": i + 1, "finish_reason": done}}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\\n\\n")
                    self.wfile.flush()
                    if done:
                        break
                    time.sleep(0.003)
                self.wfile.write(b"data: [DONE]\\n\\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with lock:
                    active[0] -= 1
        def log_message(self, *a):
            pass
    import signal
    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    if "--fake-ignore-sigterm" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
    print("KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 10", flush=True)
    srv.serve_forever()
""")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    monkeypatch.setattr(soak, "launch_cmd", lambda model, port, flags: [sys.executable, str(script), "--port",
                                                                        str(port), *flags])
    return tmp_path


def _run(tmp_path, name, *extra):
    args = SimpleNamespace(preset="plain", out=str(tmp_path / f"{name}.json"), model=str(tmp_path), requests=40,
                           min_aborted=6, concurrency=8, seed=0, time_limit=150, ready_timeout=30, port=31250,
                           gpu=0, git_rev="test", server_args=["--", *extra])
    soak.run(args)
    return json.load(open(args.out))


def test_a_whole_run_on_the_stand_in(stand_in):
    t0 = time.time()
    r = _run(stand_in, "plain")
    s = r["summary"]
    assert s["errors"] == 0, [o for o in r["mixed"] + r["burst"] if o["outcome"] in sp.ERROR_OUTCOMES]
    det_requests = 2 * sum(t.requests for t in sp.determinism_plan(sp.Shape(49152, 8192, 2048)))
    assert s["requests"] == 40 + len(r["burst"]) + det_requests and s["aborted"] >= 6
    assert r["leak_after_traffic"]["before_flush"]["kv_slots_evictable"] == 640  # cached, not leaked
    assert s["leaked"] == 0 and s["deterministic"] and s["server_alive"] and s["retractions"] == 1
    assert s["overlong_rejected"] == s["overlong_sent"] >= 1
    assert s["burst_completed"] == s["burst_sent"] and s["burst_exceeds_pool"]
    aborts = [o for o in r["mixed"] if o["kind"] == "abort" and o["outcome"] == "aborted"]
    assert aborts and all(o["finish"] == "abort" for o in aborts)
    assert r["stop"]["clean"] and "--enable-asynctls" in r["command"] and time.time() - t0 < 150
    out = str(stand_in / "soak.json")
    soak.summarize(SimpleNamespace(runs=[r["log"].replace("_server.log", ".json")], json=out))
    assert json.load(open(out))["summary"]["soak_leaked"] == 0


def test_a_leak_and_random_outputs_are_caught(stand_in):
    r = _run(stand_in, "bad", "--fake-leak", "--fake-random")
    assert r["summary"]["leaked"] == 256  # 64 held slots before and after each of the two flushes
    assert r["summary"]["deterministic"] is False
