"""AsyncTLSAttnBackend: SGLang's Triton backend for prefill and short sequences, two-level sparse decode for long.

- Prefill (extend) runs SGLang's own Triton extend kernels unchanged; afterwards each layer labels the new KV slots
  and recomputes Kmin/Kmax of the pages the new tokens fall in (`IndexPool.write_extend`). Pages a request takes
  from the radix cache are already indexed and are not touched.
- Decode runs SGLang's Triton decode kernel over the requests shorter than `dense_below` only (longer requests are
  given zero length in its metadata, so it reads none of their KV), and the AsyncTLS path over every request; the
  long requests take the sparse output. Everything in decode has static shapes and no host synchronisation, so
  SGLang's CUDA-graph runner captures it as it is.
"""

from __future__ import annotations

import copy
import logging
import os

import torch

from sglang_asynctls.index import IndexPool, plan_extend
from sglang_asynctls.model_spec import (check_config_for_model, from_sglang_model_config, kv_heads_of_rank,
                                        resolved_layer_schedule)
from sglang_asynctls.runtime_config import config_of

logger = logging.getLogger(__name__)


def _sparse_decode_fn():
    """The fused Triton decode when it imports on this device, else the pure-torch reference (same signature)."""
    if torch.cuda.is_available() and os.environ.get("SGLANG_ASYNCTLS_DECODE_IMPL", "triton") == "triton":
        try:
            from sglang_asynctls.kernels.asynctls_decode import asynctls_decode

            return asynctls_decode, "triton"
        except ImportError as e:
            logger.warning("asynctls: Triton kernels unavailable (%s); using the torch reference", e)
    from sglang_asynctls.reference import asynctls_decode

    return asynctls_decode, "reference"


