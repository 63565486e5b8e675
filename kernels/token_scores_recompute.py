"""Fine level for wide groups (MLA, G = 20): the group-mean softmax in two passes over the labels, without the
[B, Hkv, G, C] logits round trip.

Pass 1 (`token_logit_stats`) writes only each split's per-head (max, sum); pass 2 (this kernel) merges a group's
split statistics, recomputes its tile's logits from the labels (read again, from L2) and writes the combined
score. At MLA 96k x 8 the logits are 20 x 8,192 fp32 per request (5.2 MB) written by `token_logits` and read back
by `token_scores`' combine; the labels pass 2 re-reads are 8,192 x 68 B per request.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import use_pdl, wait_for_inputs
from .token_logits import (_check_label_inputs, group_label_queries, group_rows, tile_logits,
                           token_logit_stats)
from .token_scores import group_softmax_stats


@triton.jit
def _token_scores_recompute_kernel(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                   cand, stats, scores, sm_scale, C,
                                   stride_qb, stride_qh, stride_ls, stride_lh, stride_ss, stride_sh, stride_ch,
                                   stride_rr, stride_cb, stride_ch2, stride_tb, stride_th, stride_ob, stride_oh,
                                   HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HDC: tl.constexpr,
                                   FROM_BLOCKS: tl.constexpr, BS: tl.constexpr, NSPLIT: tl.constexpr,
                                   BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr,
                                   PDL: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_lo, q_hi = group_label_queries(q, channels, b, h, stride_qb, stride_qh, stride_ch, G, GP, HDC)
    req = tl.load(req_pool_indices + b).to(tl.int64)
    seq_len = tl.load(seq_lens + b) if FROM_BLOCKS else 0
    wait_for_inputs(PDL)  # stats come from the kernel before
    m, inv_s = group_softmax_stats(stats + b * stride_tb + h * stride_th, NSPLIT, GP, G)
    logit = tile_logits(q_lo, q_hi, labels, label_scale, req_to_token, cand + b * stride_cb + h * stride_ch2, req,
                        seq_len, h, offs_c, C, sm_scale, stride_ls, stride_lh, stride_ss, stride_sh, stride_rr,
                        HDC, FROM_BLOCKS, BS, USE_DOT)
    # rows >= G: q is zero there (logit 0 or -inf) and inv_s is 0, so they add nothing
    p = tl.sum(tl.exp(logit - m[:, None]) * inv_s[:, None], axis=0)
    valid = tl.max(logit, axis=0) > float("-inf")
    tl.store(scores + b * stride_ob + h * stride_oh + offs_c, tl.where(valid, p / G, float("-inf")),
             mask=offs_c < C)


def token_scores_recompute(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                           req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                           seq_lens: Optional[torch.Tensor], candidates: torch.Tensor, sm_scale: float, *,
                           block_size: int = 0, block_c: int = 128, num_warps: int = 4, num_splits: int = 0,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`candidate_scores` (the group-mean softmax, see `reference.token_scores`) in two passes: statistics, then
    the logits recomputed and combined. Candidates as `token_logits` (positions [B, Hkv, C] when block_size == 0,
    else block ids [B, Hkv, Kb]). Returns [B, Hkv, C] float32, -inf where invalid. num_splits: the first pass's
    (`token_logit_stats`); block_c, num_warps: the second's tile."""
    b, hq, _ = q.shape
    hkv, dc = channels.shape
    g = hq // hkv
    c = candidates.shape[2] * (block_size if block_size else 1)
    _check_label_inputs(q, labels, label_scale, channels, req_to_token, seq_lens, candidates, block_size)
    stats = token_logit_stats(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                              candidates, sm_scale, block_size=block_size, num_splits=num_splits)
    if out is None:
        out = torch.empty(b, hkv, c, dtype=torch.float32, device=q.device)
    assert out.shape == (b, hkv, c) and out.dtype == torch.float32 and out.stride(2) == 1
    pdl = use_pdl(q.device)
    _token_scores_recompute_kernel[(b * hkv, triton.cdiv(c, block_c))](
        q, labels, label_scale, channels, req_to_token, req_pool_indices,
        req_pool_indices if seq_lens is None else seq_lens, candidates, stats, out, sm_scale, c,
        q.stride(0), q.stride(1), labels.stride(0), labels.stride(1), label_scale.stride(0), label_scale.stride(1),
        channels.stride(0), req_to_token.stride(0), candidates.stride(0), candidates.stride(1), stats.stride(0),
        stats.stride(1), out.stride(0), out.stride(1),
        HKV=hkv, G=g, GP=group_rows(g), HDC=dc // 2, FROM_BLOCKS=bool(block_size), BS=max(block_size, 1),
        NSPLIT=stats.shape[2], BLOCK_C=block_c, USE_DOT=dc // 2 >= 16, PDL=pdl, num_warps=num_warps,
        launch_pdl=pdl)
    return out
