"""Device helpers for top-k selection inside one program (no kernel here; imported by the selection kernels).

Top-k by threshold search rather than sorting: the k-th largest key is found bit by bit (one block-wide count per
bit), then the kept entries are compacted in index order with one prefix sum. A bitonic sort of 8,192
keys needs ~90 compare-and-swap rounds across threads. Measured on an H100 (8,192 keys, 16 warps, one program per
KV group): one compare per key per bit 22 us; 2 bits per step with three counts packed in an int64 24 us; three
thresholds per step as one [4, N] reduction 30 us; torch.topk + gather 106 us. The result is the same *set* as
`torch.topk` (ties broken towards lower indices), listed in index order.
Keys are int32 (float order, see `ordered_key`); INVALID (= INT32_MIN) is never kept.

Keys are compared at KEY_BITS + 1 bits: `key >> (31 - KEY_BITS)` keeps the sign, the exponent and the top
KEY_BITS - 8 mantissa bits of the float, so KEY_BITS = 16 compares scores at bfloat16 resolution (ties within a
relative 2^-7 go to the lower index) and halves the search: 17 counts instead of 32. H100, 96k x 8 GQA
(op_latency_h100.json): see its alt_select_*_31bit rows against the default stages. A radix variant (four
tl.histogram passes of 8-bit digits) was measured slower (select blocks 27.1 vs 11.1 us, select token slots 47.6 vs
22.0 us; shared-memory atomics contend on a few hot bins) and removed.
"""

import triton
import triton.language as tl

INVALID = tl.constexpr(-2147483648)
# selection keys: sign + exponent + 7 mantissa bits (bfloat16 resolution), see the module docstring
KEY_BITS = 16
# the prefix sum packs two counts in 16-bit fields of an int32, so one program selects from at most MAX_ENTRIES
MAX_ENTRIES = 16384


@triton.jit
def ordered_key(x):
    """fp32 -> int32 with the same order as the floats (+inf largest; -inf above INVALID)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def topk_threshold(key, K, BITS: tl.constexpr):
    """Largest T with #(key >= T) >= K (-2^BITS, the invalid key, when fewer than K valid keys).
    key: int32 [N] in [-2^BITS, 2^BITS)."""
    n_pos = tl.sum((key >= 0).to(tl.int32), axis=0)
    base = tl.where(n_pos >= K, 0, -(1 << BITS))  # sign step; then base + u never overflows for u < 2**BITS
    u = tl.zeros([], dtype=tl.int32)
    for i in tl.static_range(BITS):  # bits BITS-1 .. 0
        cnt = tl.sum((key >= base + u + (1 << (BITS - 1 - i))).to(tl.int32), axis=0)
        u = u + tl.where(cnt >= K, 1 << (BITS - 1 - i), 0)
    return base + u


@triton.jit
def topk_compact(key, K, KEY_BITS: tl.constexpr):
    """Keep the K largest valid keys compared at KEY_BITS + 1 bits (module docstring; ties to lower index).
    key: int32 [N] from `ordered_key`, INVALID where invalid. Returns (keep [N] bool, rank [N] int32 = output slot
    of each kept entry in index order, num_kept scalar)."""
    if KEY_BITS < 31:
        key = key >> (31 - KEY_BITS)  # arithmetic: order kept, INVALID -> -2^KEY_BITS
    thr = topk_threshold(key, K, KEY_BITS)
    gt = key > thr
    eq = (key == thr) & (key != -(1 << KEY_BITS))
    need = K - tl.sum(gt.to(tl.int32), axis=0)
    cum = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), axis=0)
    eq_pre = cum >> 16
    keep = gt | (eq & (eq_pre <= need))
    rank = (cum & 0xFFFF) + tl.minimum(eq_pre, need) - 1
    num_kept = K - need + tl.minimum(tl.sum(eq.to(tl.int32), axis=0), need)
    return keep, rank, num_kept