def _attn_tp() -> tuple:
    """(size, rank) of this process among the attention tensor-parallel ranks (model_spec.kv_heads_of_rank)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().attn_tp_size, get_parallel().attn_tp_rank
    except Exception:  # no parallel state (unit tests): a single rank
        return 1, 0


def _index_writers():
    """(label quantizer, decode appender) for the index pool: the Triton kernels on CUDA, the torch reference
    (same names and signatures) on CPU or with SGLANG_ASYNCTLS_FUSED_INDEX=0. The reference's decode append is
    ~20 small kernels per layer; the fused one is one launch."""
    if torch.cuda.is_available() and os.environ.get("SGLANG_ASYNCTLS_FUSED_INDEX", "1") != "0":
        from sglang_asynctls.kernels.index_append import append_decode_index
        from sglang_asynctls.kernels.quantize_labels import quantize_labels

        return quantize_labels, append_decode_index
    from sglang_asynctls.reference import append_decode_index, quantize_labels

    return quantize_labels, append_decode_index


def _check_request_rows_fit(request_rows, num_layers: int, k0) -> None:
    """Per-request block rows cost req_pool_rows x context / block_size rows a layer, whatever the traffic: refuse
    a launch they do not fit (SGLang sizes the request pool to at least 2,048 rows unless told otherwise)."""
    rows, blocks = request_rows
    need = 2 * num_layers * rows * blocks * k0.shape[1] * k0.shape[2] * k0.element_size()
    if k0.device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(k0.device)
    if need > free - (1 << 30):  # keep 1 GiB for activations and CUDA graphs
        raise ValueError(f"asynctls at --page-size 1 keeps block bounds per request row: {need / 2**30:.1f} GiB "
                         f"for {rows} request rows x {blocks} blocks, {free / 2**30:.1f} GiB free. Lower "
                         f"--max-running-requests or --context-length, or use --page-size 64 (the default)")


def _host_row_cache(cfg, pool, request_rows: int, k0, impl: str):
    """The host tier's read counters (exported at the decode log interval) and, with --asynctls-host-cache-tokens,
    the device cache of host-slot rows (offload/host_cache.py), sized by the request pool; refused if it does not
    fit in what the GPU has free."""
    from sglang_asynctls.offload import host_stats
    from sglang_asynctls.offload.host_cache import HostRowCache

    v0 = pool.get_value_buffer(getattr(pool, "start_layer", 0) or 0)
    v_is_k = v0.data_ptr() == k0.data_ptr()  # MLA: the latent row is key and value
    k_dim, v_dim = k0.shape[2], v0.shape[2]
    row_bytes = host_stats.row_bytes(k_dim, 0 if v_is_k else v_dim, k0.element_size())
    stats = host_stats.HostReadStats(pool.layer_num, row_bytes, k0.device)
    lines = cfg.host_cache_tokens
    need = pool.layer_num * request_rows * k0.shape[1] * lines * row_bytes
    if lines and k0.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(k0.device)
        if need > free - (1 << 30):  # keep 1 GiB for activations and CUDA graphs
            raise ValueError(f"asynctls: --asynctls-host-cache-tokens {lines} needs {need / 2**30:.1f} GiB for "
                             f"{request_rows} request rows, {free / 2**30:.1f} GiB is free; lower it or "
                             "--max-running-requests")
    host_from = pool._asynctls_host_tier.device_tokens + pool.page_size  # first host row (after the padding page)
    cache = HostRowCache(pool.layer_num, request_rows, k0.shape[1], lines, k_dim, v_dim, v_is_k, k0.dtype,
                         k0.device, host_from, counters=stats.counters, impl=impl)
    host_stats.register(stats)
    logger.info("asynctls host tier: rows >= %d are host slots; host-row cache %d lines per request row, layer and "
                "KV head (%.2f GiB for %d request rows)", host_from, lines, need / 2**30, request_rows)
    return cache


def create_asynctls_backend(model_runner):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    class AsyncTLSAttnBackend(_AsyncTLSMixin, TritonAttnBackend):
        pass

    return AsyncTLSAttnBackend(model_runner)


class _AsyncTLSMixin:
    """Mixed into SGLang's TritonAttnBackend (imported lazily: the plugin must not import it at registration)."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.cfg = cfg = config_of(model_runner.server_args)
        spec = from_sglang_model_config(model_runner.model_config)
        channels = check_config_for_model(cfg, spec)
        # per-layer (k_t, k_b): the schedule of --asynctls-layer-budget-scale / -candidate-scale ("auto": the
        # channel config's calibrated one), indexed by the model's layer id
        self.cfg = cfg = resolved_layer_schedule(cfg, spec)
        self.budgets = cfg.layer_budgets(spec.num_layers)
        if model_runner.page_size not in (1, cfg.block_size):
            raise ValueError(f"asynctls needs --page-size 1 or equal to --asynctls-block-size ({cfg.block_size}); "
                             f"got {model_runner.page_size}")
        pool = model_runner.token_to_kv_pool
        if cfg.host_kv_gib > 0 and getattr(pool, "_asynctls_host_tier", None) is None:
            raise ValueError(f"asynctls: --asynctls-host-kv-gib {cfg.host_kv_gib:g} is set but the KV pool was built "
                             "without the host tier (its SGLang hooks did not apply; see the plugin's log lines)")
        if cfg.host_kv_gib > 0:  # prefill reads a host-held prefix once per layer, not once per query tile
            from sglang_asynctls.offload.staged_prefix import staged_extend

            self.extend_attention_fwd = staged_extend(self.extend_attention_fwd)
        k0 = pool.get_key_buffer(pool.start_layer if hasattr(pool, "start_layer") else 0)
        self.layer_offset = getattr(pool, "start_layer", 0) or 0
        d_c = cfg.resolved_label_channels(spec.kind)
        if channels is not None:  # tensor parallel: each rank indexes the KV heads its pool holds
            channels = channels[:, kv_heads_of_rank(channels.shape[1], *_attn_tp())]
            if channels.shape[1] != k0.shape[1]:
                raise ValueError(f"asynctls: this rank's KV pool holds {k0.shape[1]} KV heads, its share of the "
                                 f"channel table {channels.shape[1]}")
        quantize, append = _index_writers()
        self.num_blocks = -(-model_runner.model_config.context_len // cfg.block_size)
        # page size 1: block bounds per request row (index.py), sized by the request pool, checked before allocating
        request_rows = None
        if model_runner.page_size == 1:
            request_rows = (self.req_to_token.shape[0], self.num_blocks)
            _check_request_rows_fit(request_rows, pool.layer_num, k0)
        self.index = IndexPool(pool.layer_num, k0.shape[0], k0.shape[1], k0.shape[2], d_c, cfg.block_size,
                               k0.dtype, k0.device, channels, quantize=quantize, append=append,
                               request_rows=request_rows)
        self.sparse_fn, self.sparse_impl = _sparse_decode_fn()
        self.host_cache = (_host_row_cache(cfg, pool, self.req_to_token.shape[0], k0, self.sparse_impl)
                           if cfg.host_kv_gib > 0 else None)
        # per decode step, computed at its first layer: [B, NB] page of every block, [B] sparse-path rows
        self._block_table = self._long_seq = self._decode_rows = None
        self.stats = {"index_pages_written": 0, "index_slots_labelled": 0}
        logger.info("asynctls backend: %s, sparse decode via %s, index %.1f MiB, %d blocks per request max, "
                    "label channels %s, (k_t, k_b) per layer %s", cfg, self.sparse_impl, self.index.nbytes() / 2**20,
                    self.num_blocks,
                    "calibrated" if channels is not None else "ranked by |K| at the first long prefill",
                    "uniform" if len(set(self.budgets)) == 1 else self.budgets)

    # ------------------------------------------------------------------ metadata: hide long requests from dense
    def _dense_lens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        return torch.where(seq_lens < self.cfg.dense_below, seq_lens, torch.zeros_like(seq_lens))

    def _update_decode_kv_buffers(self, bs, seq_lens, req_pool_indices):
        # CUDA-graph capture and replay path of the Triton backend
        return super()._update_decode_kv_buffers(bs, self._dense_lens(seq_lens), req_pool_indices)

    def init_forward_metadata(self, forward_batch):
        self._extend_plan = None
        if forward_batch.forward_mode.is_decode_or_idle() and forward_batch.spec_info is None:
            masked = copy.copy(forward_batch)
            masked.seq_lens = self._dense_lens(forward_batch.seq_lens)
            if forward_batch.seq_lens_cpu is not None:
                masked.seq_lens_sum = int(self._dense_lens(forward_batch.seq_lens_cpu).sum())
            return super().init_forward_metadata(masked)
        super().init_forward_metadata(forward_batch)
        if forward_batch.forward_mode.is_extend():
            if self.host_cache is not None:  # a prefilled row may hold a new request: its cached rows are stale
                self.host_cache.reset_rows(forward_batch.req_pool_indices)
            self._extend_plan = plan_extend(self.req_to_token, forward_batch.req_pool_indices,
                                            list(forward_batch.extend_prefix_lens_cpu),
                                            forward_batch.seq_lens_cpu.tolist(), self.cfg.block_size,
                                            max_blocks=self.index.max_blocks)
            new, reused = int(forward_batch.out_cache_loc.numel()), sum(forward_batch.extend_prefix_lens_cpu)
            self.stats["index_pages_written"] += self._extend_plan.num_pages
            self.stats["index_slots_labelled"] += new
            # one line per prefill batch: radix reuse is visible as pages written << prompt pages
            logger.info("asynctls index: prefill of %d new tokens wrote %d pages; %d prefix tokens reused",
                        new, self._extend_plan.num_pages, reused)

    # ------------------------------------------------------------------ forward
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, *args, **kwargs):
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, *args, **kwargs)
        if self._extend_plan is not None and save_kv_cache:
            lid = layer.layer_id - self.layer_offset
            k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            self.index.write_extend(lid, k_buffer, forward_batch.out_cache_loc, self._extend_plan)
        return o

    def _host_cache_kw(self, lid, rpi, seq_lens) -> dict:
        if self.host_cache is None:
            return {}
        return {"host_cache": self.host_cache.for_layer(lid, rpi, seq_lens, self._long_seq)}

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, *args, **kwargs):
        o_dense = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, *args, **kwargs)
        lid = layer.layer_id - self.layer_offset
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        seq_lens, rpi = forward_batch.seq_lens, forward_batch.req_pool_indices
        ix, cfg = self.index, self.cfg
        if lid == 0 or self._block_table is None:  # once per step, shared by the layers (fixed within a step)
            self._block_table = ix.block_table(self.req_to_token, rpi, self.num_blocks)
            self._long_seq = seq_lens >= cfg.dense_below
            self._decode_rows = ix.decode_rows(rpi, seq_lens)
        if save_kv_cache:
            ix.write_decode(lid, k_buffer, forward_batch.out_cache_loc, seq_lens, self._decode_rows)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [B, Hq, D]; the kernels take its strides
        kw = {}
        if self.sparse_impl == "triton":  # the kernels write the long rows of o_dense in place: no merge launch
            kw = dict(out=o_dense.view(q3.shape[0], layer.tp_q_head_num, -1), out_rows=self._long_seq)
        else:
            q3 = q3.contiguous()
        token_budget, block_budget = self.budgets[layer.layer_id]
        o_sparse = self.sparse_fn(
            q3, k_buffer, v_buffer, self.req_to_token, rpi, seq_lens, ix.kmin[lid], ix.kmax[lid], self._block_table,
            ix.labels[lid], ix.label_scale[lid], ix.channels[lid], block_size=cfg.block_size,
            block_budget=block_budget, token_budget=token_budget, sink_tokens=cfg.sink_tokens,
            local_window=cfg.local_window, sm_scale=layer.scaling, bound_slack=cfg.bound_slack,
            group_score=cfg.group_score, **kw, **self._host_cache_kw(lid, rpi, seq_lens))
        if kw:
            return o_dense
        return torch.where(self._long_seq[:, None], o_sparse.reshape(o_dense.shape).to(o_dense.dtype), o_dense)
