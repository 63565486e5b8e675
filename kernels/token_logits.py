"""Fine level, pass 1: label logits of candidate tokens and per-split softmax statistics.

Split over candidates so that a batch of a few KV groups (MLA has one per request) still fills the GPU; the
group-mean softmax needs every split's (max, sum) per head, which `token_scores` / `fine_select` combine.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl



@triton.jit
def _label_dot(q_half, lab, USE_DOT: tl.constexpr):
    # q_half [GP, HDC] x lab [BLOCK_C, HDC] -> [GP, BLOCK_C]; INT4 codes are exact in q's dtype, so the
    # tensor-core product is exact up to fp32 accumulation order
    if USE_DOT and q_half.dtype == tl.float32:  # fp32 (CPU tests): no tf32 rounding
        return tl.dot(q_half, tl.trans(lab.to(q_half.dtype)), input_precision="ieee")
    elif USE_DOT:
        return tl.dot(q_half, tl.trans(lab.to(q_half.dtype)))
    else:
        return tl.sum(q_half.to(tl.float32)[:, None, :] * lab.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def group_label_queries(q, channels, b, h, stride_qb, stride_qh, stride_ch, G: tl.constexpr, GP: tl.constexpr,
                        HDC: tl.constexpr):
    """The group's query heads at the label channels, split by nibble: (q_lo, q_hi) [GP, HDC], rows >= G zero."""
    offs_g = tl.arange(0, GP)
    offs_k = tl.arange(0, HDC)
    ch_lo = tl.load(channels + h * stride_ch + 2 * offs_k).to(tl.int64)
    ch_hi = tl.load(channels + h * stride_ch + 2 * offs_k + 1).to(tl.int64)
    q_row = q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh
    mask_g = (offs_g < G)[:, None]
    return (tl.load(q_row + ch_lo[None, :], mask=mask_g, other=0.0),
            tl.load(q_row + ch_hi[None, :], mask=mask_g, other=0.0))


