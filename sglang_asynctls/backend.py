"""AsyncTLSBackend: a stock SGLang attention backend for prefill and short sequences, two-level sparse decode for long.

The backend holds a stock backend (`inner`: fa3, flashinfer or triton, `dense_backend.py`) and forwards to it:
- Prefill (extend) is the inner backend's, unchanged; afterwards each layer labels the new KV slots and recomputes
  Kmin/Kmax of the blocks the new tokens fall in (`IndexPool.write_extend`). Blocks a request takes from the radix
  cache are already indexed and are not touched.
- Decode runs the inner backend over a view of the batch in which requests of `dense_below` tokens or more are one
  token long (so it reads one of their KV rows, not all), built in the public metadata hooks
  (`init_forward_metadata*`); then the sparse path decodes the long requests and writes their rows of the output.
  Everything in decode has static shapes and no host synchronisation, so SGLang's CUDA-graph runner captures it.

Example (what SGLang's registry does with `--enable-asynctls`)::

    inner = dense_backend.build(model_runner, "fa3")
    backend = AsyncTLSBackend(model_runner, inner)
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_asynctls import dense_backend, kernel_choice, step_choice
from sglang_asynctls.index import IndexPool, plan_extend
from sglang_asynctls.model_spec import (check_config_for_model, from_sglang_model_config, kv_heads_of_rank,
                                        resolved_layer_schedule)
from sglang_asynctls.runtime_config import config_of

logger = logging.getLogger(__name__)


def _attn_tp() -> tuple:
    """(size, rank) of this process among the attention tensor-parallel ranks (model_spec.kv_heads_of_rank)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().attn_tp_size, get_parallel().attn_tp_rank
    except Exception:  # no parallel state (unit tests): a single rank
        return 1, 0


def create_asynctls_backend(model_runner):
    cfg = config_of(model_runner.server_args)
    # the launcher resolved "auto"; a program that built ServerArgs itself (sgl.Engine) resolves it here
    name = dense_backend.resolve(cfg, model_runner.server_args)
    logger.info("asynctls: prefill and short decode run SGLang's %s backend", name)
    return AsyncTLSBackend(model_runner, dense_backend.build(model_runner, name), inner_name=name)


def _model_config(model_runner):
    """(config with its per-layer schedule resolved, the model's attention, the channel table or None)."""
    cfg = config_of(model_runner.server_args)
    spec = from_sglang_model_config(model_runner.model_config)
    channels = check_config_for_model(cfg, spec)
    # --asynctls-layer-budget-scale / -candidate-scale: "auto" is the channel config's calibrated schedule
    return resolved_layer_schedule(cfg, spec), spec, channels


def _check_pool(cfg, pool, page_size: int) -> None:
    if page_size != 1 and page_size % cfg.block_size:
        raise ValueError(f"asynctls needs --page-size 1 or a multiple of --asynctls-block-size ({cfg.block_size}); "
                         f"got {page_size}")
    if cfg.host_kv_gib > 0 and getattr(pool, "_asynctls_host_tier", None) is None:
        raise ValueError(f"asynctls: --asynctls-host-kv-gib {cfg.host_kv_gib:g} is set but the KV pool was built "
                         "without the host tier (its SGLang hooks did not apply; see the plugin's log lines)")


def _rank_channels(channels, k0):
    """Tensor parallel: each rank indexes the KV heads its pool holds, its slice of the channel table."""
    if channels is None:
        return None
    channels = channels[:, kv_heads_of_rank(channels.shape[1], *_attn_tp())]
    if channels.shape[1] != k0.shape[1]:
        raise ValueError(f"asynctls: this rank's KV pool holds {k0.shape[1]} KV heads, its share of the channel "
                         f"table {channels.shape[1]}")
    return channels


def _build_index(cfg, spec, pool, k0, channels, impl: str, request_rows) -> IndexPool:
    """The index beside the pool; request_rows (page size 1): block bounds per request row. The KV sizing hook
    made room for all of it (patches/kv_sizing.py)."""
    extend, append = kernel_choice.index_writers(impl)
    return IndexPool(pool.layer_num, k0.shape[0], k0.shape[1], k0.shape[2], cfg.resolved_label_channels(spec.kind),
                     cfg.block_size, k0.dtype, k0.device, channels, extend=extend, append=append,
                     request_rows=request_rows)


