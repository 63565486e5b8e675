"""Device helpers for top-k selection inside one program (no kernel here; imported by the selection kernels).

Top-k by threshold search rather than sorting: the k-th largest key is found digit by digit (2 bits per step,
16 steps for 32-bit keys), then the kept entries are compacted in index order with one prefix sum. A bitonic
sort of 8,192 64-bit keys needs ~90 compare-and-swap rounds across threads; this needs 16 reductions and a scan.
The result is the same *set* as `torch.topk` (ties broken towards lower indices), listed in index order.
"""

import triton
import triton.language as tl

# Three counts share one int64 reduction: 21-bit fields hold counts up to 2**21 - 1 entries per program.
_FIELD: tl.constexpr = 21
_FIELD_MASK: tl.constexpr = (1 << 21) - 1


@triton.jit
def ordered_key(x):
    """fp32 -> int64 in [0, 2**32) with the same order as the floats (so +inf is the largest key)."""
    bits = x.to(tl.int32, bitcast=True)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # two's-complement order == float order
    return signed.to(tl.int64) + 2147483648


@triton.jit
def topk_threshold(key, K):
    """Largest T with #(key >= T) >= K among keys > 0 (0 when fewer than K keys are > 0). key: int64 [N]."""
    thr = tl.zeros([], dtype=tl.int64)
    for i in tl.static_range(16):
        shift: tl.constexpr = 30 - 2 * i
        c = ((key >= thr + (1 << shift)).to(tl.int64)
             + ((key >= thr + (2 << shift)).to(tl.int64) << _FIELD)
             + ((key >= thr + (3 << shift)).to(tl.int64) << (2 * _FIELD)))
        tot = tl.sum(c, axis=0)
        digit = ((tot & _FIELD_MASK) >= K).to(tl.int64) + (((tot >> _FIELD) & _FIELD_MASK) >= K).to(tl.int64) \
            + ((tot >> (2 * _FIELD)) >= K).to(tl.int64)
        thr = thr + (digit << shift)
    return thr


@triton.jit
def topk_compact(key, K):
    """Keep the K largest keys > 0 (ties to lower index). Returns (keep [N] bool, rank [N] int32 = output slot of
    each kept entry in index order, num_kept scalar)."""
    thr = topk_threshold(key, K)
    gt = key > thr
    eq = (key == thr) & (key > 0)
    need = K - tl.sum(gt.to(tl.int32), axis=0)
    cum = tl.cumsum(gt.to(tl.int64) + (eq.to(tl.int64) << _FIELD), axis=0)
    eq_pre = (cum >> _FIELD).to(tl.int32)
    keep = gt | (eq & (eq_pre <= need))
    rank = (cum & _FIELD_MASK).to(tl.int32) + tl.minimum(eq_pre, need) - 1
    num_kept = K - need + tl.minimum(tl.sum(eq.to(tl.int32), axis=0), need)
    return keep, rank, num_kept
