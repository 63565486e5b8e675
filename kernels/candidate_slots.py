"""KV slots of every token of the selected blocks (Quest's attention set), without a position tensor."""

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _candidate_slots_kernel(block_ids, req_to_token, req_pool_indices, seq_lens, slots, C,
                            stride_bb, stride_bh, stride_rr, stride_ob, stride_oh,
                            HKV: tl.constexpr, BS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    blk = tl.load(block_ids + b * stride_bb + h * stride_bh + offs_c // BS, mask=offs_c < C, other=-1)
    pos = blk.to(tl.int64) * BS + offs_c % BS
    valid = (blk >= 0) & (pos < tl.load(seq_lens + b))
    req = tl.load(req_pool_indices + b).to(tl.int64)
    slot = tl.load(req_to_token + req * stride_rr + pos, mask=valid, other=-1)
    tl.store(slots + b * stride_ob + h * stride_oh + offs_c, slot.to(tl.int32), mask=offs_c < C)


def candidate_slots(block_ids: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                    seq_lens: torch.Tensor, block_size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`reference.positions_to_slots(reference.candidate_positions(block_ids, seq_lens, block_size), ...)` in one
    kernel. block_ids: [B, Hkv, Kb] int (-1 = none). Returns [B, Hkv, Kb * BS] int32 KV slots, -1 padded."""
    b, hkv, kb = block_ids.shape
    c = kb * block_size
    assert block_ids.stride(2) == 1 and req_to_token.stride(1) == 1 and seq_lens.shape == (b,)
    if out is None:
        out = torch.empty(b, hkv, c, dtype=torch.int32, device=block_ids.device)
    assert out.shape == (b, hkv, c) and out.dtype == torch.int32 and out.stride(2) == 1
    block_c = 1024
    _candidate_slots_kernel[(b * hkv, triton.cdiv(c, block_c))](
        block_ids, req_to_token, req_pool_indices, seq_lens, out, c, block_ids.stride(0), block_ids.stride(1),
        req_to_token.stride(0), out.stride(0), out.stride(1), HKV=hkv, BS=block_size, BLOCK_C=block_c,
        num_warps=4)
    return out
