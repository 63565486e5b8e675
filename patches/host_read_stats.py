"""Hook: at SGLang's decode log interval, report the host-tier read counts beside its "Decode batch" line.

Target: sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.report_decode_stats,
        HookType.AFTER
SGLang: 0.5.17
Reason: report_decode_stats builds and logs the "Decode batch" line and sets the scheduler's Prometheus gauges once
        every --decode-log-interval decode steps (the batch processor bumps forward_ct_decode just before calling
        it). After it, on the same condition, we take one snapshot of the live HostReadStats (the only host sync),
        log a summary line on the stats-logging rank and, when --enable-metrics is on for this scheduler, set
        sglang:asynctls_* gauges with the collector's own labels (rows, host share, cache hit rate, PCIe bytes,
        and the prefetch's: late rows, rows and bytes fetched ahead, their hit rate, block overlap, stall
        estimate). No stats registered: nothing happens. A failure
        is logged once and never reaches the scheduler.
"""

from __future__ import annotations

import logging

from sglang_asynctls.offload import host_stats

TARGET = "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.report_decode_stats"
GAUGES = {  # ReadCounts property -> (gauge name, documentation); figures are over the last log interval
    "host_bytes_per_step": ("sglang:asynctls_host_bytes_per_step", "Bytes of selected KV read over PCIe a step."),
    "host_share": ("sglang:asynctls_host_share", "Share of selected KV rows that sit in host slots."),
    "cache_hit_rate": ("sglang:asynctls_cache_hit_rate", "Share of host-slot rows served by the device cache."),
    "rows_per_step": ("sglang:asynctls_rows_per_step", "Selected KV rows (per KV head, all layers) read a step."),
    "late_rows_per_step": ("sglang:asynctls_late_rows_per_step",
                           "Host-slot rows read over PCIe inside the decode step (not cached in time) a step."),
    "prefetch_rows_per_step": ("sglang:asynctls_prefetch_rows_per_step",
                               "Host-slot rows copied into the device cache ahead of use a step."),
    "prefetch_bytes_per_step": ("sglang:asynctls_prefetch_bytes_per_step",
                                "Bytes copied host to device cache ahead of use a step (side stream)."),
    "prefetch_hit_rate": ("sglang:asynctls_prefetch_hit_rate",
                          "Share of the rows fetched ahead that a later step read from the cache."),
    "block_overlap": ("sglang:asynctls_block_overlap",
                      "Coarse blocks selected this step and the previous one over blocks selected, per KV head."),
    "stall_ms_per_step": ("sglang:asynctls_stall_ms_per_step_estimate",
                          "Estimated decode stall a step: late bytes at the in-kernel host read rate."),
}
logger = logging.getLogger(__name__)
# Prometheus refuses a second metric of the same name in a process, so the gauges are made once, on first use.
_gauges: dict = {}
_warned = False


def _make_gauges(collector) -> dict:
    gauge_cls = getattr(collector, "_gauge_cls", None)  # SGLang's stat-logger override (e.g. Ray), as it uses it
    if gauge_cls is None:
        from prometheus_client import Gauge as gauge_cls
    return {prop: gauge_cls(name=name, documentation=doc, labelnames=list(collector.labels),
                            multiprocess_mode="mostrecent") for prop, (name, doc) in GAUGES.items()}


def _set_gauges(collector, counts: host_stats.ReadCounts) -> None:
    if not _gauges:
        _gauges.update(_make_gauges(collector))
    for prop, gauge in _gauges.items():
        gauge.labels(**collector.labels).set(getattr(counts, prop))


def _report(reporter, stats: host_stats.HostReadStats) -> None:
    if reporter.forward_ct_decode % reporter.decode_log_interval != 0:
        return
    log_here, metrics_here = reporter.is_stats_logging_rank, reporter.current_scheduler_metrics_enabled
    if not (log_here or metrics_here):
        return
    delta = stats.snapshot().delta
    if log_here:
        logger.info(delta.summary_line())
    if metrics_here and reporter.metrics_collector is not None:
        _set_gauges(reporter.metrics_collector, delta)


def report_host_reads(result, reporter, *args, **kwargs):
    global _warned
    stats = host_stats.current()
    if stats is None:
        return None
    try:
        _report(reporter, stats)
    except Exception:
        if not _warned:
            _warned = True
            logger.warning("asynctls host-read telemetry failed; not reported again", exc_info=True)
    return None  # keep SGLang's result
