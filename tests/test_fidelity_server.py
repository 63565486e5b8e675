"""benchmarks/fidelity_server.py on CPU: the prompt set (sizes, determinism, answers in place), the launch matrix
(k_t per launch -> contexts it serves, flags AsyncTLSConfig accepts), and run + summarize against a fake
/generate whose wrong answers are chosen, so every summary number is known in advance."""

import http.server
import json
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("matplotlib")
import fidelity_server as fs  # noqa: E402
import fidelity_server_prompts as prompt_set  # noqa: E402

from sglang_asynctls import smollm2  # noqa: E402
from sglang_asynctls.config import AsyncTLSConfig  # noqa: E402

CONTEXTS, PER_TASK = (1024, 2048), 4


@pytest.fixture(scope="module")
def tok():
    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return prompt_set.build_prompts(tok, CONTEXTS, PER_TASK, seed=3)


def test_prompt_set_sizes_and_answers(tok, prompts):
    assert prompt_set.prompts_per_task(prompts) == {t: PER_TASK for t in prompt_set.TASKS}
    assert len({p["id"] for p in prompts}) == len(prompts)
    for p in prompts:
        n = len(p["input_ids"])
        assert 0.95 * (p["context"] - prompt_set.RESERVE) <= n <= p["context"] - prompt_set.RESERVE, (p["id"], n)
        text = tok.decode(p["input_ids"])
        if p["task"] == "code":
            assert p["answer"].strip() and p["module"] not in ("argparse.py", "subprocess.py")
        else:
            assert text.count(p["answer"]) >= 1, p["id"]  # the needle holds the answer
    vt = [p for p in prompts if p["task"] == "variable_tracking"][0]
    assert len(vt["needle_positions"]) == 6  # 2 chains of value + 2 hops
    mv = [p for p in prompts if p["task"] == "multivalue" and p["context"] == 1024]
    assert len({tuple(p["input_ids"][:900]) for p in mv}) == 1  # one haystack, four questions
    depths = {p["depth"] for p in prompts if p["task"] == "passkey" and p["context"] == 2048}
    assert len(depths) == PER_TASK and min(depths) < 0.1 and max(depths) > 0.9


def test_prompt_set_is_deterministic_from_the_seed(tok, prompts):
    again = prompt_set.build_prompts(tok, CONTEXTS[:1], PER_TASK, seed=3)
    assert again == [p for p in prompts if p["context"] == CONTEXTS[0]]
    other = prompt_set.build_prompts(tok, CONTEXTS[:1], PER_TASK, seed=4)
    assert [p["input_ids"] for p in other] != [p["input_ids"] for p in again]


def test_launch_matrix_of_the_gpu_run():
    assert fs.token_budgets((8192, 16384, 32768), (8, 16, 32)) == [256, 512, 1024, 2048, 4096]
    assert fs.served_contexts(1024, (8192, 16384, 32768), (8, 16, 32)) == {"8192": 8, "16384": 16, "32768": 32}
    assert fs.served_contexts(4096, (8192, 16384, 32768), (8, 16, 32)) == {"32768": 8}
    for kt in (256, 1024, 4096):
        flags = fs.asynctls_flags(kt)
        vals = dict(zip(flags[1::2], map(int, flags[2::2])))
        cfg = AsyncTLSConfig(enabled=True, token_budget=vals["--asynctls-token-budget"],
                             block_budget=vals["--asynctls-block-budget"],
                             sink_tokens=vals["--asynctls-sink-tokens"],
                             local_window=vals["--asynctls-local-window"],
                             dense_below=vals["--asynctls-dense-below"])
        assert cfg.token_budget == kt and cfg.block_budget * 64 == 4 * kt
        assert cfg.dense_below < 8192 - prompt_set.RESERVE  # every 8k prompt decodes sparse


class FakeServer(http.server.ThreadingHTTPServer):
    """/generate answers every prompt right, except the ids in `wrong`; the ids in `stall` answer after 30 s."""

    def __init__(self, prompts):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.by_ids = {tuple(p["input_ids"]): p for p in prompts}
        self.wrong, self.stall = set(), set()
        self.seen = []


class FakeHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/generate" and body["sampling_params"]["temperature"] == 0
        p = self.server.by_ids[tuple(body["input_ids"])]
        self.server.seen.append(p["id"])
        if p["id"] in self.server.stall:
            time.sleep(30)
        right = p["answer"] + "\n    x" if p["task"] == "code" else f" {p['answer']}."
        text = " 00000." if p["id"] in self.server.wrong else right
        data = json.dumps({"text": text, "output_ids": [ord(c) for c in text]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_run_and_summary_against_a_fake_server(tmp_path, prompts):
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    srv = FakeServer(prompts)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        fs.main(["run", "--prompts", str(pfile), "--out", str(tmp_path / "dense.json"), "--url", url])
        assert sorted(srv.seen) == sorted(p["id"] for p in prompts)
        # k_t 128 serves 1k at 1/8 and 2k at 1/16; at 2k it misses one passkey and two code lines
        srv.wrong, srv.seen = {"passkey/2048/0/0", "code/2048/0/0", "code/2048/1/0"}, []
        fs.main(["run", "--prompts", str(pfile), "--out", str(tmp_path / "kt128.json"), "--url", url,
                 "--token-budget", "128", "--fractions", "8,16"])
        assert len(srv.seen) == len(prompts)
        run = json.loads((tmp_path / "kt128.json").read_text())
        assert run["served"] == {"1024": 8, "2048": 16} and "--asynctls-token-budget" in run["server_flags"]
        assert run["date"].endswith(" UTC") and run["date"][:2] == "20"
    finally:
        srv.shutdown()
    out = tmp_path / "result.json"
    fs.main(["summarize", str(tmp_path / "dense.json"), str(tmp_path / "kt128.json"), "--prompts", str(pfile),
             "--out", str(out), "--fractions", "8,16"])
    s = json.loads(out.read_text())["summary"]
    assert s["prompts_per_task"] == PER_TASK and s["errors"] == 0
    assert s["retrieval_ratio_vs_dense_1k_b8"] == 1.0 and s["agreement_1k_b8"] == 1.0
    assert s["retrieval_ratio_vs_dense_2k_b16"] == pytest.approx(3 / 4)  # passkey 3/4, the others 4/4
    assert s["code_completion_ratio_2k_b16"] == pytest.approx(2 / 4)
    assert s["agreement_2k_b16"] == pytest.approx(1 - 3 / (5 * PER_TASK))
    assert "retrieval_ratio_vs_dense_2k_b8" not in s  # 2k at 1/8 was not served
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_failed_prompt_is_an_error_not_a_wrong_answer():
    out = fs.generate("http://127.0.0.1:9", {"input_ids": [1], "max_new_tokens": 1}, timeout=2)
    assert "error" in out


def test_deadline_records_unanswered_prompts_as_errors(tmp_path, prompts):
    """A run under a device's per-call limit writes what it got: late prompts are errors, the rest are kept."""
    few = prompts[:6]
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in few))
    srv = FakeServer(few)
    srv.stall = {few[1]["id"]}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    t0 = time.time()
    try:
        fs.main(["run", "--prompts", str(pfile), "--out", str(tmp_path / "dense.json"), "--deadline-s", "3",
                 "--url", f"http://127.0.0.1:{srv.server_address[1]}"])
    finally:
        srv.shutdown()
    assert time.time() - t0 < 20
    out = json.loads((tmp_path / "dense.json").read_text())["outputs"]
    assert list(out) == [p["id"] for p in few]
    assert "deadline" in out[few[1]["id"]]["error"]
    assert all("text" in out[p["id"]] for p in few if p["id"] != few[1]["id"])


def test_agreement_is_right_when_dense_is_right_not_identical_text():
    """The issue's agreement: a sparse answer counts when it is right exactly when dense's is, whatever its words;
    identical_* keeps the stricter token-for-token share."""
    import fidelity_server_report as report

    ps = [dict(id=f"passkey/1024/{i}/0", task="passkey", context=1024, answer="12345", score="contains")
          for i in range(4)]
    dense = {"label": "dense", "token_budget": None, "served": {},
             "outputs": {ps[0]["id"]: {"text": " 12345."}, ps[1]["id"]: {"text": " 99999."},
                         ps[2]["id"]: {"text": " 12345."}, ps[3]["id"]: {"text": " 11111."}}}
    sparse = {"label": "kt128", "token_budget": 128, "served": {"1024": 8},
              "outputs": {ps[0]["id"]: {"text": " 12345!"}, ps[1]["id"]: {"text": " 88888."},  # both agree
                          ps[2]["id"]: {"text": " 54321."}, ps[3]["id"]: {"text": " 11111."}}}  # wrong, same
    wide = dict(sparse, label="kt128_kb32", block_budget=32,  # same k_t, more candidates: its own keys
                outputs={pid: {"text": " 12345."} for pid in dense["outputs"]})
    result = report.summarize(ps, [dense, sparse, wide], [8])
    s = result["summary"]
    assert s["agreement_1k_b8"] == pytest.approx(3 / 4)
    assert s["identical_1k_b8"] == pytest.approx(1 / 4)
    assert s["retrieval_ratio_vs_dense_1k_b8"] == pytest.approx(1 / 2)
    assert s["retrieval_ratio_vs_dense_1k_b8_kb32"] == 2.0 and s["agreement_1k_b8_kb32"] == pytest.approx(2 / 4)
    assert set(result["scores"]["1024"]) == {"dense", "1/8", "1/8 kb32"}
