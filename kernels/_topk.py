"""Device helpers for top-k selection inside one program (no kernel here; imported by the selection kernels).

Top-k by threshold search rather than sorting: the k-th largest key is found bit by bit (32 block-wide counts
of int32 keys), then the kept entries are compacted in index order with one prefix sum. A bitonic sort of 8,192
keys needs ~90 compare-and-swap rounds across threads. Measured on an H100 (8,192 keys, 16 warps, one program per
KV group): one compare per key per bit 22 us; 2 bits per step with three counts packed in an int64 24 us; three
thresholds per step as one [4, N] reduction 30 us; torch.topk + gather 106 us. The result is the same *set* as
`torch.topk` (ties broken towards lower indices), listed in index order.
Keys are int32 (float order, see `ordered_key`); INVALID (= INT32_MIN) is never kept.

`topk_threshold_radix` finds the same threshold 8 bits at a time (four tl.histogram passes instead of 31 counts)
but is slower on the H100 (op_latency_h100.json, 96k x 8 GQA: select_blocks 29.7 vs 10.8 us, select_token_slots
48.5 vs 22.0 us; the histogram's shared-memory atomics contend on the few hot bins), so the launchers default to
the bitwise search and keep radix=True for the benchmark's comparison.
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
    for i in tl.static_range(31):  # bits 30 .. 0
        cnt = tl.sum((key >= base + u + (1 << (30 - i))).to(tl.int32), axis=0)
        u = u + tl.where(cnt >= K, 1 << (30 - i), 0)
    return base + u


@triton.jit
def topk_threshold_radix(key, K):
    """The K-th largest key (INVALID when fewer than K valid keys), as `topk_threshold`. key: int32 [N]."""
    u = (key ^ INVALID).to(tl.uint32, bitcast=True)  # signed order -> unsigned order; INVALID -> 0
    bins = tl.arange(0, 512)
    prefix = tl.zeros([], dtype=tl.uint32)
    k_left = K
    for i in tl.static_range(4):  # digit i is bits [24 - 8i, 32 - 8i)
        digit = ((u >> (24 - 8 * i)) & 255).to(tl.int32)
        if i > 0:  # only keys that share the digits fixed so far compete
            digit = tl.where((u >> (32 - 8 * i)) == (prefix >> (32 - 8 * i)), digit, 256)
        hist = tl.histogram(digit, 512)
        hist = tl.where(bins < 256, hist, 0)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit >= bin
        d = tl.max(tl.where((at_least >= k_left) & (bins < 256), bins, -1), axis=0)
        k_left = k_left - tl.sum(tl.where(bins == d, at_least - hist, 0), axis=0)
        prefix = prefix | (tl.maximum(d, 0).to(tl.uint32) << (24 - 8 * i))
    thr = prefix.to(tl.int32, bitcast=True) ^ INVALID
    return tl.where(key.shape[0] >= K, thr, INVALID)


@triton.jit
def topk_compact(key, K, RADIX: tl.constexpr = False):
    """Keep the K largest valid keys (ties to lower index). Returns (keep [N] bool, rank [N] int32 = output slot
    of each kept entry in index order, num_kept scalar)."""
    if RADIX:
        thr = topk_threshold_radix(key, K)
    else:
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
