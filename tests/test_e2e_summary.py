"""benchmarks/e2e_throughput.py summarize: the issue's summary keys from run rows and a soak result (CPU)."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import e2e_throughput  # noqa: E402


def _row(method, batch, n, tok_s):
    return {"method": method, "batch": batch, "input_len": n, "rc": 0, "median_decode_tok_s": tok_s}


def test_summary_ratios_and_soak_keys(tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        _row("flashinfer", 2, 98304, 100.0), _row("asynctls", 2, 98304, 250.0), _row("triton", 2, 98304, 50.0),
        _row("flashinfer", 4, 49152, 200.0), _row("asynctls", 4, 49152, 300.0)]) + "\n")
    soak = tmp_path / "soak.json"
    soak.write_text(json.dumps({"command": ["x"], "requests": 240, "outcome": {"done": 180, "aborted": 60, "error": 0},
                                "seconds": 1.0, "used_tokens_before_flush": 12, "used_tokens_after_flush": 3,
                                "leak_warnings_in_log": 0}))
    out = tmp_path / "e2e.json"
    monkeypatch.setattr(sys, "argv", ["e2e_throughput.py", "summarize", "--results", str(rows), "--json", str(out),
                                      "--soak", str(soak)])
    e2e_throughput.main()
    s = json.loads(out.read_text())["summary"]
    assert s["decode_speedup_96k_b2"] == 2.5 and s["decode_speedup_48k_b4"] == 1.5
    assert s["decode_speedup_96k_b2_vs_triton"] == 5.0 and s["decode_speedup_32k_b1"] is None  # no 32k rows
    assert (s["soak_requests"], s["soak_aborted"], s["soak_leaked_slots"]) == (240, 60, 3)
    assert (tmp_path / "e2e.png").exists()
