"""Host-tier read telemetry (offload/host_stats.py) and its decode-log export (patches/host_read_stats.py), on the CPU.
The GPU counting is host_cache_lookup's, tested against its reference, which counts with count_reads."""

import logging
from types import SimpleNamespace

import pytest
import torch

from sglang_asynctls.offload import host_stats
from sglang_asynctls.offload.host_stats import Column, HostReadStats, count_reads, row_bytes
from sglang_asynctls.patches import host_read_stats

GPU_ROWS = 100
# [B=2, Hkv=2, K=4], -1 = not selected; slots >= 100 are host rows
SLOTS = torch.tensor([[[3, 150, -1, 99], [100, 7, 250, -1]],
                      [[-1, -1, 101, 5], [0, 1, 2, 3]]])
HITS = torch.zeros_like(SLOTS, dtype=torch.bool)
HITS[0, 0, 0] = HITS[0, 1, 0] = HITS[0, 1, 2] = HITS[1, 0, 0] = True  # slot 3 (GPU), 100, 250 (host), -1 (none)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.setattr(host_read_stats, "_gauges", {})
    monkeypatch.setattr(host_read_stats, "_warned", False)
    host_stats.register(None)
    yield
    host_stats.register(None)


def test_row_bytes():
    assert row_bytes(128, 128, 2) == 512  # Qwen3-8B bf16, one KV head
    assert row_bytes(512 + 64, 0, 2) == 1152  # MLA: the latent row only


def test_count_reads_hand_checked():
    counters = torch.zeros(2, len(Column), dtype=torch.int64)
    count_reads(SLOTS, GPU_ROWS, HITS, counters=counters, layer=1)
    # rows: 3 + 3 + 2 + 4; host: 150, 100, 250, 101; hits on host slots: 100, 250
    assert counters[1, :5].tolist() == [12, 4, 2, 0, 1]
    assert counters[0].tolist() == [0] * len(Column)
    count_reads(SLOTS, GPU_ROWS, counters=counters, layer=1)
    assert counters[1, :5].tolist() == [24, 8, 2, 0, 2]


def test_count_reads_all_gpu_or_all_host():
    counters = torch.zeros(1, len(Column), dtype=torch.int64)
    count_reads(SLOTS, 1000, torch.ones_like(HITS), counters=counters, layer=0)
    assert counters[0, :5].tolist() == [12, 0, 0, 0, 1]
    count_reads(SLOTS, 0, counters=counters, layer=0)
    assert counters[0, :5].tolist() == [24, 12, 0, 0, 2]


def test_snapshot_totals_deltas_and_derived_figures():
    stats = HostReadStats(num_layers=2, bytes_per_row=512, device="cpu")
    for _ in range(2):  # two decode steps of both layers
        count_reads(SLOTS, GPU_ROWS, HITS, counters=stats.counters, layer=0)
        count_reads(SLOTS, GPU_ROWS, counters=stats.counters, layer=1)
    stats.counters[0, Column.CACHE_FILLS] += 3  # the cache filler's column
    first = stats.snapshot()
    d = first.delta
    assert (d.rows, d.host_rows, d.cache_hits, d.cache_fills, d.steps) == (48, 16, 4, 3, 2)
    assert first.total == d
    assert d.host_bytes == (16 - 4) * 512 and d.host_bytes_per_step == 6 * 512
    assert (d.rows_per_step, d.host_share, d.cache_hit_rate) == (24, 16 / 48, 4 / 16)
    assert [(l.rows, l.host_rows, l.cache_hits, l.steps) for l in first.layers] == [(24, 8, 4, 2), (24, 8, 0, 2)]
    assert first.layers[1].host_bytes_per_step == 4 * 512

    count_reads(SLOTS, 0, counters=stats.counters, layer=0)  # one more step, everything on the host
    count_reads(SLOTS, 0, counters=stats.counters, layer=1)
    second = stats.snapshot()
    d = second.delta
    assert (d.rows, d.host_rows, d.cache_hits, d.cache_fills, d.steps) == (24, 24, 0, 0, 1)
    assert (d.host_share, d.host_bytes_per_step) == (1.0, 24 * 512)
    t = second.total
    assert (t.rows, t.host_rows, t.cache_hits, t.cache_fills, t.steps) == (72, 40, 4, 3, 3)
    assert stats.snapshot().delta.steps == 0  # nothing since: zeros, no division by zero
    assert stats.snapshot().delta.host_bytes_per_step == 0.0


