"""Fine level: top-Kt candidate tokens per KV group, sink and window positions forced."""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._topk import INVALID, KEY_BITS, MAX_ENTRIES, ordered_key, topk_compact
from .token_scores import group_mean_softmax

# Candidates one program selects from in registers (8,192 = Kb 128 blocks of 64 is 32 KiB of fp32 scores); callers
# with longer lists (token-only over a whole context) select with torch.topk (sglang_asynctls/decode_step.py).
MAX_FUSED_CANDIDATES = MAX_ENTRIES


@triton.jit
def _select_tokens_kernel(scores, cand, req_to_token, req_pool_indices, seq_lens, out, C, sink_tokens,
                          local_window, stride_sb, stride_sh, stride_cb, stride_ch, stride_rr, stride_ob, stride_oh,
                          stats, stride_sg, stride_tb, stride_th, ahead, stride_ab, stride_ah,
                          HKV: tl.constexpr, FROM_BLOCKS: tl.constexpr, BS: tl.constexpr, TO_SLOTS: tl.constexpr,
                          KT: tl.constexpr, CP: tl.constexpr, KTP: tl.constexpr, KEY_BITS: tl.constexpr,
                          G: tl.constexpr, GP: tl.constexpr, NSPLIT: tl.constexpr, AHEAD: tl.constexpr,
                          AHEADP: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs = tl.arange(0, CP)
    seq_len = tl.load(seq_lens + b).to(tl.int32)
    if FROM_BLOCKS:  # cand: [B, Hkv, Kb] block ids; candidate c is position blk[c // BS] * BS + c % BS
        blk = tl.load(cand + b * stride_cb + h * stride_ch + offs // BS, mask=offs < C, other=-1)
        pos = blk * BS + offs % BS
        pos = tl.where((blk >= 0) & (pos < seq_len) & (offs < C), pos, -1)
    else:  # cand: [B, Hkv, C] positions, -1 = invalid
        pos = tl.load(cand + b * stride_cb + h * stride_ch + offs, mask=offs < C, other=-1).to(tl.int32)
    if G == 0:  # scores: [B, Hkv, C] group-mean softmax (token_scores)
        score = tl.load(scores + b * stride_sb + h * stride_sh + offs, mask=offs < C, other=float("-inf"))
    else:  # scores: logits [B, Hkv, G, C] + split stats: token_scores' combine, here instead of its own launch
        score = group_mean_softmax(scores + b * stride_sb + h * stride_sh, stride_sg, offs, offs < C,
                                   stats + b * stride_tb + h * stride_th, NSPLIT, GP, G)
    valid = pos >= 0
    if TO_SLOTS:
        req = tl.load(req_pool_indices + b).to(tl.int64)
    forced = valid & ((pos < sink_tokens) | (pos >= seq_len - local_window))
    key = tl.where(forced, ordered_key(tl.full([CP], float("inf"), tl.float32)), ordered_key(score))
    key = tl.where(forced | (valid & (score > float("-inf"))), key, INVALID)
    keep, rank, num_kept = topk_compact(key, KT, KEY_BITS)
    dst = out + b * stride_ob + h * stride_oh
    if TO_SLOTS:
        slot = tl.load(req_to_token + req * stride_rr + pos, mask=keep, other=-1)  # the kept candidates' only
        tl.store(dst + rank, slot.to(dst.dtype.element_ty), mask=keep)
    else:
        tl.store(dst + rank, pos.to(dst.dtype.element_ty), mask=keep)
    pad = tl.arange(0, KTP)
    tl.store(dst + pad, tl.full([KTP], -1, dst.dtype.element_ty), mask=(pad >= num_kept) & (pad < KT))
    if AHEAD > 0:  # ranks KT+1 .. KT+AHEAD: the top-(KT + AHEAD) set holds the top-KT one (same keys, ties to index)
        wide, _, _ = topk_compact(key, KT + AHEAD, KEY_BITS)
        near = wide & ~keep
        rank_a = tl.cumsum(near.to(tl.int32), axis=0) - 1
        dst_a = ahead + b * stride_ab + h * stride_ah
        if TO_SLOTS:
            slot_a = tl.load(req_to_token + req * stride_rr + pos, mask=near, other=-1)
            tl.store(dst_a + rank_a, slot_a.to(dst_a.dtype.element_ty), mask=near)
        else:
            tl.store(dst_a + rank_a, pos.to(dst_a.dtype.element_ty), mask=near)
        pad_a = tl.arange(0, AHEADP)
        num_a = tl.sum(near.to(tl.int32), axis=0)
        tl.store(dst_a + pad_a, tl.full([AHEADP], -1, dst_a.dtype.element_ty), mask=(pad_a >= num_a) & (pad_a < AHEAD))


def _launch(scores, cand, req_to_token, req_pool_indices, seq_lens, out, block_size, token_budget, sink_tokens,
            local_window, to_slots, num_warps=0, key_bits=KEY_BITS, stats=None, ahead=None):
    """scores: [B, Hkv, C] group-mean softmax, or (stats given) logits [B, Hkv, G, C] from `token_logits`.
    ahead: [B, Hkv, P] in out's dtype, or None."""
    b, hkv, c = scores.shape[0], scores.shape[1], scores.shape[-1]
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1 and cand.stride(2) == 1
    assert c <= MAX_FUSED_CANDIDATES and seq_lens.shape == (b,)
    assert out.shape == (b, hkv, token_budget) and out.stride(2) == 1
    if ahead is not None:
        assert ahead.shape[:2] == (b, hkv) and ahead.dtype == out.dtype and ahead.stride(2) == 1
        assert token_budget + ahead.shape[2] <= MAX_FUSED_CANDIDATES
    n_ahead = ahead.shape[2] if ahead is not None else 0
    ahead = ahead if n_ahead else out
    if stats is None:
        g = stride_sg = 0
        stats = scores
    else:
        g, stride_sg = scores.shape[2], scores.stride(2)
        assert scores.dim() == 4 and stats.shape[:2] == (b, hkv) and stats.shape[3:] == (g, 2)
        assert stats.is_contiguous()
    cp = triton.next_power_of_2(c)
    # H100, 8,192 candidates, 96k x 8: scores given, 32 warps 16.0 / 16.5 us (MLA / GQA) vs 16 warps 16.8 / 17.3;
    # with the combine folded (G heads' logits), 16 warps 64.3 / 20.3 vs 32 warps 71.7 / 20.5
    num_warps = num_warps or ((16 if g else 32) if cp >= 8192 else 8 if cp > 2048 else 4)
    _select_tokens_kernel[(b * hkv,)](
        scores, cand, req_to_token, req_pool_indices, seq_lens, out, c, sink_tokens, local_window,
        scores.stride(0), scores.stride(1), cand.stride(0), cand.stride(1), req_to_token.stride(0),
        out.stride(0), out.stride(1), stats, stride_sg, stats.stride(0), stats.stride(1), ahead, ahead.stride(0),
        ahead.stride(1), HKV=hkv, FROM_BLOCKS=bool(block_size), BS=max(block_size, 1),
        TO_SLOTS=to_slots, KT=token_budget, CP=cp, KTP=triton.next_power_of_2(token_budget), KEY_BITS=key_bits,
        G=g, GP=triton.next_power_of_2(max(g, 1)), NSPLIT=stats.shape[2] if g else 1, AHEAD=n_ahead,
        AHEADP=triton.next_power_of_2(max(n_ahead, 1)), num_warps=num_warps)
    return out


def select_tokens(scores: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, token_budget: int,
                  sink_tokens: int, local_window: int, out: Optional[torch.Tensor] = None,
                  key_bits: int = KEY_BITS, ahead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-Kt candidate positions per KV group (see `reference.select_tokens`).

    scores, positions: [B, Hkv, C] (float32, int). Returns positions [B, Hkv, Kt] int64, -1 padded: the same
    set as the reference (ties to lower candidate index), listed in candidate order.
    ahead: [B, Hkv, P] int64 or None; filled with the next P candidates below the cut-off (`reference.select_ahead`),
    in candidate order, -1 padded.
    """
    b, hkv, c = scores.shape
    assert positions.shape == scores.shape and c <= MAX_FUSED_CANDIDATES, "more candidates than one program holds"
    if out is None:
        out = torch.empty(b, hkv, token_budget, dtype=torch.int64, device=scores.device)
    assert out.dtype == torch.int64
    return _launch(scores, positions, positions, seq_lens, seq_lens, out, 0, token_budget, sink_tokens,
                   local_window, False, key_bits=key_bits, ahead=ahead)


def select_token_slots(scores: torch.Tensor, candidates: torch.Tensor, req_to_token: torch.Tensor,
                       req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, *, block_size: int,
                       token_budget: int, sink_tokens: int, local_window: int, out: Optional[torch.Tensor] = None,
                       num_warps: int = 0, key_bits: int = KEY_BITS,
                       stats: Optional[torch.Tensor] = None, ahead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`select_tokens` then `positions_to_slots`, in one kernel, over candidates given as positions [B, Hkv, C]
    (block_size == 0) or block ids [B, Hkv, Kb] (C = Kb * block_size). Returns [B, Hkv, Kt] int32 KV slots.
    Scores are compared at key_bits + 1 bits (kernels/_topk.py). With `stats`, `scores` are `token_logits`'
    (logits, stats) pair's logits and the group-mean softmax (`token_scores`) is computed here: one launch less.
    ahead: [B, Hkv, P] int32 or None; filled with the slots of the next P candidates below the cut-off
    (`reference.select_ahead`, then `positions_to_slots`), in candidate order, -1 padded: a second top-k search in
    the same program, so the host-row prefetch costs no launch."""
    b, hkv = scores.shape[:2]
    assert req_to_token.stride(1) == 1
    if out is None:
        out = torch.empty(b, hkv, token_budget, dtype=torch.int32, device=scores.device)
    assert out.dtype == torch.int32
    return _launch(scores, candidates, req_to_token, req_pool_indices, seq_lens, out, block_size, token_budget,
                   sink_tokens, local_window, True, num_warps, key_bits, stats, ahead)
