"""Which decode steps go sparse (`--asynctls-sparse-min-kv-mib`).

A sparse step costs about the same per layer whatever the context: seven dependent, latency-bound stages (73-81 us a
layer at 32k-96k x 8 on the H100, `op_latency_h100.json`). A dense decode costs the KV bytes it reads. So a step whose
long requests hold little KV is cheaper dense: low batch, and MLA's 1,152-byte latent rows (at 2 x 98k, fa3's MLA
decode step took 2.42 ms against 3.01 sparse, `mla_inner_h200.json`). With the flag set, a step whose long requests'
KV per layer is below it decodes densely: the inner backend sees every request at its real length, and the sparse
kernels see each request one token long and write none of the output. The choice is made on the host-side lengths
before the step, outside any CUDA graph, and reaches a captured graph through one device scalar (backend.py).
"""

from __future__ import annotations

from typing import Optional

import torch

NEVER = 1 << 62  # the sparse threshold of a dense step: no request is that long


def kv_row_bytes(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> int:
    """KV bytes one token holds in one layer. MLA's value buffer is a view of its key (latent) buffer: read once."""
    row = k_buffer[0].numel() * k_buffer.element_size()
    if v_buffer.data_ptr() != k_buffer.data_ptr():
        row += v_buffer[0].numel() * v_buffer.element_size()
    return row


def sparse_from(seq_lens_cpu: Optional[torch.Tensor], dense_below: int, min_bytes: int, row_bytes: int) -> int:
    """The length from which a request decodes sparsely this step: dense_below, or NEVER when the requests of
    dense_below tokens or more hold under min_bytes of KV per layer (min_bytes 0: never dense; no host-side
    lengths: as with 0)."""
    if not min_bytes or seq_lens_cpu is None:
        return dense_below
    long_tokens = int(seq_lens_cpu[seq_lens_cpu >= dense_below].sum())
    return dense_below if long_tokens * row_bytes >= min_bytes else NEVER
