"""Coarse level: top-Kb blocks per KV group, forced blocks (sink, window, open last block) always kept."""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._topk import INVALID, KEY_BITS, MAX_ENTRIES, ordered_key, topk_compact


# a row whose non-forced scores span fewer than 2^NARROW_BITS - 1 key steps (at the compared resolution; 256 steps
# per power of two at 16 bits) is searched over NARROW_BITS bits instead of KEY_BITS: 9 counts instead of 17 plus
# one min/max, the same set (order kept, forced above every score, ties unchanged); a wider row takes the full search.
# On by default: on the H100 at 96k x 8 this stage took 7.6-7.9 us with it against 8.2-8.6 without, MLA and GQA
# (benchmarks/results/kernel_paths_ab_h100.json). 0 = always the full search.
NARROW_BITS = 8


@triton.jit
def _min_max(lo_a, hi_a, lo_b, hi_b):
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _full_search(s, forced, scored, KB: tl.constexpr, NBP: tl.constexpr, KEY_BITS: tl.constexpr):
    key = tl.where(forced, ordered_key(tl.full([NBP], float("inf"), tl.float32)), ordered_key(s))
    return topk_compact(tl.where(forced | scored, key, INVALID), KB, KEY_BITS)


@triton.jit
def _select_blocks_kernel(scores, seq_lens, block_ids, NB, sink_tokens, local_window,
                          stride_sb, stride_sh, stride_ob, stride_oh,
                          HKV: tl.constexpr, BS: tl.constexpr, KB: tl.constexpr, NBP: tl.constexpr,
                          KBP: tl.constexpr, KEY_BITS: tl.constexpr, NARROW: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    j = tl.arange(0, NBP)
    seq_len = tl.load(seq_lens + b)
    s = tl.load(scores + b * stride_sb + h * stride_sh + j, mask=j < NB, other=float("-inf"))
    start = j * BS
    forced = (j < NB) & (start < seq_len) & ((start < sink_tokens) | (start + BS > seq_len - local_window))
    scored = ~forced & (s > float("-inf"))
    if NARROW > 0:
        step = ordered_key(s) >> (31 - KEY_BITS)  # the key at the compared resolution
        lo, hi = tl.reduce((tl.where(scored, step, 2147483647), tl.where(scored, step, -2147483648)), 0, _min_max)
        if hi.to(tl.int64) - lo < (1 << NARROW) - 1:  # also when nothing is scored (hi < lo)
            small = tl.where(forced, (1 << NARROW) - 1, step - lo) << (31 - NARROW)
            keep, rank, num_kept = topk_compact(tl.where(forced | scored, small, INVALID), KB, NARROW)
        else:
            keep, rank, num_kept = _full_search(s, forced, scored, KB, NBP, KEY_BITS)
    else:
        keep, rank, num_kept = _full_search(s, forced, scored, KB, NBP, KEY_BITS)
    out = block_ids + b * stride_ob + h * stride_oh
    tl.store(out + rank, j, mask=keep)
    pad = tl.arange(0, KBP)
    tl.store(out + pad, tl.full([KBP], -1, tl.int32), mask=(pad >= num_kept) & (pad < KB))


def select_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, block_size: int, block_budget: int,
                  sink_tokens: int, local_window: int, out: Optional[torch.Tensor] = None,
                  key_bits: int = KEY_BITS, *, num_warps: int = 0) -> torch.Tensor:
    """Top-Kb blocks per KV group (see `reference.select_blocks`); scores compared at key_bits + 1 bits
    (kernels/_topk.py: 16 = bfloat16 resolution, 31 = exact); num_warps 0 = 4, or 8 above 2,048 blocks.

    scores: [B, Hkv, NB] float32 from `block_scores`; seq_lens: [B]. Returns block ids [B, Hkv, Kb] int32, -1
    padded. Same set as the reference (ties to lower block ids) but listed in ascending block id rather than
    priority order: every consumer treats M_t as a set, and id order reads the candidates sequentially.
    """
    b, hkv, nb = scores.shape
    assert scores.dtype == torch.float32 and scores.stride(2) == 1 and seq_lens.shape == (b,)
    if out is None:
        out = torch.empty(b, hkv, block_budget, dtype=torch.int32, device=scores.device)
    assert out.shape == (b, hkv, block_budget) and out.dtype == torch.int32 and out.stride(2) == 1
    nbp = triton.next_power_of_2(nb)
    assert nbp <= MAX_ENTRIES, "more blocks than one program selects from"
    _select_blocks_kernel[(b * hkv,)](
        scores, seq_lens, out, nb, sink_tokens, local_window, scores.stride(0), scores.stride(1),
        out.stride(0), out.stride(1), HKV=hkv, BS=block_size, KB=block_budget, NBP=nbp,
        KBP=triton.next_power_of_2(block_budget), KEY_BITS=key_bits, NARROW=min(NARROW_BITS, key_bits),
        num_warps=num_warps or (4 if nbp <= 2048 else 8))
    return out