def test_steps_are_decode_steps_not_layer_steps():
    """A layer that counts nothing (steps 0) does not halve the per-step figures."""
    stats = HostReadStats(num_layers=2, bytes_per_row=512, device="cpu")
    count_reads(SLOTS, GPU_ROWS, counters=stats.counters, layer=0)
    d = stats.snapshot().delta
    assert (d.steps, d.rows_per_step, d.host_bytes_per_step) == (1, 12, 4 * 512)


def test_summary_line():
    counts = host_stats.ReadCounts(rows=1_234_560, host_rows=617_280, cache_hits=154_320, cache_fills=0, steps=40,
                                   bytes_per_row=512, prefetch_hits=1_000, prefetch_rows=4_000, overlap=900,
                                   overlap_blocks=1_000)
    # late: 617,280 - 154,320 = 462,960 rows, 11,574 a step, 5,925,888 B a step = 0.37 ms at 16 GB/s;
    # ahead: 100 rows a step = 51,200 B, a quarter of them read later
    assert counts.summary_line() == ("asynctls host reads: rows/step 30,864, host share 0.500, cache hit 0.250, "
                                     "PCIe MB/step 5.93 (40 steps); late rows/step 11,574, ahead rows/step 100 "
                                     "(0.05 MB), ahead used 0.250, block overlap 0.900, stall est ms/step 0.37")
    assert counts.late_rows == 462_960 and counts.prefetch_bytes_per_step == 51_200
    assert counts.stall_ms_per_step == pytest.approx(5_925_888 / 16e9 * 1e3)


def test_prefetch_and_overlap_columns_in_snapshots():
    """The prefetch kernel's and block_overlap's columns reach the snapshot, per layer and pooled."""
    stats = HostReadStats(num_layers=2, bytes_per_row=512, device="cpu")
    count_reads(SLOTS, GPU_ROWS, HITS, counters=stats.counters, layer=0)  # 1 step: 4 host rows, 2 hits
    count_reads(SLOTS, GPU_ROWS, counters=stats.counters, layer=1)  # 4 host rows, no hit
    stats.counters[0, Column.PREFETCH_ROWS] += 6  # fetched ahead
    stats.counters[0, Column.PREFETCH_HITS] += 2  # of the 2 hits, both on fetched lines
    stats.counters[:, Column.OVERLAP] += torch.tensor([7, 5])
    stats.counters[:, Column.OVERLAP_BLOCKS] += torch.tensor([8, 8])
    snap = stats.snapshot()
    d = snap.delta
    assert (d.prefetch_rows, d.prefetch_hits, d.overlap, d.overlap_blocks, d.steps) == (6, 2, 12, 16, 1)
    assert (d.late_rows, d.late_rows_per_step, d.prefetch_hit_rate, d.block_overlap) == (6, 6, 2 / 6, 0.75)
    assert d.prefetch_bytes_per_step == 6 * 512 and d.host_bytes == d.late_rows * 512
    assert [(l.prefetch_rows, l.late_rows, l.block_overlap) for l in snap.layers] == [(6, 2, 7 / 8), (0, 4, 5 / 8)]
    assert stats.snapshot().delta.block_overlap == 0.0  # an empty interval


class FakeGauge:
    """prometheus_client.Gauge's surface as SGLang's collector uses it (labels(**kw).set(v))."""
    made = []

    def __init__(self, name, documentation, labelnames, multiprocess_mode):
        self.name, self.labelnames, self.mode, self.values = name, list(labelnames), multiprocess_mode, {}
        FakeGauge.made.append(self)

    def labels(self, **kw):
        assert sorted(kw) == sorted(self.labelnames)
        return SimpleNamespace(set=lambda v: self.values.__setitem__(tuple(sorted(kw.items())), v))


def _reporter(ct, log=True, metrics=True):
    labels = {"model_name": "m", "engine_type": "unified", "tp_rank": 0, "pp_rank": 0, "moe_ep_rank": 0}
    collector = SimpleNamespace(labels=labels, _gauge_cls=FakeGauge) if metrics else None
    return SimpleNamespace(forward_ct_decode=ct, decode_log_interval=40, is_stats_logging_rank=log,
                           current_scheduler_metrics_enabled=metrics, metrics_collector=collector)


def _stats_with_one_step():
    stats = HostReadStats(num_layers=1, bytes_per_row=512, device="cpu")
    count_reads(SLOTS, GPU_ROWS, HITS, counters=stats.counters, layer=0)
    host_stats.register(stats)
    return stats


