"""Fine level, fused: group-mean softmax over the label logits, top-Kt with forced sink/window, and the
position -> KV slot mapping, in one program per KV group (no score tensor, no position tensor in memory)."""

from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_asynctls import reference

from ._topk import topk_compact
from .select_tokens import MAX_FUSED_CANDIDATES, select_tokens, token_keys
from .token_logits import token_logits
from .token_scores import token_scores


@triton.jit
def _fine_select_kernel(logits, stats, cand, req_to_token, req_pool_indices, seq_lens, slots, C,
                        sink_tokens, local_window, stride_lb, stride_lh, stride_lg, stride_tb, stride_th,
                        stride_cb, stride_ch, stride_rr, stride_ob, stride_oh,
                        HKV: tl.constexpr, G: tl.constexpr, NSPLIT: tl.constexpr, FROM_BLOCKS: tl.constexpr,
                        BS: tl.constexpr, KT: tl.constexpr, CP: tl.constexpr, KTP: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs = tl.arange(0, CP)
    seq_len = tl.load(seq_lens + b)
    if FROM_BLOCKS:
        blk = tl.load(cand + b * stride_cb + h * stride_ch + offs // BS, mask=offs < C, other=-1)
        pos = blk.to(tl.int64) * BS + offs % BS
        pos = tl.where((blk >= 0) & (pos < seq_len) & (offs < C), pos, -1)
    else:
        pos = tl.load(cand + b * stride_cb + h * stride_ch + offs, mask=offs < C, other=-1).to(tl.int64)
    offs_s = tl.arange(0, NSPLIT)
    score = tl.zeros([CP], dtype=tl.float32)
    for g in tl.range(G):
        st = stats + b * stride_tb + h * stride_th + offs_s * (2 * G) + g * 2
        m = tl.load(st)
        m_all = tl.max(m, axis=0)
        m_all = tl.where(m_all > float("-inf"), m_all, 0.0)
        total = tl.sum(tl.load(st + 1) * tl.exp(m - m_all), axis=0)
        inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        lg = tl.load(logits + b * stride_lb + h * stride_lh + g * stride_lg + offs, mask=offs < C,
                     other=float("-inf"))
        score += tl.exp(lg - m_all) * inv
    key = token_keys(score / G, pos, seq_len, sink_tokens, local_window)
    keep, rank, num_kept = topk_compact(key, KT)
    req = tl.load(req_pool_indices + b).to(tl.int64)
    slot = tl.load(req_to_token + req * stride_rr + pos, mask=keep, other=-1)
    out = slots + b * stride_ob + h * stride_oh
    tl.store(out + rank, slot.to(tl.int32), mask=keep)
    pad = tl.arange(0, KTP)
    tl.store(out + pad, tl.full([KTP], -1, tl.int32), mask=(pad >= num_kept) & (pad < KT))


def fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates,
                           *, block_size, token_budget, sink_tokens, local_window, sm_scale,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`fine_select` over candidates given as positions [B, Hkv, C] (block_size == 0) or as block ids
    [B, Hkv, Kb] (block_size > 0: all Kb * block_size positions of those blocks, as `candidate_positions`).
    Returns KV slots [B, Hkv, Kt] int32, -1 padded. Two kernels: `token_logits` and the fused select."""
    b, hkv, n = candidates.shape
    c = n * (block_size or 1)
    if out is None:
        out = torch.empty(b, hkv, token_budget, dtype=torch.int32, device=q.device)
    assert out.shape == (b, hkv, token_budget) and out.dtype == torch.int32 and out.stride(2) == 1
    assert req_to_token.stride(1) == 1 and candidates.stride(2) == 1
    logits, stats = token_logits(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                 candidates, sm_scale, block_size=block_size)
    cp = triton.next_power_of_2(c)
    _fine_select_kernel[(b * hkv,)](
        logits, stats, candidates, req_to_token, req_pool_indices, seq_lens, out, c, sink_tokens, local_window,
        logits.stride(0), logits.stride(1), logits.stride(2), stats.stride(0), stats.stride(1),
        candidates.stride(0), candidates.stride(1), req_to_token.stride(0), out.stride(0), out.stride(1),
        HKV=hkv, G=logits.shape[2], NSPLIT=stats.shape[2], FROM_BLOCKS=bool(block_size), BS=max(block_size, 1),
        KT=token_budget, CP=cp, KTP=triton.next_power_of_2(token_budget), num_warps=8 if cp > 2048 else 4)
    return out


def fine_select(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                positions: torch.Tensor, *, token_budget: int, sink_tokens: int, local_window: int,
                sm_scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fine stage over candidate positions [B, Hkv, C] (see `reference.fine_select`): [B, Hkv, Kt] int32 slots.

    Up to MAX_FUSED_CANDIDATES candidates the selection is one fused kernel; beyond (token-only over a whole
    context) scores are materialised and torch.topk selects.
    """
    if positions.shape[2] <= MAX_FUSED_CANDIDATES:
        return fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                      positions, block_size=0, token_budget=token_budget,
                                      sink_tokens=sink_tokens, local_window=local_window, sm_scale=sm_scale,
                                      out=out)
    scores = token_scores(q, labels, label_scale, channels, req_to_token, req_pool_indices, positions, sm_scale)
    picked = select_tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
    slots = reference.positions_to_slots(picked, req_to_token, req_pool_indices)
    return slots if out is None else out.copy_(slots)
