"""Fine level: group-mean softmax of label scores over the candidate tokens."""

from typing import Optional

import torch
import triton
import triton.language as tl

from .token_logits import token_logits


@triton.jit
def group_softmax_stats(stats, NSPLIT: tl.constexpr, GP: tl.constexpr, G: tl.constexpr):
    """Combine per-split (max, sum) [NSPLIT, G, 2] into per-head (max, 1 / sum); 1 / sum = 0 for empty heads."""
    offs_s = tl.arange(0, NSPLIT)
    offs_g = tl.arange(0, GP)
    ptr = stats + offs_s[:, None] * (2 * G) + offs_g[None, :] * 2
    mask = (offs_g < G)[None, :]
    m = tl.load(ptr, mask=mask, other=float("-inf"))
    s = tl.load(ptr + 1, mask=mask, other=0.0)
    m_all = tl.max(m, axis=0)
    m_safe = tl.where(m_all > float("-inf"), m_all, 0.0)
    total = tl.sum(s * tl.exp(m - m_safe[None, :]), axis=0)
    return m_safe, tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)


@triton.jit
def _pick(x, offs_g, g):
    return tl.sum(tl.where(offs_g == g, x, 0.0), axis=0)


@triton.jit
def group_mean_softmax(logits_row, stride_g, offs, mask, stats, NSPLIT: tl.constexpr, GP: tl.constexpr,
                       G: tl.constexpr):
    """Mean over a KV group's G heads of each head's softmax, at candidates `offs` of the group's logits
    (logits_row + g * stride_g + offs; stats: its [NSPLIT, G, 2] split statistics); -inf where the candidate is
    invalid (its logit is -inf in every head). One head at a time: a [G, N] tile of N = 8,192 candidates would not
    fit in one program's registers (`select_token_slots` computes this for all of a group's candidates)."""
    m, inv_s = group_softmax_stats(stats, NSPLIT, GP, G)
    offs_g = tl.arange(0, GP)
    lg = tl.load(logits_row + offs, mask=mask, other=float("-inf"))
    valid = lg > float("-inf")
    score = tl.exp(lg - _pick(m, offs_g, 0)) * _pick(inv_s, offs_g, 0)
    for g in tl.static_range(1, G):
        lg = tl.load(logits_row + g * stride_g + offs, mask=mask, other=float("-inf"))
        score += tl.exp(lg - _pick(m, offs_g, g)) * _pick(inv_s, offs_g, g)
    return tl.where(valid, score / G, float("-inf"))


@triton.jit
def _token_scores_kernel(logits, stats, scores, C, stride_lb, stride_lh, stride_lg, stride_tb, stride_th,
                         stride_ob, stride_oh, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                         NSPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = group_mean_softmax(logits + b * stride_lb + h * stride_lh, stride_lg, offs_c, offs_c < C,
                           stats + b * stride_tb + h * stride_th, NSPLIT, GP, G)
    tl.store(scores + b * stride_ob + h * stride_oh + offs_c, p, mask=offs_c < C)


def candidate_scores(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: Optional[torch.Tensor],
                     candidates: torch.Tensor, sm_scale: float, *, block_size: int = 0,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`token_scores` over candidates given as positions [B, Hkv, C] (block_size == 0; seq_lens unused) or block
    ids [B, Hkv, Kb] (C = Kb * block_size, positions >= seq_lens[b] invalid). Two kernels: `token_logits`
    (split over candidates) and this combine (split likewise)."""
    b, hkv, n = candidates.shape
    c = n * (block_size or 1)
    g = q.shape[1] // hkv
    logits, stats = token_logits(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                 candidates, sm_scale, block_size=block_size)
    if out is None:
        out = torch.empty(b, hkv, c, dtype=torch.float32, device=q.device)
    assert out.shape == (b, hkv, c) and out.dtype == torch.float32 and out.stride(2) == 1
    block_c = 512 if g <= 8 else 128
    _token_scores_kernel[(b * hkv, triton.cdiv(c, block_c))](
        logits, stats, out, c, logits.stride(0), logits.stride(1), logits.stride(2), stats.stride(0),
        stats.stride(1), out.stride(0), out.stride(1), HKV=hkv, G=g, GP=triton.next_power_of_2(g),
        NSPLIT=stats.shape[2], BLOCK_C=block_c, num_warps=4)
    return out


def token_scores(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, positions: torch.Tensor,
                 sm_scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group-mean softmax of label scores (see `reference.token_scores`).

    q: [B, Hq, D]; labels: [S, Hkv, Dc // 2] uint8; label_scale: [S, Hkv] float32; channels: [Hkv, Dc];
    positions: [B, Hkv, C] (-1 = invalid). Returns [B, Hkv, C] float32 in [0, 1], -inf where invalid.
    """
    return candidate_scores(q, labels, label_scale, channels, req_to_token, req_pool_indices, None, positions,
                            sm_scale, out=out)
