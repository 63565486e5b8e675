"""Coarse level: upper-bound score of every complete block, in GEMM form (q+ . Kmax + q- . Kmin), or the
slack-scaled / per-head-max variants of `reference.block_scores` (bound_slack, group_score)."""

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _bound_part(q_row, kmin_row, kmax_row, mask_g, complete, offs_d, slack, GROUP_MAX: tl.constexpr):
    qg = tl.load(q_row + offs_d[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32)
    # (q +- s|q|) / 2: at s = 1 exactly max(q, 0) and min(q, 0)
    q_hi = (qg + slack * tl.abs(qg)) * 0.5
    q_lo = (qg - slack * tl.abs(qg)) * 0.5
    k_hi = tl.load(kmax_row + offs_d[None, :], mask=complete[:, None], other=0.0).to(tl.float32)
    k_lo = tl.load(kmin_row + offs_d[None, :], mask=complete[:, None], other=0.0).to(tl.float32)
    if GROUP_MAX:  # per head: [BLOCK_N, D] x [D, GP] -> [BLOCK_N, GP]
        part = (tl.dot(k_hi, tl.trans(q_hi), input_precision="ieee")
                + tl.dot(k_lo, tl.trans(q_lo), input_precision="ieee"))
    else:  # the sum over the group's heads commutes with the dot: one GEMV per group, not G
        q_pos = tl.sum(q_hi, axis=0)
        q_neg = tl.sum(q_lo, axis=0)
        part = tl.sum(k_hi * q_pos[None, :] + k_lo * q_neg[None, :], axis=1)
    return part  # one return: the compiler wants one type per function, even across constexpr branches


@triton.jit
def _tile_scores(q_row, kmin_row, kmax_row, mask_g, complete, slack, D1: tl.constexpr, D2: tl.constexpr,
                 DCH: tl.constexpr, GROUP_MAX: tl.constexpr):
    """[BLOCK_N] bounds of one tile of blocks, q loaded with each channel chunk."""
    offs_c = tl.arange(0, DCH)
    acc = _bound_part(q_row, kmin_row, kmax_row, mask_g, complete, offs_c, slack, GROUP_MAX)
    if D2 > 0:  # keys of 2^a + 2^b channels (MLA latent 576 = 512 + 64): parts add before a max over heads
        acc += _bound_part(q_row, kmin_row, kmax_row, mask_g, complete, D1 + tl.arange(0, D2), slack, GROUP_MAX)
    # more chunks only for tiles too wide for the registers (a [64, 512] fp32 tile spills at 4 warps)
    for c in tl.static_range(1, D1 // DCH):
        acc += _bound_part(q_row, kmin_row, kmax_row, mask_g, complete, c * DCH + offs_c, slack, GROUP_MAX)
    if GROUP_MAX:
        acc = tl.max(tl.where(mask_g[None, :], acc, float("-inf")), axis=1)
    return tl.where(complete, acc, float("-inf"))


@triton.jit
def _block_scores_kernel(q, kmin, kmax, block_table, seq_lens, scores, NB,
                         stride_qb, stride_qh, stride_ke, stride_kh, stride_tb, stride_sb, stride_sh, slack,
                         HKV: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, GP: tl.constexpr,
                         D1: tl.constexpr, D2: tl.constexpr, DCH: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUP_MAX: tl.constexpr):
    # one tile of BLOCK_N blocks of one KV group per program (GQA: many programs stream; a loop over tiles would
    # cost registers, sm_90: 96 vs 64)
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, GP)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out = scores + b * stride_sb + h * stride_sh + offs_n
    # the table load is not behind seq_lens (one round trip less) and ahead of the q math (ptxas keeps it there)
    entry = tl.load(block_table + b * stride_tb + offs_n, mask=offs_n < NB, other=0)
    num_complete = tl.load(seq_lens + b) // BS  # index rows of incomplete blocks are never read
    if tl.program_id(1) * BLOCK_N < num_complete:
        q_row = q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh
        row = tl.maximum(entry, 0).to(tl.int64)[:, None] * stride_ke + h * stride_kh
        acc = _tile_scores(q_row, kmin + row, kmax + row, offs_g < G, offs_n < num_complete, slack, D1, D2, DCH,
                           GROUP_MAX)
        tl.store(out, acc, mask=offs_n < NB)
    else:  # a tile past the request's last complete block (the table spans the context): no q or bound loads
        tl.store(out, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=offs_n < NB)


def _launch_shape(d: int, block_n: int, num_warps: int):
    """(BLOCK_N, DCH, num_warps): one 64-block tile per program. GQA (d <= 256) at 8 warps (H100, 96k x 8: 22.0 vs
    25.0 us at 4); wider keys (MLA 576) at 4 warps (28.6 us at 8) in 128-channel chunks."""
    block_n = block_n or 64
    num_warps = num_warps or (4 if d > 256 else 8)
    d1 = 1 << (d.bit_length() - 1)
    return block_n, min(d1, max(128, 8192 // block_n)), num_warps  # <= 64 fp32 values per thread and tensor


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int, bound_slack: float = 1.0, group_score: str = "sum",
                 out: Optional[torch.Tensor] = None, *, block_n: int = 0, num_warps: int = 0) -> torch.Tensor:
    """Upper-bound scores of complete blocks (see `reference.block_scores`).

    q: [B, Hq, D]; kmin, kmax: [E, Hkv, D]; block_table: [B, NB] int index entry of each block; seq_lens: [B].
    Returns [B, Hkv, NB] float32, -inf where the block is incomplete.

    A program scores one tile of BLOCK_N blocks of one KV group: a memory-bound GEMV over Kmin/Kmax rows, so tl.dot (16-row minimum, one useful row) would not
    pay; entries of incomplete blocks are never read. group_score "max" needs one dot per head: tl.dot against
    the group's heads padded to 16 (same bytes, G x the math).
    """
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    nb = block_table.shape[1]
    assert hq % hkv == 0 and kmin.shape == kmax.shape and kmin.shape[2] == d and kmin.stride() == kmax.stride()
    assert q.stride(2) == 1 and kmin.stride(2) == 1 and block_table.stride(1) == 1 and block_table.shape[0] == b
    if out is None:
        out = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    assert out.shape == (b, hkv, nb) and out.dtype == torch.float32 and out.stride(2) == 1
    assert group_score in ("sum", "max") and 0.0 <= bound_slack <= 1.0
    g = hq // hkv
    group_max = group_score == "max"
    gp = max(16, triton.next_power_of_2(g)) if group_max else triton.next_power_of_2(g)
    d1 = 1 << (d.bit_length() - 1)
    d2 = d - d1
    assert d2 & (d2 - 1) == 0, "head dim must be 2^a or 2^a + 2^b (e.g. 576 = 512 + 64)"
    block_n, dch, num_warps = _launch_shape(d, block_n, num_warps)
    _block_scores_kernel[(b * hkv, triton.cdiv(nb, block_n))](
        q, kmin, kmax, block_table, seq_lens, out, nb, q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), float(bound_slack),
        HKV=hkv, G=g, BS=block_size, GP=gp, D1=d1, D2=d2, DCH=dch, BLOCK_N=block_n, GROUP_MAX=group_max,
        num_warps=num_warps)
    return out