class _InnerName:
    """A backend-name attribute SGLang sets (AttentionBackend.*_attention_backend_str) that reads as the inner
    backend's name; what SGLang set is kept, and read only when the inner's name is not known (tests)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, backend, owner=None):
        return self if backend is None else backend.inner_name or backend._stamped.get(self.name)

    def __set__(self, backend, registered):
        backend._stamped[self.name] = registered


class AsyncTLSBackend(AttentionBackend):
    """Stock backend `inner` for prefill and short decode rows; AsyncTLS sparse decode for the long rows."""

    def __init__(self, model_runner, inner: AttentionBackend, inner_name: Optional[str] = None):
        self.inner, self.inner_name = inner, inner_name
        self._stamped = {}
        self.token_to_kv_pool = pool = model_runner.token_to_kv_pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.needs_cpu_seq_lens = getattr(inner, "needs_cpu_seq_lens", True)
        self.cfg, spec, channels = _model_config(model_runner)
        cfg = self.cfg
        # per-layer (k_t, k_b), indexed by the model's layer id
        self.budgets = cfg.layer_budgets(spec.num_layers)
        _check_pool(cfg, pool, model_runner.page_size)
        if cfg.host_kv_gib > 0:  # prefill reads a host-held prefix once per layer, not once per query tile
            from sglang_asynctls.offload.staged_prefix import staged_extend

            inner.extend_attention_fwd = staged_extend(inner.extend_attention_fwd)
        self.layer_offset = getattr(pool, "start_layer", 0) or 0
        k0 = pool.get_key_buffer(self.layer_offset)
        self.num_blocks = -(-model_runner.model_config.context_len // cfg.block_size)
        impl = kernel_choice.impl_for(k0)
        self.index = _build_index(cfg, spec, pool, k0, _rank_channels(channels, k0), impl,
                                  (self.req_to_token.shape[0], self.num_blocks) if model_runner.page_size == 1
                                  else None)
        self.sparse_fn, self.sparse_impl = kernel_choice.sparse_decode_fn(impl)
        self.host_cache = (kernel_choice.host_row_cache(cfg, pool, self.req_to_token.shape[0], k0, self.sparse_impl,
                                                        max(kb for _, kb in self.budgets))
                           if cfg.host_kv_gib > 0 else None)
        self._graph_lens: Optional[torch.Tensor] = None  # CUDA graphs: the dense view's lengths, at a fixed address
        # --asynctls-sparse-min-kv-mib: the length from which a request decodes sparsely this step (step_choice.py);
        # an int in eager steps, under CUDA graphs a device scalar the captured graph reads
        self._from = cfg.dense_below
        self._graph_from: Optional[torch.Tensor] = None
        self.min_sparse_bytes = int(cfg.sparse_min_kv_mib * 2**20)
        self.row_bytes = step_choice.kv_row_bytes(k0, pool.get_value_buffer(self.layer_offset))
        self._dense_fb = self._extend_plan = None
        # per decode step, computed at its first layer: [B, NB] page of every block, [B] sparse-path rows
        self._block_table = self._long_seq = self._decode_rows = None
        self.stats = {"index_pages_written": 0, "index_slots_labelled": 0, "index_arrivals": 0, "dense_steps": 0}
        logger.info("asynctls backend: %s inner, %s, sparse decode via %s, index %.1f MiB, %d blocks per request "
                    "max, label channels %s, (k_t, k_b) per layer %s", type(inner).__name__, cfg, self.sparse_impl,
                    self.index.nbytes() / 2**20, self.num_blocks,
                    "calibrated" if channels is not None else "ranked by |K| at the first long prefill",
                    "uniform" if len(set(self.budgets)) == 1 else self.budgets)

    def __getattr__(self, name):
        # attributes SGLang's model code reads off the backend it runs (forward_metadata, kv_indptr, ...) are the
        # inner backend's; only called for names this object does not have
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # SGLang stamps the registered name ("asynctls") on the backend it built. Model code picks its forward path by
    # that name (DeepSeek/GLM MLA: deepseek_v2's dispatch_attn_forward_method, then forward_mla's absorbed-core
    # check), so it must read the inner backend's: an MLA model then runs exactly the path it runs on stock.
    prefill_attention_backend_str = _InnerName()
    decode_attention_backend_str = _InnerName()

    # ------------------------------------------------------------------ the dense view: long requests hidden
    def _is_sparse_step(self, fb) -> bool:
        return fb.forward_mode.is_decode_or_idle() and fb.spec_info is None

    def _dense_view(self, fb, graph: bool):
        """fb with every request of >= dense_below tokens shown one token long: the inner backend reads one KV row
        of it (the first, which every request has) and its output row is replaced by the sparse one; in a dense
        step (step_choice.py) every request keeps its length. With graph, the lengths and the step's sparse
        threshold live in buffers whose addresses the captured graph keeps."""
        n = step_choice.sparse_from(getattr(fb, "seq_lens_cpu", None), self.cfg.dense_below, self.min_sparse_bytes,
                                    self.row_bytes)
        if n == step_choice.NEVER:  # lengths known here: count the steps the flag turned dense
            self.stats["dense_steps"] += bool((fb.seq_lens_cpu >= self.cfg.dense_below).any())
        view = copy.copy(fb)
        lens = torch.where(fb.seq_lens >= n, torch.ones_like(fb.seq_lens), fb.seq_lens)
        self._from = n
        if graph:
            lens = self._graph_lens[: len(lens)].copy_(lens)
            if self._graph_from is not None:  # the flag is on: the threshold changes from step to step
                self._from = self._graph_from.fill_(n)
        view.seq_lens = lens
        if getattr(fb, "seq_lens_cpu", None) is not None:
            cpu = fb.seq_lens_cpu
            view.seq_lens_cpu = torch.where(cpu >= n, torch.ones_like(cpu), cpu)
            view.seq_lens_sum = int(view.seq_lens_cpu.sum())
        elif getattr(fb, "seq_lens_sum", None) is not None:
            view.seq_lens_sum = fb.seq_lens_sum  # an upper bound: stock backends size index buffers by it
        self._dense_fb = view
        return view

    def _inner_batch(self, fb):
        """What the inner backend sees of fb: the dense view in decode, fb itself otherwise."""
        if not self._is_sparse_step(fb):
            return fb
        view = self._dense_fb
        if view is None or view.out_cache_loc is not fb.out_cache_loc:  # metadata was built for another batch
            view = self._dense_view(fb, graph=False)
        return view

    # ------------------------------------------------------------------ metadata (SGLang's three-method contract)
    def init_forward_metadata(self, forward_batch):
        self._extend_plan = None
        if self._is_sparse_step(forward_batch):
            return self.inner.init_forward_metadata(self._dense_view(forward_batch, graph=False))
        self.inner.init_forward_metadata(forward_batch)
        if forward_batch.forward_mode.is_extend():
            self._plan_index_extend(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        fb = self._dense_view(forward_batch, graph=True) if self._is_sparse_step(forward_batch) else forward_batch
        self.inner.init_forward_metadata_out_graph(fb, in_capture=in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        self.inner.init_forward_metadata_in_graph(self._inner_batch(forward_batch))

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        # int64, as the graph runners' own seq_lens buffers (model_executor/runner/base_runner.py); 8 bytes a batch
        # row (4 KiB at SGLang's largest default max bs, 512) and 8 for the step's sparse threshold, the buffers
        # the KV sizing hook does not charge
        self._graph_lens = torch.zeros(max_bs, dtype=torch.int64, device=self.req_to_token.device)
        if self.min_sparse_bytes:
            self._graph_from = torch.full((1,), self.cfg.dense_below, dtype=torch.int64,
                                          device=self.req_to_token.device)
        self.inner.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    def on_after_cuda_graph_warmup(self):
        return self.inner.on_after_cuda_graph_warmup()

    def support_triton(self):
        return self.inner.support_triton()

    def _plan_index_extend(self, fb) -> None:
        self._extend_plan = self._plan_index(fb.req_pool_indices, list(fb.extend_prefix_lens_cpu),
                                             fb.seq_lens_cpu.tolist(), int(fb.out_cache_loc.numel()), "prefill")

    def _plan_index(self, req_pool_indices, prefix_lens: list, seq_lens: list, num_new: int, what: str):
        """The pages to index once [prefix, seq) of each request holds new keys: host-side lengths, no sync."""
        if self.host_cache is not None:  # a prefilled row may hold a new request: its cached rows are stale
            self.host_cache.reset_rows(req_pool_indices)
        plan = plan_extend(self.req_to_token, req_pool_indices, prefix_lens, seq_lens, self.cfg.block_size,
                           max_blocks=self.index.max_blocks)
        self.stats["index_pages_written"] += plan.num_pages
        self.stats["index_slots_labelled"] += num_new
        # one line per batch: radix reuse is visible as pages written << prompt pages
        logger.info("asynctls index: %s of %d new tokens wrote %d pages; %d prefix tokens reused",
                    what, num_new, plan.num_pages, sum(prefix_lens))
        return plan

    def index_arrived_kv(self, req_pool_indices: torch.Tensor, prefix_lens: list, seq_lens: list,
                         new_loc: torch.Tensor) -> None:
        """PD decode server: the keys of tokens [prefix_lens[i], seq_lens[i]) of each request arrived in the pool
        from a prefill server (no forward wrote them). Index them, every layer, exactly as forward_extend would
        after a local prefill of those tokens: the same plan, the same writer. req_pool_indices [B] int64 (device);
        new_loc [N] int64 their slots in request order (an extend's out_cache_loc). Launches only, no host sync."""
        self.stats["index_arrivals"] += len(seq_lens)
        plan = self._plan_index(req_pool_indices, prefix_lens, seq_lens, int(new_loc.numel()), "arrived KV")
        pool = self.token_to_kv_pool
        for lid in range(pool.layer_num):
            k_buffer = pool.get_key_buffer(lid + self.layer_offset)
            self.index.write_extend(lid, k_buffer, new_loc, plan)

    # ------------------------------------------------------------------ forward
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        o = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        # MLA's chunked-prefix prefill (fa3, FlashInfer) calls a layer once for the new tokens, then once per prefix
        # chunk with attn_attend_prefix_cache set: the new keys are indexed at the first call only
        if self._extend_plan is not None and not getattr(forward_batch, "attn_attend_prefix_cache", None):
            k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            self.index.write_extend(layer.layer_id - self.layer_offset, k_buffer, forward_batch.out_cache_loc,
                                    self._extend_plan)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        o_dense = self.inner.forward_decode(q, k, v, layer, self._inner_batch(forward_batch), save_kv_cache,
                                            **kwargs)
        if not self._is_sparse_step(forward_batch):
            return o_dense
        return self._sparse_decode(q, layer, forward_batch, o_dense, kwargs.get("q_rope"))

    def _sparse_decode(self, q, layer, forward_batch, o_dense, q_rope=None):
        lid = layer.layer_id - self.layer_offset
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        seq_lens, rpi = forward_batch.seq_lens, forward_batch.req_pool_indices
        ix, cfg = self.index, self.cfg
        # per-step tensors (this table, the kernels' scores and outputs) live in SGLang's CUDA-graph pool when
        # captured: about B x 1.1 MiB for Qwen3-8B at k_b 128 (docs/launch.md), not charged in the KV sizing
        if lid == 0 or self._block_table is None:  # once per step, shared by the layers (fixed within a step)
            self._block_table = ix.block_table(self.req_to_token, rpi, self.num_blocks)
            self._long_seq = seq_lens >= self._from
            self._decode_rows = ix.decode_rows(rpi, seq_lens)
            # with dense steps possible, the rows the kernels do not write are one token long to them, so a dense
            # step's sparse stages do next to no work (flag off: the real lengths, as before the flag)
            self._kernel_lens = (torch.where(self._long_seq, seq_lens, torch.ones_like(seq_lens))
                                 if self.min_sparse_bytes else None)
        ix.write_decode(lid, k_buffer, forward_batch.out_cache_loc, seq_lens, self._decode_rows)
        q3 = q.reshape(-1, layer.tp_q_head_num, q.numel() // (q.shape[0] * layer.tp_q_head_num))  # [B, Hq, D]
        if q_rope is not None:  # MLA with the rope part passed apart: the sparse path scores the whole latent key
            q3 = torch.cat([q3, q_rope.reshape(q3.shape[0], layer.tp_q_head_num, -1)], dim=-1)
        out = o_dense.view(q3.shape[0], layer.tp_q_head_num, -1) if o_dense.is_contiguous() else None
        kw = {}
        if self.sparse_impl == "triton" and out is not None:  # the kernels write the long rows in place
            kw = dict(out=out, out_rows=self._long_seq)
        else:
            q3 = q3.contiguous()
        token_budget, block_budget = self.budgets[layer.layer_id]
        o_sparse = self.sparse_fn(
            q3, k_buffer, v_buffer, self.req_to_token, rpi, self._kernel_lens if self.min_sparse_bytes else seq_lens,
            ix.kmin[lid], ix.kmax[lid], self._block_table,
            ix.labels[lid], ix.label_scale[lid], ix.channels[lid], block_size=cfg.block_size,
            block_budget=block_budget, token_budget=token_budget, sink_tokens=cfg.sink_tokens,
            local_window=cfg.local_window, sm_scale=layer.scaling, bound_slack=cfg.bound_slack,
            group_score=cfg.group_score, **kw, **self._host_cache_kw(lid, rpi, seq_lens, k_buffer, v_buffer))
        if kw:
            return o_dense
        return torch.where(self._long_seq[:, None], o_sparse.reshape(o_dense.shape).to(o_dense.dtype), o_dense)

    def _host_cache_kw(self, lid, rpi, seq_lens, k_buffer, v_buffer) -> dict:
        if self.host_cache is None:
            return {}
        return {"host_cache": self.host_cache.for_layer(lid, rpi, seq_lens, self._long_seq, k_buffer, v_buffer)}
