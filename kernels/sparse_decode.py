"""Attention: split-K flash decode over the selected KV slots, one program per (KV group, head tile, split).

Each program loads a K/V tile once for all heads of its group (GQA sharing; MLA/MQA is Hkv = 1 with up to 128
heads, tiled by BLOCK_H). Keys wider than a power of two (MLA: 576 = 512 + 64) are split into two dots; when
v_buffer is a view of k_buffer's first Dv channels (MLA latent), V is the key tile already loaded. Optionally
(dv_chunks) the output columns are split over programs too, which recompute the scores but add no partials.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .splitk_combine import splitk_combine


@triton.jit
def _dot(a, b):
    # fp32 operands (CPU tests) must not be rounded to tf32; bf16/fp16 take the tensor-core default
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sparse_decode_kernel(q, k_buffer, v_buffer, token_slots, mid_o, mid_lse, sm_scale, K,
                          stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_th,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                          cache_k, cache_v, cache_ref,
                          HKV: tl.constexpr, G: tl.constexpr, NHB: tl.constexpr, BLOCK_H: tl.constexpr,
                          D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, V_IS_K: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, NDV: tl.constexpr,
                          CACHED: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    vc = pid % NDV  # this program's DV-wide column chunk of the output (of NDV); the scores are recomputed per chunk
    pid = pid // NDV
    b = pid // (HKV * NHB)
    h = (pid // NHB) % HKV
    heads = (pid % NHB) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = heads < G
    qh = q + b * stride_qb + (h * G + heads)[:, None] * stride_qh
    offs_d1 = tl.arange(0, D1)
    q1 = tl.load(qh + offs_d1[None, :], mask=mask_h[:, None], other=0.0)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        q2 = tl.load(qh + offs_d2[None, :], mask=mask_h[:, None], other=0.0)
    offs_dv = vc * DV + tl.arange(0, DV)
    scale = sm_scale * 1.4426950408889634  # exp -> exp2
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV], dtype=tl.float32)
    for n0 in tl.range(split * SPLIT_K, split * SPLIT_K + SPLIT_K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(token_slots + b * stride_tb + h * stride_th + offs_n, mask=offs_n < K, other=-1)
        valid = slot >= 0
        row = slot.to(tl.int64) * stride_ks + h * stride_kh
        if CACHED:  # host_cache_lookup's verdict: c >= 0 read cache row c, -(c + 2) read the slot and fill row c
            cref = tl.load(cache_ref + b * stride_tb + h * stride_th + offs_n, mask=offs_n < K, other=-1)
            hit = valid & (cref >= 0)
            fill = valid & (cref <= -2)
            crow = tl.where(hit, cref, -cref - 2).to(tl.int64)
            from_kv = valid & ~hit
            k1 = (tl.load(k_buffer + row[:, None] + offs_d1[None, :], mask=from_kv[:, None], other=0.0)
                  + tl.load(cache_k + crow[:, None] * (D1 + D2) + offs_d1[None, :], mask=hit[:, None], other=0.0))
            tl.store(cache_k + crow[:, None] * (D1 + D2) + offs_d1[None, :], k1, mask=fill[:, None])
        else:
            k1 = tl.load(k_buffer + row[:, None] + offs_d1[None, :], mask=valid[:, None], other=0.0)
        qk = _dot(q1, tl.trans(k1))
        if D2 > 0:
            if CACHED:
                k2 = (tl.load(k_buffer + row[:, None] + offs_d2[None, :], mask=from_kv[:, None], other=0.0)
                      + tl.load(cache_k + crow[:, None] * (D1 + D2) + offs_d2[None, :], mask=hit[:, None],
                                other=0.0))
                tl.store(cache_k + crow[:, None] * (D1 + D2) + offs_d2[None, :], k2, mask=fill[:, None])
            else:
                k2 = tl.load(k_buffer + row[:, None] + offs_d2[None, :], mask=valid[:, None], other=0.0)
            qk += _dot(q2, tl.trans(k2))
        qk = tl.where(valid[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        if V_IS_K:
            v = k1
        else:
            vrow = slot.to(tl.int64) * stride_vs + h * stride_vh
            if CACHED:
                v = (tl.load(v_buffer + vrow[:, None] + offs_dv[None, :], mask=from_kv[:, None], other=0.0)
                     + tl.load(cache_v + crow[:, None] * (DV * NDV) + offs_dv[None, :], mask=hit[:, None],
                               other=0.0))
                tl.store(cache_v + crow[:, None] * (DV * NDV) + offs_dv[None, :], v, mask=fill[:, None])
            else:
                v = tl.load(v_buffer + vrow[:, None] + offs_dv[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out_h = h * G + heads
    mid = mid_o + b * stride_mb + out_h[:, None] * stride_mh + split * stride_ms + offs_dv[None, :]
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(mid, acc / l_safe[:, None], mask=mask_h[:, None])
    # log2-domain lse; -inf marks an empty split
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(mid_lse + b * stride_lb + out_h * stride_lh + split, lse, mask=mask_h & (vc == 0))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_kv_splits(num_programs: int, num_slots: int, device: torch.device, block_n: int) -> int:
    """Splits so that about four programs per SM run, each split at least two tiles of BLOCK_N: every tile is a
    dependent gather (slot -> K row), so short splits on many SMs hide its latency."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    want = max(1, (4 * sms) // max(num_programs, 1))
    return int(max(1, min(want, triton.cdiv(num_slots, 2 * block_n))))