@triton.jit
def tile_logits(q_lo, q_hi, labels, label_scale, req_to_token, cand_row, req, seq_len, h, offs_c, C, sm_scale,
                stride_ls, stride_lh, stride_ss, stride_sh, stride_rr, HDC: tl.constexpr,
                FROM_BLOCKS: tl.constexpr, BS: tl.constexpr, USE_DOT: tl.constexpr):
    """Logits [GP, BLOCK_C] of candidates offs_c of one KV group (cand_row: its candidate list), -inf where
    invalid."""
    offs_k = tl.arange(0, HDC)
    if FROM_BLOCKS:  # candidates = every position of the selected blocks (cand: [B, Hkv, Kb] block ids)
        blk = tl.load(cand_row + offs_c // BS, mask=offs_c < C, other=-1)
        pos = blk.to(tl.int64) * BS + offs_c % BS
        valid = (blk >= 0) & (pos < seq_len) & (offs_c < C)
    else:  # cand: [B, Hkv, C] positions, -1 = invalid
        pos = tl.load(cand_row + offs_c, mask=offs_c < C, other=-1).to(tl.int64)
        valid = pos >= 0
    slot = tl.load(req_to_token + req * stride_rr + pos, mask=valid, other=0).to(tl.int64)
    packed = tl.load(labels + slot[:, None] * stride_ls + h * stride_lh + offs_k[None, :],
                     mask=valid[:, None], other=0x88).to(tl.int32)
    scale = tl.load(label_scale + slot * stride_ss + h * stride_sh, mask=valid, other=0.0)
    acc = _label_dot(q_lo, (packed & 15) - 8, USE_DOT) + _label_dot(q_hi, (packed >> 4) - 8, USE_DOT)
    logit = acc * (scale * sm_scale)[None, :]
    return tl.where(valid[None, :], logit, float("-inf"))


@triton.jit
def _token_logits_kernel(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, cand,
                         logits, stats, sm_scale, C,
                         stride_qb, stride_qh, stride_ls, stride_lh, stride_ss, stride_sh, stride_ch, stride_rr,
                         stride_cb, stride_ch2, stride_ob, stride_oh, stride_og, stride_tb, stride_th, stride_ts,
                         HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HDC: tl.constexpr,
                         FROM_BLOCKS: tl.constexpr, BS: tl.constexpr, SPLIT_C: tl.constexpr,
                         BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, GP)
    q_lo, q_hi = group_label_queries(q, channels, b, h, stride_qb, stride_qh, stride_ch, G, GP, HDC)
    req = tl.load(req_pool_indices + b).to(tl.int64)
    seq_len = tl.load(seq_lens + b) if FROM_BLOCKS else 0
    m_run = tl.full([GP], float("-inf"), tl.float32)
    s_run = tl.zeros([GP], dtype=tl.float32)
    for c0 in tl.range(split * SPLIT_C, split * SPLIT_C + SPLIT_C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        logit = tile_logits(q_lo, q_hi, labels, label_scale, req_to_token, cand + b * stride_cb + h * stride_ch2,
                            req, seq_len, h, offs_c, C, sm_scale, stride_ls, stride_lh, stride_ss, stride_sh,
                            stride_rr, HDC, FROM_BLOCKS, BS, USE_DOT)
        tl.store(logits + b * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_c[None, :],
                 logit, mask=(offs_g < G)[:, None] & (offs_c < C)[None, :])
        m_new = tl.maximum(m_run, tl.max(logit, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), axis=1)
        m_run = m_new
    st = stats + b * stride_tb + h * stride_th + split * stride_ts + offs_g * 2
    tl.store(st, m_run, mask=offs_g < G)
    tl.store(st + 1, s_run, mask=offs_g < G)


def num_candidate_splits(num_groups: int, num_candidates: int, block_c: int = 128) -> int:
    """Splits per KV group (a power of two, at most 64) so that ~2,048 programs of one or a few BLOCK_C tiles
    run. Each tile is a chain of dependent gathers (block id -> req_to_token -> label): many short programs hide
    that latency where a few long loops would serialise it."""
    want = min(64, max(1, num_candidates // block_c), max(1, 2048 // max(num_groups, 1)))
    return 1 << (int(want).bit_length() - 1)


def group_rows(g: int) -> int:
    """Query rows of a group's label tile: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(g))


def _check_label_inputs(q, labels, label_scale, channels, req_to_token, seq_lens, candidates, block_size):
    b, hq, _ = q.shape
    hkv, dc = channels.shape
    assert labels.shape[1:] == (hkv, dc // 2) and labels.dtype == torch.uint8 and labels.stride(2) == 1
    assert label_scale.dtype == torch.float32 and candidates.shape[:2] == (b, hkv) and candidates.stride(2) == 1
    assert q.stride(2) == 1 and channels.stride(1) == 1 and req_to_token.stride(1) == 1
    assert seq_lens is not None or not block_size


def _launch(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates, sm_scale,
            block_size, num_splits, logits, stats, num_stages):
    b, hq, _ = q.shape
    hkv, dc = channels.shape
    g = hq // hkv
    c = candidates.shape[2] * (block_size if block_size else 1)
    _check_label_inputs(q, labels, label_scale, channels, req_to_token, seq_lens, candidates, block_size)
    block_c = 128
    splits = num_splits or num_candidate_splits(b * hkv, c, block_c)
    split_c = triton.cdiv(triton.cdiv(c, splits), block_c) * block_c
    if stats is None:
        stats = torch.empty(b, hkv, splits, g, 2, dtype=torch.float32, device=q.device)
    assert stats.shape == (b, hkv, splits, g, 2) and stats.is_contiguous() and splits & (splits - 1) == 0
    assert logits.shape == (b, hkv, g, c) and logits.stride(3) == 1
    lg = logits
    _token_logits_kernel[(b * hkv, splits)](
        q, labels, label_scale, channels, req_to_token, req_pool_indices,
        req_pool_indices if seq_lens is None else seq_lens, candidates, lg, stats, sm_scale, c,
        q.stride(0), q.stride(1), labels.stride(0), labels.stride(1), label_scale.stride(0), label_scale.stride(1),
        channels.stride(0), req_to_token.stride(0), candidates.stride(0), candidates.stride(1),
        lg.stride(0), lg.stride(1), lg.stride(2), stats.stride(0), stats.stride(1), stats.stride(2),
        HKV=hkv, G=g, GP=group_rows(g), HDC=dc // 2, FROM_BLOCKS=bool(block_size), BS=max(block_size, 1),
        SPLIT_C=split_c, BLOCK_C=block_c, USE_DOT=dc // 2 >= 16, num_warps=4, num_stages=num_stages)
    return stats


def token_logits(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: Optional[torch.Tensor],
                 candidates: torch.Tensor, sm_scale: float, *, block_size: int = 0, num_splits: int = 0,
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 num_stages: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Label logits q_h[ch] . label_t * sm_scale of candidate tokens, and per-split softmax statistics.

    q: [B, Hq, D]; labels: [S, Hkv, Dc // 2] uint8; label_scale: [S, Hkv] float32; channels: [Hkv, Dc];
    candidates: positions [B, Hkv, C] (-1 = invalid) when block_size == 0, else block ids [B, Hkv, Kb] whose
    Kb * block_size positions are the candidates (positions >= seq_lens[b] invalid; seq_lens unused otherwise).
    Returns logits [B, Hkv, G, C] float32 (-inf where invalid) and stats [B, Hkv, splits, G, 2] float32
    (max and sum of exp(logit - max) of each split and head).
    """
    b, hq, _ = q.shape
    hkv = channels.shape[0]
    c = candidates.shape[2] * (block_size if block_size else 1)
    if out is None:
        out = (torch.empty(b, hkv, hq // hkv, c, dtype=torch.float32, device=q.device), None)
    stats = _launch(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates,
                    sm_scale, block_size, num_splits, out[0], out[1], num_stages)
    return out[0], stats

