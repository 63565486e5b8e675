"""benchmarks/step_ceiling.py: the free-attention ceiling from profiled e2e rows (CPU)."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import step_ceiling  # noqa: E402


def _row(method, runs_s, groups):
    return {"method": method, "batch": 4, "input_len": 49152, "median_decode_latency_runs_s": runs_s,
            "step_breakdown": {"groups_us_per_step": groups}}


def test_ceiling_uses_the_unprofiled_run_and_stock_attention(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        _row("flashinfer", [0.018, 0.020], {"dense_attention": 9000.0, "gemm": 6000.0}),
        _row("asynctls", [0.010, 0.011], {"asynctls_fine": 900.0, "asynctls_coarse": 500.0, "dense_attention": 100.0,
                                           "gemm": 6000.0})]))
    out = tmp_path / "c.json"
    step_ceiling.main(["--rows", str(rows), "--json", str(out), "--layers", "10"])
    d = json.loads(out.read_text())["derived"]
    assert d["non_attention_us_per_step"] == 9000.0  # 18 ms first run - 9 ms of FlashInfer attention
    assert d["ceiling_speedup_if_attention_were_free"] == 2.0
    assert d["attention_budget_for_2x_us_per_step"] == 0.0
    assert d["asynctls_attention_kernels_us_per_step"] == 1500.0
    assert d["asynctls_attention_kernels_us_per_layer"] == 150.0
    assert d["speedup_first_runs"] == 1.8
    assert out.with_suffix(".png").exists()


def test_ceiling_refuses_a_point_without_both_profiled_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(_row("asynctls", [0.01], {"gemm": 1.0})))
    with pytest.raises(SystemExit):
        step_ceiling.main(["--rows", str(rows), "--json", str(tmp_path / "c.json")])
