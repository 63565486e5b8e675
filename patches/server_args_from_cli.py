"""Hook: turn the parsed `--asynctls-*` flags into one validated AsyncTLSConfig carried by ServerArgs.

Target:  sglang.srt.server_args.ServerArgs.from_cli_args (classmethod), HookType.AROUND
SGLang:  0.5.17
Reason:  `from_cli_args` keeps only dataclass fields, so our flags would be dropped. Around it we validate the
         flags (before the model is touched), route the attention backend to `asynctls`, and after SGLang has
         resolved the model config, check that the model is GQA/MHA or MLA and that its heads split over the
         attention tensor-parallel ranks, and resolve the inner stock backend (`auto`: stock's own choice). Any
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
    """PD disaggregation: AsyncTLS runs on the decode server only. Its prefill server runs stock SGLang (no index is
    written or sent there): the decode server indexes the KV as it arrives (patches/prebuilt_batch.py), which reads
    each key once per layer, far less than the transfer moved, and needs no change to SGLang's transfer engines."""
    mode = getattr(args, "disaggregation_mode", "null") or "null"
    if mode == "prefill":
        raise AsyncTLSConfigError(f"{FLAGS['enabled']} belongs on the decode server of a PD pair: start the "
                                  "--disaggregation-mode prefill server without it, with the decode server's "
                                  "--page-size (64 unless set); the decode server indexes the KV as it arrives")
    if mode == "decode" and getattr(args, "enable_hierarchical_cache", False):
        # a prefix HiCache loads back onto the decode server would arrive in new slots that nobody indexes
        raise AsyncTLSConfigError(f"{FLAGS['enabled']} cannot be combined with --enable-hierarchical-cache on a "
                                  "--disaggregation-mode decode server yet")


def _attn_tp_size(server_args) -> int:
    # SGLang's own split of --tp into attention DP x CP x TP, so the check sees the ranks the backend will see
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info

    return compute_dp_attention_world_info(server_args.enable_dp_attention, 0, server_args.tp_size,
                                           server_args.dp_size, getattr(server_args, "attn_cp_size", 1) or 1)[1]


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
