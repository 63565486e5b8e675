"""Hook: turn the parsed `--asynctls-*` flags into one validated AsyncTLSConfig carried by ServerArgs.

Target:  sglang.srt.server_args.ServerArgs.from_cli_args (classmethod), HookType.AROUND
SGLang:  0.5.17
Reason:  `from_cli_args` keeps only dataclass fields, so our flags would be dropped. Around it we validate the
         flags (before the model is touched), route the attention backend to `asynctls`, and after SGLang has
         resolved the model config, check that the model is GQA/MHA or MLA, that its heads split over the
         attention tensor-parallel ranks and that what every request row costs (block bounds at --page-size 1,
         the host-row cache) fits the GPU, and resolve the inner stock backend (`auto`: stock's own choice). Any
         error ends the launch in the launcher process with one line naming the flag — no scheduler process starts
         half-configured.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from sglang_asynctls.config import FLAGS, AsyncTLSConfigError
from sglang_asynctls.runtime_config import BACKEND_NAME, attach_config

TARGET = "sglang.srt.server_args.ServerArgs.from_cli_args"
logger = logging.getLogger(__name__)


def _route_backend(args) -> None:
    chosen = {f"--{k.replace('_', '-')}": getattr(args, k, None)
              for k in ("attention_backend", "prefill_attention_backend", "decode_attention_backend")}
    clash = {flag: v for flag, v in chosen.items() if v not in (None, BACKEND_NAME)}
    if clash:
        flag, value = next(iter(clash.items()))
        raise AsyncTLSConfigError(f"{FLAGS['enabled']} selects the '{BACKEND_NAME}' attention backend itself; "
                                  f"choose the stock backend it runs prefill and short requests with by "
                                  f"{FLAGS['dense_backend']} {value} instead of {flag} {value}")
    args.attention_backend = BACKEND_NAME


def _match_page_size(args, cfg) -> None:
    # by default a KV page is exactly one block; any multiple of the block size keeps each block in contiguous,
    # block-aligned slots, so a block's Kmin/Kmax row is addressed by slot // block_size and radix-shared pages share
    # their index; --page-size 1 keeps block rows per request (sglang_asynctls/index.py)
    if getattr(args, "page_size", None) is None:
        args.page_size = cfg.block_size
        return
    if args.page_size == 1 or args.page_size % cfg.block_size == 0:
        return
    raise AsyncTLSConfigError(f"{FLAGS['enabled']} needs --page-size 1 or a multiple of {FLAGS['block_size']} "
                              f"({cfg.block_size}); got --page-size {args.page_size}")


def _check_kv_dtype(args) -> None:
    dtype = getattr(args, "kv_cache_dtype", "auto")
    if dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16"):
        raise AsyncTLSConfigError(f"{FLAGS['enabled']} needs a 16-bit KV cache: --kv-cache-dtype must be auto, "
                                  f"bfloat16 or float16 (got {dtype})")


def _check_model(server_args, cfg) -> None:
    from sglang_asynctls.model_spec import check_attention_tp, check_config_for_model, from_sglang_model_config

    if cfg.host_kv_gib > 0:
        _check_host_tier(server_args, cfg)
    if server_args.model_path.lower() in ("none", "dummy"):
        return
    model = from_sglang_model_config(server_args.get_model_config())
    check_config_for_model(cfg, model)
    check_attention_tp(model, _attn_tp_size(server_args))
    _check_request_rows(server_args, cfg, model)


def _check_host_tier(server_args, cfg) -> None:
    from sglang_asynctls.offload.host_tier import check_host_memory

    clashes = {"--enable-hierarchical-cache": getattr(server_args, "enable_hierarchical_cache", False),
               "--enable-memory-saver": getattr(server_args, "enable_memory_saver", False),
               "--speculative-algorithm": getattr(server_args, "speculative_algorithm", None),
               # a transfer engine would register (and read) the KV buffers as device memory
               "--disaggregation-mode": getattr(server_args, "disaggregation_mode", "null") not in ("null", None)}
    for flag, value in clashes.items():
        if value:
            raise AsyncTLSConfigError(f"{FLAGS['host_kv_gib']} cannot be combined with {flag} yet")
    if cfg.host_cache_tokens and not server_args.max_running_requests:
        raise AsyncTLSConfigError(f"{FLAGS['host_cache_tokens']} needs --max-running-requests: the cache keeps "
                                  "rows for every request row, and SGLang's default is thousands of rows")
    # every scheduler process on this node maps its own host tier: TP x PP ranks, times DP replicas unless DP
    # attention spreads them over the same GPUs
    gpus = server_args.tp_size * getattr(server_args, "pp_size", 1)
    if not getattr(server_args, "enable_dp_attention", False):
        gpus *= getattr(server_args, "dp_size", 1) or 1
    ranks_here = max(1, gpus // max(1, server_args.nnodes))
    check_host_memory(cfg.host_kv_gib, ranks_here)


def _check_disaggregation(args) -> None:
    """HiCache is refused (below). PD disaggregation: AsyncTLS runs on the decode server only. Its prefill server runs stock SGLang (no index is
    written or sent there): the decode server indexes the KV as it arrives (patches/prebuilt_batch.py), which reads
    each key once per layer, far less than the transfer moved, and needs no change to SGLang's transfer engines."""
    mode = getattr(args, "disaggregation_mode", "null") or "null"
    if mode == "prefill":
        raise AsyncTLSConfigError(f"{FLAGS['enabled']} belongs on the decode server of a PD pair: start the "
                                  "--disaggregation-mode prefill server without it, with the decode server's "
                                  "--page-size (64 unless set); the decode server indexes the KV as it arrives")
    if getattr(args, "enable_hierarchical_cache", False):
        # a prefix HiCache loads back from host memory lands in new slots counted as reused prefix: the extend's
        # index write skips them, so decode would select over stale labels and block bounds (PD decode servers too)
        raise AsyncTLSConfigError(f"{FLAGS['enabled']} cannot be combined with --enable-hierarchical-cache yet: a "
                                  "prefix it loads back would be decoded without an index")


