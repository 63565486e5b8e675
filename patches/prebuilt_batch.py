"""Hook: index the KV a PD decode server received from its prefill server, before the request's first decode step.

Target:  sglang.srt.disaggregation.decode.SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch,
         HookType.AFTER
SGLang:  0.5.17
Reason:  on a `--disaggregation-mode decode` server no prefill forward runs: the transfer engine writes the prompt's
         KV straight into the pool rows the decode side preallocated, and the request joins decode through a
         PREBUILT batch that is never run (scheduler.run_batch skips it), so the backend's forward_extend, which
         indexes new keys, never sees these tokens. get_new_prebuilt_batch is the one place every such request
         passes once its KV is complete and before any forward reads it: DecodeTransferQueue.pop_transferred has
         seen the transfer succeed (all TP ranks agree), resume_retracted_reqs has loaded a retracted request's KV
         back, and prepare_for_prebuilt has filled the batch's req_pool_indices, prefix_lens (the decode-side radix
         prefix, indexed when it was written), seq_lens_cpu and out_cache_loc, the fields a local extend's forward
         batch carries. After it returns, and before the batch is merged into the running batch (and before
         requests that finished on their first token go to the radix cache), we index every layer of those slots.
         The kernels are launched on the scheduler's current stream; the next forward waits for that stream
         (Scheduler.run_batch: forward_stream.wait_stream(schedule_stream)), so it reads the finished index. Once per
         arriving batch, never per decode step; host-side lengths only, no sync. A no-op without --enable-asynctls
         and outside decode mode (the function is only called there).
"""

from __future__ import annotations

from sglang_asynctls.runtime_config import config_if_enabled

TARGET = "sglang.srt.disaggregation.decode.SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch"


def asynctls_backend_of(scheduler):
    """The scheduler's AsyncTLSBackend; refuse to serve with an index nobody writes."""
    from sglang_asynctls.backend import AsyncTLSBackend

    backend = getattr(scheduler.tp_worker.model_runner, "attn_backend", None)
    if not isinstance(backend, AsyncTLSBackend):
        raise RuntimeError(f"--enable-asynctls on a decode server needs the asynctls attention backend to index "
                           f"the KV that arrives from the prefill server; this scheduler runs "
                           f"{type(backend).__name__}")
    return backend


def index_arrived_kv(batch, scheduler, *args, **kwargs):
    if batch is None or getattr(scheduler.server_args, "disaggregation_mode", "null") != "decode":
        return None
    if config_if_enabled(scheduler.server_args) is None:
        return None
    asynctls_backend_of(scheduler).index_arrived_kv(batch.req_pool_indices, list(batch.prefix_lens),
                                                    batch.seq_lens_cpu.tolist(), batch.out_cache_loc)
    return None  # the batch is SGLang's, unchanged
