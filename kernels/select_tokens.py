"""Fine level: top-Kt candidate tokens per KV group, sink and window positions forced."""

from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_asynctls import reference

from ._topk import ordered_key, topk_compact

# Candidates held in one program's registers (8,192 fp32 = 32 KiB at Kb = 128 blocks of 64); longer candidate
# lists (token-only over a whole context) go through torch.topk.
MAX_FUSED_CANDIDATES = 16384


@triton.jit
def token_keys(score, pos, seq_len, sink_tokens, local_window):
    """Selection keys of candidates: forced (sink/window) -> +inf, invalid (pos < 0 or -inf score) -> 0."""
    valid = pos >= 0
    forced = valid & ((pos < sink_tokens) | (pos >= seq_len - local_window))
    key = tl.where(forced, ordered_key(tl.full(score.shape, float("inf"), tl.float32)), ordered_key(score))
    return tl.where(forced | (valid & (score > float("-inf"))), key, 0)


@triton.jit
def _select_tokens_kernel(scores, positions, seq_lens, picked, C, sink_tokens, local_window,
                          stride_sb, stride_sh, stride_pb, stride_ph, stride_ob, stride_oh,
                          HKV: tl.constexpr, KT: tl.constexpr, CP: tl.constexpr, KTP: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs = tl.arange(0, CP)
    pos = tl.load(positions + b * stride_pb + h * stride_ph + offs, mask=offs < C, other=-1).to(tl.int64)
    score = tl.load(scores + b * stride_sb + h * stride_sh + offs, mask=offs < C, other=float("-inf"))
    key = token_keys(score, pos, tl.load(seq_lens + b), sink_tokens, local_window)
    keep, rank, num_kept = topk_compact(key, KT)
    out = picked + b * stride_ob + h * stride_oh
    tl.store(out + rank, pos, mask=keep)
    pad = tl.arange(0, KTP)
    tl.store(out + pad, tl.full([KTP], -1, tl.int64), mask=(pad >= num_kept) & (pad < KT))


def select_tokens(scores: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, token_budget: int,
                  sink_tokens: int, local_window: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-Kt candidate positions per KV group (see `reference.select_tokens`).

    scores, positions: [B, Hkv, C] (float32, int). Returns positions [B, Hkv, Kt] int64, -1 padded: the same
    set as the reference (ties to lower candidate index), listed in candidate order.
    """
    b, hkv, c = scores.shape
    assert positions.shape == scores.shape and scores.dtype == torch.float32
    assert scores.stride(2) == 1 and positions.stride(2) == 1 and seq_lens.shape == (b,)
    if c > MAX_FUSED_CANDIDATES:
        res = reference.select_tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(b, hkv, token_budget, dtype=torch.int64, device=scores.device)
    assert out.shape == (b, hkv, token_budget) and out.dtype == torch.int64 and out.stride(2) == 1
    cp = triton.next_power_of_2(c)
    _select_tokens_kernel[(b * hkv,)](
        scores, positions, seq_lens, out, c, sink_tokens, local_window, scores.stride(0), scores.stride(1),
        positions.stride(0), positions.stride(1), out.stride(0), out.stride(1),
        HKV=hkv, KT=token_budget, CP=cp, KTP=triton.next_power_of_2(token_budget), num_warps=8 if cp > 2048 else 4)
    return out
