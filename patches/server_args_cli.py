"""Hook: add the `--asynctls-*` flags to SGLang's argument parser.

Target:  sglang.srt.server_args.ServerArgs.add_cli_args (staticmethod), HookType.AFTER
SGLang:  0.5.17
Reason:  SGLang has no plugin API for CLI flags; `launch_server` / `sglang serve` call `load_plugins()` before
         building the parser, so an AFTER hook here makes the flags appear in `--help` and parse normally.
"""

from __future__ import annotations

import argparse

from sglang_asynctls.config import DENSE_BACKEND_CHOICES, FLAGS, GROUP_SCORES, AsyncTLSConfig

TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
_D = AsyncTLSConfig()


def add_asynctls_args(_result, parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("AsyncTLS sparse decode (sglang-asynctls)")
    g.add_argument(FLAGS["enabled"], action="store_true",
                   help="Decode long sequences with AsyncTLS two-level sparse attention (prefill stays dense).")
    g.add_argument(FLAGS["dense_backend"], choices=DENSE_BACKEND_CHOICES, default=_D.dense_backend,
                   help="Stock attention backend for prefill and short-sequence decode; auto = the one stock SGLang "
                        "picks for this model and GPU (fa3 on Hopper). Default: %(default)s.")
    ints = [
        ("block_size", "Tokens per coarse block (power of two in [16, 512])."),
        ("block_budget", "k_b: blocks kept per KV group by the coarse stage (forced sink/window blocks included)."),
        ("token_budget", "k_t: tokens attended per KV group (sink and window included; <= k_b x block size)."),
        ("sink_tokens", "First tokens always attended."),
        ("local_window", "Last tokens always attended."),
        ("dense_below", "Sequences shorter than this decode densely."),
    ]
    for field, text in ints:
        g.add_argument(FLAGS[field], type=int, default=getattr(_D, field), help=f"{text} Default: %(default)s.")
    g.add_argument(FLAGS["sparse_min_kv_mib"], type=float, default=_D.sparse_min_kv_mib, metavar="MIB",
                   help="Decode a step sparsely only when its long requests (--asynctls-dense-below or more tokens) "
                        "hold at least MIB of KV per layer; below it the whole step runs the stock decode, which "
                        "is cheaper at low batch x context. Default: %(default)s (every such step is sparse).")
    g.add_argument(FLAGS["label_channels"], type=int, default=None,
                   help="d_c: heavy key channels kept as INT4 labels (even). Default: 32 for GQA, 128 for MLA.")
    g.add_argument(FLAGS["bound_slack"], type=float, default=_D.bound_slack,
                   help="Weight in [0, 1] of each block's min/max half-range in the coarse score (1 = the exact "
                        "upper bound, 0 = the block centre). Default: %(default)s.")
    g.add_argument(FLAGS["group_score"], choices=GROUP_SCORES, default=_D.group_score,
                   help="How the coarse score combines a KV group's query heads. Default: %(default)s.")
    g.add_argument(FLAGS["layer_budget_scale"], type=str, default=_D.layer_budget_scale, metavar="LAYER:SCALE,...",
                   help="Per-layer budgets at the same average: each listed layer gets SCALE x k_t tokens and SCALE x "
                        "k_b blocks, the other layers share the rest equally; '' = every layer alike. Default: auto "
                        "(the channel config's calibrated schedule, if it has one).")
    g.add_argument(FLAGS["layer_candidate_scale"], type=str, default=_D.layer_candidate_scale,
                   metavar="LAYER:SCALE,...", help="Extra candidate blocks: each listed layer keeps SCALE (>= 1) x its "
                   "k_b blocks for label scoring (attended tokens unchanged); '' = none. Default: auto (as above).")
    g.add_argument(FLAGS["channel_config"], type=str, default=None, metavar="PATH",
                   help="Heavy-channel JSON from `python -m sglang_asynctls.calibrate`.")
    g.add_argument(FLAGS["offload"], action="store_true",
                   help="Keep full KV in pinned host memory with a resident block set on the GPU.")
    g.add_argument(FLAGS["host_kv_gib"], type=float, default=_D.host_kv_gib, metavar="GIB",
                   help="Extend the KV pool by GIB of pinned host memory per GPU, mapped into the GPU's address "
                        "space after its own KV memory: more tokens fit, and those in host slots are read over PCIe "
                        "(only the selected tokens of long sequences decode sparsely). "
                        "Default: %(default)s (off).")
    g.add_argument(FLAGS["host_cache_tokens"], type=int, default=_D.host_cache_tokens, metavar="R",
                   help="With the host tier: keep up to R selected host-slot rows per request, layer and KV head in "
                        "a GPU cache (8-way set-associative, LRU), so decode reads them from HBM on later steps "
                        "instead of over PCIe. Needs --max-running-requests (the cache is sized by request rows). "
                        "Default: %(default)s (off).")
    g.add_argument(FLAGS["host_prefetch_rows"], type=int, default=_D.host_prefetch_rows, metavar="P",
                   help="With the host-row cache: after each layer's selection, copy the host rows of the next P "
                        "candidates below the token-budget cut-off (the likeliest newcomers of the next step) into "
                        "the cache on a side stream, ahead of use. Default: %(default)s (off).")


def config_from_namespace(args: argparse.Namespace) -> AsyncTLSConfig:
    """Build (and so validate) the config from parsed flags; raises AsyncTLSConfigError naming the flag."""
    values = {field: getattr(args, "enable_asynctls" if field == "enabled" else f"asynctls_{field}")
              for field in FLAGS}
    return AsyncTLSConfig(**values)
