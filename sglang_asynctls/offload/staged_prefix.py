"""Prefill over a prefix held in the KV host tier: gather the prefix once per layer, then run SGLang's extend kernel.

SGLang's Triton extend kernel has one program per (request, query head, 128-query tile), and each program streams
the request's whole prefix. Over HBM that re-reading is cheap; over PCIe it is not: on the H100 an 8k-token chunk
took ~6.5 s more per 8k tokens of prefix held in host slots (benchmarks/results/offload_capacity_h100.json, first
run), so a 96k prompt spilling to the host would take minutes. Gathering the batch's prefix rows into one contiguous
device buffer first reads each host row once per layer; the kernel then re-reads HBM as it does without a host tier.
"""

from __future__ import annotations

import functools

import torch


def prefix_rows(kv_indptr: torch.Tensor, kv_indices: torch.Tensor):
    """(rows, indices): the pool rows kv_indices[:kv_indptr[-1]] in order (int64), and the indices that address them
    once gathered (0, 1, ...). kv_indptr is unchanged: row i of the gather is entry i of kv_indices."""
    n = int(kv_indptr[-1])  # a host sync, once per prefill batch (never inside a captured graph)
    return kv_indices[:n].long(), torch.arange(n, dtype=kv_indices.dtype, device=kv_indices.device)


def staged_extend(extend_fwd):
    """Wrap SGLang's extend_attention_fwd(q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, ...) so
    that the prefix it reads is a gathered device copy (token-granular, hence page_size=1)."""
    batch = {}  # the layers of one batch share its kv_indices tensor: its rows are worked out once

    @functools.wraps(extend_fwd)
    def run(q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, *args, **kwargs):
        if kv_indices.numel() and k_buffer.dim() == 3:
            if batch.get("kv_indices") is not kv_indices:
                batch.update(kv_indices=kv_indices, rows=prefix_rows(kv_indptr, kv_indices))
            rows, kv_indices = batch["rows"]
            # one layer's gather of the batch's prefix, freed after the layer: 2 x prefix x Hkv x D x 2 bytes
            # (384 MiB for a 96k Qwen3-8B prefix), prefill activation memory outside the KV budget as stock's is
            k_buffer, v_buffer = k_buffer.index_select(0, rows), v_buffer.index_select(0, rows)
            if "page_size" in kwargs:
                kwargs["page_size"] = 1
        return extend_fwd(q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, *args, **kwargs)

    return run
