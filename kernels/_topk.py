"""Device helpers for top-k selection inside one program (no kernel here; imported by the selection kernels).

Top-k by threshold search rather than sorting: the k-th largest key is found two bits at a time (17 block-wide
counts of int32 keys), then the kept entries are compacted in index order with one prefix sum. A bitonic sort of
8,192 keys needs ~90 compare-and-swap rounds across threads. Each block-wide reduction costs ~0.6 us of barrier
latency on an H100 whatever its width, so a step counts three thresholds at once in one [4, N] reduction (one
bit per step: 22 us at 8,192 keys; three counts packed in an int64: 24 us). The result is the same *set* as
`torch.topk` (ties broken towards lower indices), listed in index order.
Keys are int32 (float order, see `ordered_key`); INVALID (= INT32_MIN) is never kept.
"""

import triton
import triton.language as tl

INVALID = tl.constexpr(-2147483648)
# the prefix sum packs two counts in 16-bit fields of an int32, so one program selects from at most MAX_ENTRIES
MAX_ENTRIES = 16384


@triton.jit
def ordered_key(x):
    """fp32 -> int32 with the same order as the floats (+inf largest; -inf above INVALID)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def topk_threshold(key, K):
    """Largest T with #(key >= T) >= K (INVALID when fewer than K valid keys). key: int32 [N]."""
    n_pos = tl.sum((key >= 0).to(tl.int32), axis=0)
    base = tl.where(n_pos >= K, 0, INVALID)  # sign step; then base + u never overflows for u < 2**31
    u = tl.zeros([], dtype=tl.int32)
    digits = tl.arange(0, 4)
    for i in tl.static_range(15):  # bits (30, 29), (28, 27), ..., (2, 1): three thresholds per reduction
        thr = base + u + (digits << (29 - 2 * i))  # digit 0 passes unless fewer than K keys exist at all
        cnt = tl.sum((key[None, :] >= thr[:, None]).to(tl.int32), axis=1)
        u = u + (tl.maximum(tl.sum((cnt >= K).to(tl.int32), axis=0) - 1, 0) << (29 - 2 * i))
    last = tl.sum((key >= base + u + 1).to(tl.int32), axis=0)  # bit 0
    return base + u + (last >= K).to(tl.int32)


@triton.jit
def topk_compact(key, K):
    """Keep the K largest valid keys (ties to lower index). Returns (keep [N] bool, rank [N] int32 = output slot
    of each kept entry in index order, num_kept scalar)."""
    thr = topk_threshold(key, K)
    gt = key > thr
    eq = (key == thr) & (key != INVALID)
    need = K - tl.sum(gt.to(tl.int32), axis=0)
    cum = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), axis=0)
    eq_pre = cum >> 16
    keep = gt | (eq & (eq_pre <= need))
    rank = (cum & 0xFFFF) + tl.minimum(eq_pre, need) - 1
    num_kept = K - need + tl.minimum(tl.sum(eq.to(tl.int32), axis=0), need)
    return keep, rank, num_kept
