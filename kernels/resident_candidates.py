"""Candidates of an offload step in one launch: the token positions of M_{t-1} and the device KV slots of their
resident copies (replaces ~15 torch ops of `ResidentSet.candidates`), and, on the GPU, the stall telemetry's NEEDED
stamp (the engine launches this right before it waits for the layer's copy). Spec:
`offload/reference.py::resident_candidates`."""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .device_clock import global_timer


@triton.jit
def _resident_candidates_kernel(prev, prev_slots, cache_pages, rows, seq_lens, positions, token_slots, stamps, C,
                                stride_pr, stride_ph, stride_cr, stride_ob, stride_oh,
                                HKV: tl.constexpr, BS: tl.constexpr, BLOCK_C: tl.constexpr,
                                STAMP: tl.constexpr):
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    if STAMP:  # stamps[NEEDED] (= 1) = the GPU's global timer, once
        tl.store(stamps + 1, global_timer(), mask=(pid == 0) & (cb == 0))
    b = pid // HKV
    h = pid % HKV
    row = tl.load(rows + b).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs_c < C
    src = row * stride_pr + h * stride_ph + offs_c // BS
    blk = tl.load(prev + src, mask=m, other=-1)
    slot = tl.load(prev_slots + src, mask=m, other=-1)
    pos = blk.to(tl.int64) * BS + offs_c % BS
    ok = (blk >= 0) & (pos < tl.load(seq_lens + b))
    page = tl.load(cache_pages + row * stride_cr + slot, mask=ok & (slot >= 0), other=-1)
    out = b * stride_ob + h * stride_oh + offs_c
    tl.store(positions + out, tl.where(ok, pos, -1), mask=m)
    tl.store(token_slots + out, tl.where(ok, page.to(tl.int64) * BS + offs_c % BS, -1).to(tl.int32), mask=m)


def resident_candidates(prev: torch.Tensor, prev_slots: torch.Tensor, cache_pages: torch.Tensor, rows: torch.Tensor,
                        seq_lens: torch.Tensor, block_size: int, needed: Optional[torch.Tensor] = None,
                        out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """See `sglang_asynctls.offload.reference.resident_candidates`. needed: a layer's stamps row [2] int64 of
    OffloadTelemetry (GPU only): stamps[NEEDED] is set to the GPU timer when the kernel runs."""
    _, hkv, kb = prev.shape
    b = rows.shape[0]
    c = kb * block_size
    assert prev_slots.shape == prev.shape and prev_slots.stride() == prev.stride() and prev.stride(2) == 1
    assert cache_pages.stride(1) == 1 and seq_lens.shape == (b,)
    assert prev.dtype == prev_slots.dtype == cache_pages.dtype == torch.int32
    if out is None:
        out = (torch.empty(b, hkv, c, dtype=torch.int64, device=prev.device),
               torch.empty(b, hkv, c, dtype=torch.int32, device=prev.device))
    positions, token_slots = out
    assert positions.shape == token_slots.shape == (b, hkv, c) and positions.dtype == torch.int64
    assert token_slots.dtype == torch.int32 and positions.stride() == token_slots.stride()
    assert positions.stride(2) == 1
    if needed is not None:
        assert needed.is_cuda and needed.shape == (2,) and needed.dtype == torch.int64 and needed.is_contiguous()
    tensors = (prev, prev_slots, cache_pages, rows, seq_lens, positions, token_slots)
    assert len({t.device.type for t in tensors}) == 1, "one device for all"
    block_c = min(1024, triton.next_power_of_2(c))
    _resident_candidates_kernel[(b * hkv, triton.cdiv(c, block_c))](
        prev, prev_slots, cache_pages, rows, seq_lens, positions, token_slots,
        needed if needed is not None else positions, c, prev.stride(0), prev.stride(1), cache_pages.stride(0),
        positions.stride(0), positions.stride(1), HKV=hkv, BS=block_size, BLOCK_C=block_c,
        STAMP=needed is not None, num_warps=4)
    return out
