"""offload_capacity.py reads SGLang 0.5.17's own scheduler log lines (format of metrics_reporter.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import offload_capacity  # noqa: E402

LOG = """[2026-11-24 09:00:00] asynctls host tier: 341120 KV tokens on the GPU + 727808 in 100.0 GiB of pinned host memory
[2026-11-24 09:00:01] max_total_num_tokens=1068928, chunked_prefill_size=8192, max_prefill_tokens=16384
[2026-11-24 09:00:09] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, #token: 8192, token usage: 0.01, #running-req: 0, #queue-req: 11, #pending-token: 0,
[2026-11-24 09:01:09] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, #token: 90112, token usage: 0.08, #running-req: 11, #queue-req: 0, #pending-token: 0,
[2026-11-24 09:01:10] Decode batch, #running-req: 11, #token: 1081000, token usage: 0.97, cuda graph: True, gen throughput (token/s): 51.20, #queue-req: 0,
[2026-11-24 09:01:11] Decode batch, #running-req: 12, #token: 1181000, token usage: 0.99, cuda graph: True, gen throughput (token/s): 60.00, #queue-req: 0,
[2026-11-24 09:01:12] Decode batch, #running-req: 12, #token: 1182000, token usage: 0.99, cuda graph: True, gen throughput (token/s): 62.50, #queue-req: 0,
[2026-11-24 09:01:13] Decode batch, #running-req: 12, #token: 1183000, token usage: 0.99, cuda graph: True, gen throughput (token/s): 61.00, #queue-req: 0,
"""


def test_parse_log_reads_capacity_concurrency_and_throughput():
    got = offload_capacity.parse_log(LOG)
    assert got["max_total_num_tokens"] == 1068928
    assert (got["device_tokens"], got["host_tokens"]) == (341120, 727808)
    assert got["max_running_decode"] == 12 and got["max_running_prefill"] == 11
    assert got["gen_tok_s_at_max_running"] == 61.0  # the median of the batch-12 lines
    assert got["max_tokens_in_use"] == 1183000 and got["decode_log_lines"] == 4


def test_parse_log_of_a_server_that_never_decoded():
    got = offload_capacity.parse_log("max_total_num_tokens=362810\n")
    assert got["max_running_decode"] == 0 and got["gen_tok_s_at_max_running"] is None and got["host_tokens"] == 0


def test_parse_log_pairs_host_read_telemetry_with_the_decode_line_before_it():
    from sglang_asynctls.offload.host_stats import ReadCounts

    def line(mb_rows):  # the exact line the export hook logs
        return "[x] " + ReadCounts(rows=mb_rows * 40, host_rows=mb_rows * 20, cache_hits=mb_rows * 10,
                                   cache_fills=0, steps=40, bytes_per_row=512).summary_line() + "\n"
    text = LOG.replace("#queue-req: 0,\n[2026-11-24 09:01:11]", "#queue-req: 0,\n" + line(1000) + "[2026-11-24 09:01:11]")
    text += line(3000)
    got = offload_capacity.parse_log(text)
    (h,) = got["host_reads_at_max_running"]  # the batch-11 line's telemetry is not at the max batch
    assert h == {"rows_per_step": 3000, "host_share": 0.5, "cache_hit": 0.5, "pcie_mb_per_step": 0.38, "steps": 40,
                 "late_rows_per_step": 750, "ahead_rows_per_step": 0, "ahead_mb_per_step": 0.0,
                 "prefetch_hit_rate": 0.0, "block_overlap": 0.0, "stall_ms_per_step_estimate": 0.02}
    assert offload_capacity._median_pcie_bytes(got) == 0.38e6
    old = "[x] asynctls host reads: rows/step 12, host share 0.500, cache hit 0.250, PCIe MB/step 5.93 (40 steps)"
    (h,) = offload_capacity.host_reads_at(LOG + old + "\n", 12)  # a log of a server before the prefetch
    assert h["pcie_mb_per_step"] == 5.93 and "late_rows_per_step" not in h


def _run(label, batch, tok_s, reads=()):
    return {"label": label, "max_running_decode": batch, "gen_tok_s_at_max_running": tok_s,
            "host_reads_at_max_running": list(reads)}


def test_prefetch_ab_stall_share_against_the_resident_run(tmp_path, monkeypatch):
    resident = _run("resident", 6, 600.0)  # 10 ms a step
    off = _run("host_prefetch_0", 6, 400.0, [dict(cache_hit=0.9, late_rows_per_step=1000, prefetch_hit_rate=0.0)])
    on = _run("host_prefetch_128", 6, 500.0, [dict(cache_hit=0.95, late_rows_per_step=600, prefetch_hit_rate=0.5),
                                              dict(cache_hit=0.93, late_rows_per_step=700, prefetch_hit_rate=0.7),
                                              dict(cache_hit=0.94, late_rows_per_step=650, prefetch_hit_rate=0.6)])
    row = offload_capacity.prefetch_row(on, resident)
    assert row["decode_step_ms"] == 12.0 and row["resident_step_ms"] == 10.0
    assert abs(row["stall_share"] - 2 / 12) < 1e-12  # (12 - 10) / 12
    assert (row["cache_hit"], row["late_rows_per_step"], row["prefetch_hit_rate"]) == (0.94, 650, 0.6)
    assert offload_capacity.prefetch_row(_run("x", 5, 400.0), resident)["stall_share"] is None  # another batch
    paths = {}
    for name, run in (("r", resident), ("off", off), ("on", on)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(__import__("json").dumps(run))
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["offload_capacity.py", "prefetch-ab", "--resident", str(paths["r"]), "--off",
                                      str(paths["off"]), "--on", str(paths["on"]), "--json", str(out)])
    offload_capacity.main()
    summary = __import__("json").loads(out.read_text())["summary"]
    assert abs(summary["stall_share_off"] - 5 / 15) < 1e-12  # (15 - 10) / 15
    assert summary["prefetch_hit_rate_on"] == {"host_prefetch_128": 0.6}
    assert (tmp_path / "ab.png").exists()