def _attn_world(server_args) -> tuple:
    """(attention TP size, attention DP size): SGLang's own split of --tp into attention DP x CP x TP, so the checks
    see the ranks the backend will see."""
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info

    info = compute_dp_attention_world_info(server_args.enable_dp_attention, 0, server_args.tp_size,
                                           server_args.dp_size, getattr(server_args, "attn_cp_size", 1) or 1)
    return info[1], info[3]


def _attn_tp_size(server_args) -> int:
    return _attn_world(server_args)[0]


def _kv_dtype(server_args, model_config):
    import torch

    named = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    return named.get(getattr(server_args, "kv_cache_dtype", "auto"), model_config.dtype)


def _check_request_rows(server_args, cfg, model) -> None:
    """Block bounds at --page-size 1 and the host-row cache cost memory for every row of SGLang's request pool,
    whatever the traffic: refuse a pool whose rows and the KV of one full-context request exceed the GPU memory
    SGLang keeps for weights and KV cache. The weights' size is not known here: what fits that memory but not beside
    the weights is refused by the KV sizing hook, in the scheduler (patches/kv_sizing.py)."""
    from sglang.srt.distributed.utils import get_pp_indices
    from sglang.srt.utils.common import get_device_memory_capacity

    from sglang_asynctls.device_memory import SGLANG_MIN_DEFAULT_REQUESTS, PluginBuffers
    from sglang_asynctls.model_spec import kv_heads_of_rank

    mc = server_args.get_model_config()
    attn_tp, attn_dp = _attn_world(server_args)
    heads = kv_heads_of_rank(model.num_kv_heads, attn_tp, 0)
    pp = server_args.pp_size
    layers = max(end - start for start, end in (get_pp_indices(model.num_layers, r, pp) for r in range(pp)))
    buffers = PluginBuffers.for_pool(cfg, model.kind, num_layers=layers, num_kv_heads=heads.stop - heads.start,
                                     head_dim=model.head_dim, v_head_dim=model.v_head_dim,
                                     dtype=_kv_dtype(server_args, mc), page_size=server_args.page_size,
                                     context_len=mc.context_len)
    gpu_mib = get_device_memory_capacity(server_args.device)
    if not buffers.per_request_row() or not gpu_mib:
        return
    mrr = server_args.max_running_requests
    rows = (mrr // attn_dp if mrr else SGLANG_MIN_DEFAULT_REQUESTS) + 1  # + the pool's padding row
    need, static = rows * buffers.per_request_row(), gpu_mib * 2**20 * server_args.mem_fraction_static
    one_request = mc.context_len * buffers.kv_bytes_per_token()
    if need + one_request <= static:
        return
    fix = ("lower --max-running-requests" if mrr else
           f"set --max-running-requests (SGLang's default request pool has {SGLANG_MIN_DEFAULT_REQUESTS} rows or more)")
    if buffers.page_size == 1:
        what = (f"asynctls at --page-size 1 keeps block bounds per request row: {need / 2**30:.1f} GiB for {rows} "
                f"request rows x {buffers.max_blocks} blocks")
        fix += f", lower --context-length, or use --page-size {cfg.block_size} (the default)"
    else:
        what = (f"{FLAGS['host_cache_tokens']} {cfg.host_cache_tokens} keeps host-row cache lines for every request "
                f"row: {need / 2**30:.1f} GiB for {rows} request rows")
        fix += f" or {FLAGS['host_cache_tokens']}"
    raise AsyncTLSConfigError(
        f"{what}; with the KV cache of one {mc.context_len}-token request ({one_request / 2**30:.1f} GiB) that is more "
        f"than the {static / 2**30:.1f} GiB this GPU keeps for weights and KV cache (--mem-fraction-static "
        f"{server_args.mem_fraction_static:g} of {gpu_mib / 1024:.0f} GiB); {fix}")


def _check_before_sglang(cfg) -> None:
    """What can be refused from the flags alone, before SGLang resolves anything (and prints its own errors)."""
    if cfg.offload:
        # the offload engine is its own piece of work; refusing beats silently serving without it
        raise AsyncTLSConfigError(f"{FLAGS['offload']} is not available in this version of sglang-asynctls")
    if cfg.channel_config is not None:
        from sglang_asynctls.model_spec import read_channel_json

        read_channel_json(cfg.channel_config)


def from_cli_args_with_asynctls(original, cls, args):
    from sglang_asynctls import dense_backend
    from sglang_asynctls.patches.server_args_cli import config_from_namespace

    try:
        cfg = config_from_namespace(args)
        if getattr(args, "attention_backend", None) == BACKEND_NAME and not cfg.enabled:
            cfg = dataclasses.replace(cfg, enabled=True)
        if cfg.enabled:
            _check_before_sglang(cfg)
            _check_disaggregation(args)
            _route_backend(args)
            _match_page_size(args, cfg)
            # the index plan of a prefill batch is built on the host per batch; a captured prefill graph would
            # replay the capture-time plan, so prefill runs eagerly (decode graphs stay on)
            args.cuda_graph_backend_prefill = "disabled"
            _check_kv_dtype(args)
        server_args = original(cls, args)
        if cfg.enabled:
            _check_model(server_args, cfg)
            cfg = dataclasses.replace(cfg, dense_backend=dense_backend.resolve(cfg, server_args))
            attach_config(server_args, cfg)
            logger.info("AsyncTLS enabled: %s", cfg)
    except AsyncTLSConfigError as e:
        sys.stderr.write(f"sglang-asynctls: error: {e}\n")
        raise SystemExit(2) from None
    return server_args
