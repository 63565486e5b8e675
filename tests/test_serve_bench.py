"""serve_bench's summary on recorded runs: the ratios are ours / baseline of the same metric, the parity count
compares greedy output ids prompt by prompt, and a failed workload gives a null ratio, never a number."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("matplotlib")


def _run(label, e2e, ttft, tok_s, free, short, long, failed=()):
    loads = {}
    for w in ("w1", "w2", "w3"):
        loads[w] = {"returncode": 1 if w in failed else 0, "median_e2e_latency_ms": e2e[w], "median_ttft_ms": ttft[w],
                    "output_throughput": tok_s[w], "p99_ttft_ms": 1.0, "median_itl_ms": 1.0,
                    "request_throughput": 1.0, "duration": 1.0, "completed": 16}
    return {"label": label, "server_cmd": ["python", label], "gpu": "NVIDIA H200", "gpu_free_gib_at_ready": free,
            "parity": {"short": short, "long": long}, "workloads": loads}


def test_summary_ratios_and_parity(tmp_path):
    from serve_bench import main

    base = _run("fa3", {"w1": 20000, "w2": 40000, "w3": 90000}, {"w1": 7000, "w2": 3000, "w3": 9000},
                {"w1": 90.0, "w2": 200.0, "w3": 700.0}, 9.0, [[1, 2], [3, 4], [5]], [7, 8, 9])
    ours = _run("asynctls", {"w1": 20400, "w2": 30000, "w3": 45000}, {"w1": 7070, "w2": 2900, "w3": 9900},
                {"w1": 88.0, "w2": 300.0, "w3": 1400.0}, 8.5, [[1, 2], [3, 0], [5]], [7, 8, 0], failed=("w1",))
    for run in (base, ours):
        (tmp_path / f"{run['label']}.json").write_text(json.dumps(run))
    rows = [{"method": m, "batch": 2, "input_len": 98304, "prefill_latency_s": s} for m, s in (("fa3", 13.0),
                                                                                              ("asynctls", 13.65))]
    (tmp_path / "one_batch.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "serve_bench_h200.json"
    sys.argv = ["serve_bench.py", "summarize", "--dir", str(tmp_path), "--baseline", "fa3", "--json", str(out),
                "--one-batch", str(tmp_path / "one_batch.jsonl")]
    main()
    s = json.load(open(out))["summary"]
    assert s["w1_e2e_ratio"] is None  # our w1 failed: no ratio
    assert (s["w2_e2e_ratio"], s["w3_e2e_ratio"]) == (0.75, 0.5)
    assert s["ttft_ratio_max"] == 1.1  # w3: 9900 / 9000 (w1 failed and is left out)
    assert (s["w2_output_tok_s_ratio"], s["w3_output_tok_s_ratio"]) == (1.5, 2.0)
    assert s["prefill_ratio_96k_b2"] == 1.05 and s["free_mem_gap_gib"] == 0.5
    assert s["parity_vs_baseline"] == {"short_identical": 2, "short_total": 3, "short_logprob_max_abs_diff": None,
                                       "long_identical": False, "long_first_diverging_token": 2}
    assert os.path.getsize(tmp_path / "serve_bench_h200.png") > 1000


def test_mla_inner_summary_pairs_each_stock_backend_with_asynctls_around_it(tmp_path):
    from mla_inner import main

    for label, short, ready in (("fa3", [[1], [2]], 50.0), ("asynctls_fa3", [[1], [2]], 90.0),
                                ("flashinfer", [[1], [2]], 55.0), ("asynctls_flashinfer", [[1], [0]], 95.0),
                                ("triton", [[1], [2]], 40.0)):  # no asynctls_triton run: no triton pair
        lps = [[-0.5], [-1.0 - 0.25 * label.startswith("asynctls")]]  # the second prompt's logprob differs
        run = {"label": label, "server_cmd": ["python", label], "gpu": "NVIDIA H200", "ready_s": ready,
               "gpu_free_gib_at_ready": 9.0, "parity": {"short": short, "short_logprobs": lps, "long": [5]}}
        (tmp_path / f"{label}.json").write_text(json.dumps(run))
    rows = [{"method": m, "batch": 2, "input_len": 98304, "rc": 0, "prefill_latency_s": p,
             "median_decode_latency_s": d} for m, p, d in (("fa3", 10.0, 0.004), ("asynctls", 10.2, 0.003))]
    (tmp_path / "one_batch.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "mla_inner_h200.json"
    sys.argv = ["mla_inner.py", "summarize", "--dir", str(tmp_path), "--json", str(out)]
    main()
    s = json.load(open(out))["summary"]
    assert s == {"fa3_short_identical": "2/2", "fa3_short_logprob_max_abs_diff": 0.25,
                 "flashinfer_short_identical": "1/2", "flashinfer_short_logprob_max_abs_diff": 0.0,
                 "prefill_ratio_2x98k_vs_fa3": 1.02, "decode_step_ratio_2x98k_vs_fa3": 0.75}
    assert os.path.getsize(tmp_path / "mla_inner_h200.png") > 1000