# Tiles by key width (H100: tune_sparse_decode_* rows of benchmarks/op_latency.py). block_n tokens a tile;
# dv_chunks: programs that share a (group, split), each writing Dv / dv_chunks output columns (more programs in
# flight without more split-K partials; each re-reads the K tile, from L2).
TILES = {"narrow": dict(block_n=64, num_warps=4, dv_chunks=1),  # D <= 256 (GQA head dim 128)
         "wide": dict(block_n=32, num_warps=8, dv_chunks=1)}    # MLA latent, D = 576


def sparse_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, token_slots: torch.Tensor,
                  sm_scale: float, out: Optional[torch.Tensor] = None, num_splits: int = 0,
                  block_h: int = 0, out_rows: Optional[torch.Tensor] = None, block_n: int = 0,
                  num_warps: int = 0, dv_chunks: int = 0, cache: Optional[tuple] = None) -> torch.Tensor:
    """Exact attention of each query head over its KV group's selected slots (see `reference.sparse_decode`).

    q: [B, Hq, D]; k_buffer: [S, Hkv, D]; v_buffer: [S, Hkv, Dv] (may be a view of k_buffer[..., :Dv]);
    token_slots: [B, Hkv, K] int32 (-1 = skip). Returns o: [B, Hq, Dv] in q's dtype (float32 accumulation).
    out_rows: [B] bool, with out: only those rows of out are written (the others keep what they hold).
    cache: (cache_k [N, D], cache_v [N, Dv] (may be cache_k when v_buffer is a view of k_buffer), cache_ref
    [B, Hkv, K] int32 from `host_cache_lookup`): hits read the cache row, fills read the slot and write the row
    (the host-row cache, offload/host_cache.py); the attention is the same.
    Two kernels: this split-K pass and `splitk_combine`. (Merging the splits in the last split to finish, by
    an atomic ticket, was measured slower on the H100: GQA 96k x 8 21.8 vs 21.2 us, MLA 29.0 vs 18.4 us.)
    """
    b, hq, d = q.shape
    _, hkv, dv = v_buffer.shape
    kk = token_slots.shape[2]
    assert k_buffer.shape[1:] == (hkv, d) and hq % hkv == 0 and token_slots.shape[:2] == (b, hkv)
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1 and token_slots.stride(2) == 1
    assert k_buffer.dtype == v_buffer.dtype == q.dtype and token_slots.dtype == torch.int32
    d1 = 1 << (d.bit_length() - 1)
    d2 = d - d1
    assert d2 & (d2 - 1) == 0 and dv & (dv - 1) == 0, "head dims must be 2^a or 2^a + 2^b (e.g. 576 = 512 + 64)"
    g = hq // hkv
    tiles = TILES["wide" if d > 256 else "narrow"]
    block_n, num_warps = block_n or tiles["block_n"], num_warps or tiles["num_warps"]
    ndv = dv_chunks or tiles["dv_chunks"]
    assert dv % ndv == 0 and ndv & (ndv - 1) == 0
    v_is_k = (v_buffer.data_ptr() == k_buffer.data_ptr() and v_buffer.stride() == k_buffer.stride() and dv == d1
              and ndv == 1)
    block_h = block_h or min(max(16, triton.next_power_of_2(g)), 32 if d > 256 else 64)
    nhb = triton.cdiv(g, block_h)
    splits = num_splits or num_kv_splits(b * hkv * nhb, kk, q.device, block_n)
    split_k = triton.cdiv(triton.cdiv(kk, splits), block_n) * block_n
    mid_o = torch.empty(b, hq, splits, dv, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    cache_k = cache_v = cache_ref = token_slots  # unused unless cache is given
    if cache is not None:
        cache_k, cache_v, cache_ref = cache
        assert cache_k.shape[1] == d and cache_k.is_contiguous() and cache_v.is_contiguous()
        assert cache_v.shape[1] == (d if v_is_k else dv) and cache_k.dtype == cache_v.dtype == q.dtype
        assert cache_ref.shape == token_slots.shape and cache_ref.stride() == token_slots.stride()
        assert cache_ref.dtype == torch.int32
    _sparse_decode_kernel[(b * hkv * nhb * ndv, splits)](
        q, k_buffer, v_buffer, token_slots, mid_o, mid_lse, sm_scale, kk, q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1), token_slots.stride(0),
        token_slots.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), cache_k, cache_v, cache_ref, HKV=hkv, G=g, NHB=nhb, BLOCK_H=block_h, D1=d1, D2=d2,
        DV=dv // ndv, V_IS_K=v_is_k, SPLIT_K=split_k, BLOCK_N=block_n, NDV=ndv, CACHED=cache is not None,
        num_warps=num_warps, num_stages=2)
    return splitk_combine(mid_o, mid_lse, q.dtype, out=out, out_rows=out_rows)