def test_hook_logs_and_sets_gauges_at_the_log_interval(caplog):
    FakeGauge.made = []
    stats = _stats_with_one_step()
    with caplog.at_level(logging.INFO, logger=host_read_stats.__name__):
        assert host_read_stats.report_host_reads("result", _reporter(ct=39)) is None  # between log lines
        assert not caplog.records and not FakeGauge.made
        host_read_stats.report_host_reads(None, _reporter(ct=40))
    assert caplog.messages == ["asynctls host reads: rows/step 12, host share 0.333, cache hit 0.500, "
                               "PCIe MB/step 0.00 (1 steps); late rows/step 2, ahead rows/step 0 (0.00 MB), "
                               "ahead used 0.000, block overlap 0.000, stall est ms/step 0.00"]
    gauges = {g.name: g for g in FakeGauge.made}
    assert sorted(gauges) == sorted(name for name, _ in host_read_stats.GAUGES.values())
    key = tuple(sorted(_reporter(0).metrics_collector.labels.items()))
    assert gauges["sglang:asynctls_host_bytes_per_step"].values == {key: 2 * 512}
    assert gauges["sglang:asynctls_host_share"].values == {key: 4 / 12}
    assert gauges["sglang:asynctls_cache_hit_rate"].values == {key: 0.5}
    assert gauges["sglang:asynctls_rows_per_step"].values == {key: 12}
    assert gauges["sglang:asynctls_late_rows_per_step"].values == {key: 2}  # host rows 150, 101 were not cached
    assert gauges["sglang:asynctls_prefetch_rows_per_step"].values == {key: 0}
    assert gauges["sglang:asynctls_block_overlap"].values == {key: 0.0}
    assert gauges["sglang:asynctls_stall_ms_per_step_estimate"].values == {key: 2 * 512 / 16e9 * 1e3}
    assert {g.mode for g in FakeGauge.made} == {"mostrecent"}

    count_reads(SLOTS, 0, counters=stats.counters, layer=0)
    host_read_stats.report_host_reads(None, _reporter(ct=80))
    assert len(FakeGauge.made) == len(host_read_stats.GAUGES)  # made once a process
    assert gauges["sglang:asynctls_host_share"].values == {key: 1.0}  # the new interval only


def test_hook_on_other_ranks(caplog):
    FakeGauge.made = []
    stats = _stats_with_one_step()
    with caplog.at_level(logging.INFO, logger=host_read_stats.__name__):
        host_read_stats.report_host_reads(None, _reporter(ct=40, log=True, metrics=False))
        assert len(caplog.records) == 1 and not FakeGauge.made
        host_read_stats.report_host_reads(None, _reporter(ct=80, log=False, metrics=True))
        assert len(caplog.records) == 1 and len(FakeGauge.made) == len(host_read_stats.GAUGES)
    count_reads(SLOTS, GPU_ROWS, counters=stats.counters, layer=0)
    host_read_stats.report_host_reads(None, _reporter(ct=120, log=False, metrics=False))  # SGLang logs nothing
    assert stats.snapshot().delta.steps == 1  # so no snapshot was taken


def test_hook_failure_warns_once_and_never_raises(caplog):
    host_stats.register(SimpleNamespace(snapshot=lambda: 1 / 0))
    with caplog.at_level(logging.INFO, logger=host_read_stats.__name__):
        for ct in (40, 80):
            assert host_read_stats.report_host_reads("result", _reporter(ct=ct)) is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_hook_is_applied_to_sglangs_reporter_and_calls_through(monkeypatch):
    """load_plugins() wraps SchedulerMetricsReporter.report_decode_stats: SGLang's own method runs (here it stops
    at its log-interval check), then our hook, which does nothing while no stats are registered."""
    pytest.importorskip("sglang.srt.plugins")
    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter
    from sglang.srt.plugins import load_plugins

    load_plugins()
    method = SchedulerMetricsReporter.report_decode_stats
    assert getattr(method, "__wrapped__", None) is not None
    seen = []
    monkeypatch.setattr(host_read_stats, "_report", lambda reporter, stats: seen.append((reporter, stats)))
    reporter = SimpleNamespace(scheduler=SimpleNamespace(running_batch=None), current_scheduler_metrics_enabled=False,
                               forward_ct_decode=1, decode_log_interval=40)
    assert method(reporter, False) is None
    assert seen == []
    stats = HostReadStats(num_layers=1, bytes_per_row=512, device="cpu")
    host_stats.register(stats)
    method(reporter, False)
    assert seen == [(reporter, stats)]
