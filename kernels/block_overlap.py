"""Block overlap |M_t n M_t-1| of the coarse selection, per (request, KV head) of the long requests.

The host tier's telemetry: how many of this step's k_b blocks the request's previous step also selected (the
paper's locality, which bounds what any prefetch must copy). One program per (batch row, KV head) compares its
blocks with the previous selection kept per request row (in chunks of BLOCK_J), adds the intersection and |M_t| to
two counters, then stores M_t in place of M_t-1. Spec: `offload/reference.py::block_overlap`.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _block_overlap_kernel(blocks, rows, active, prev, counters, KB, KBM, stride_bb, stride_bh, stride_pr, stride_ph,
                          HKV: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_J: tl.constexpr, COUNT: tl.constexpr,
                          C_NUM: tl.constexpr, C_DEN: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    if tl.load(active + b) != 0:
        offs = tl.arange(0, BLOCK_KB)
        cur = tl.load(blocks + b * stride_bb + h * stride_bh + offs, mask=offs < KB, other=-1)
        old = prev + tl.load(rows + b).to(tl.int64) * stride_pr + h * stride_ph
        found = tl.zeros([BLOCK_KB], dtype=tl.int32)
        had = tl.zeros([BLOCK_J], dtype=tl.int32)
        for j0 in range(0, KBM, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            p = tl.load(old + offs_j, mask=offs_j < KBM, other=-1)
            had += (p >= 0).to(tl.int32)
            found += tl.sum(((cur[:, None] == p[None, :]) & (p[None, :] >= 0)).to(tl.int32), axis=1)
        valid = cur >= 0
        if COUNT:
            counted = (tl.sum(had, axis=0) > 0).to(tl.int64)  # a row's first decode step has nothing to compare
            tl.atomic_add(counters + C_NUM, counted * tl.sum((valid & (found > 0)).to(tl.int64), axis=0))
            tl.atomic_add(counters + C_DEN, counted * tl.sum(valid.to(tl.int64), axis=0))
        tl.debug_barrier()  # every thread has read M_t-1 before it is overwritten
        for j0 in range(0, KBM, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            c = tl.load(blocks + b * stride_bb + h * stride_bh + offs_j, mask=offs_j < KB, other=-1)
            tl.store(old + offs_j, c, mask=offs_j < KBM)


def block_overlap(blocks: torch.Tensor, rows: torch.Tensor, active: torch.Tensor, prev: torch.Tensor,
                  counters: Optional[torch.Tensor] = None, *, columns: Tuple[int, int] = (7, 8)) -> None:
    """See `sglang_asynctls.offload.reference.block_overlap`. counters: an int64 vector added to in-kernel at
    columns (intersections, selected blocks)."""
    b, hkv, kb = blocks.shape
    nr, hkv2, kbm = prev.shape
    assert hkv2 == hkv and kbm >= kb and blocks.stride(2) == 1 and prev.stride(2) == 1
    assert blocks.dtype == prev.dtype == torch.int32 and rows.shape == active.shape == (b,)
    if counters is not None:
        assert counters.dim() == 1 and counters.dtype == torch.int64 and counters.is_contiguous()
    block_kb = triton.next_power_of_2(kb)
    block_j = max(16, min(64, 8192 // block_kb))  # the [Kb, BLOCK_J] compare tile stays at most 8,192 entries
    _block_overlap_kernel[(b * hkv,)](
        blocks, rows, active, prev, counters if counters is not None else blocks, kb, kbm, blocks.stride(0),
        blocks.stride(1), prev.stride(0), prev.stride(1), HKV=hkv, BLOCK_KB=block_kb, BLOCK_J=block_j,
        COUNT=counters is not None, C_NUM=int(columns[0]), C_DEN=int(columns[1]), num_warps=4)
