"""Triton kernels of AsyncTLS; each public launcher has a pure-torch twin of the same name and signature in
`sglang_asynctls.reference` (plus an optional `out=`), and the tests hold it to that twin.

Notations for shapes: see `sglang_asynctls/reference.py` (B, Hq, Hkv, G, D, Dv, S, BS, NB, Kb, Kt, Dc).

    index build   quantize_labels, index_extend (prefill), append_decode_index (decode)
    coarse        block_scores -> select_blocks
    fine          token_logits -> token_scores (combine) -> select_tokens / select_token_slots
    attention     sparse_decode (split-K) -> splitk_combine
    host tier     host_cache_lookup, host_prefetch (side stream), block_overlap (telemetry); twins in
                  `sglang_asynctls.offload.reference`
    whole steps   composed outside this package: sglang_asynctls/decode_step.py (asynctls_decode and the baselines)

Kernels are leaves: they import torch and triton only, and take every count and layout as an argument.

Selections (`select_blocks`, `select_tokens`, `fine_select`) return the reference's *set*, with priorities compared
at bfloat16 resolution (`_topk.KEY_BITS`; ties within 2^-7 relative go to the lower index)
in ascending candidate order rather than priority order.

Layout: the launchers take any strides. Store the label pool head-major ([Hkv, S, Dc // 2] uint8 and [Hkv, S]
float32, passed as `.permute(1, 0, 2)` / `.t()` views): a KV group's candidates then read consecutive rows, where
the slot-major layout spends a 32-byte sector per 4-byte scale (token_logits at 96k x 8, GQA, H100: 22.6 us
head-major vs 29.9 us slot-major). Results: benchmarks/results/op_latency_h100.json.
"""
