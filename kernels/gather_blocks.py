"""Host -> GPU block gather for the offload engine: many head-blocks per launch, in a bounded grid.

One `copy_` per 256 KiB block costs ~15 us of launch overhead on the H100 (shared/MEASUREMENTS.md), so the copy
list of a whole layer goes in one launch. On the GPU the source is pinned host memory that the kernel reads over
PCIe directly (zero-copy, as SGLang's HiSparse swap-in kernel does) through a CUDA tensor aliasing it:
`offload.host_view.device_view` makes that view and refuses memory that is not pinned. Triton launches take CUDA
tensors only (a CPU tensor, pinned or not, fails in its driver with "Pointer argument cannot be accessed from
Triton"), so the launcher refuses mixed devices; under the CPU interpreter every tensor is a CPU tensor. Entries
with src < 0 are skipped, so the list keeps a static shape.

Grid: (B x Hkv, P) programs, P = max(1, MAX_PROGRAMS // (B x Hkv)), program q of (b, h) taking entries q, q + P,
q + 2P, ... in a loop: ~2 programs an SM, since the copy waits on PCIe most of its time and runs beside the main
stream. (Capping it was meant to leave the SMs to the main stream's kernels, which slow down badly beside a large
copy; on the H100 the slowdown stayed as it was with up to 2,048 programs, so SM slots are not its cause:
docs/offload.md. The bandwidth stayed at 0.91 of a bulk copy.)
`counts` [B, Hkv] (optional): only entries j < counts[b, h] are read; the engine's list is compacted (a row's
misses first) and passes its miss counts, so a program loops over real copies only and a row's misses land in
different programs. With `landed` (the engine's LANDED stamp and a per-layer ticket), the last program to finish
(an atomic ticket) writes the GPU timer into the stamp and resets the ticket: the copy's landing time in the same
launch, instead of a clock kernel after it.
"""

from typing import Optional, Tuple


import torch
import triton
import triton.language as tl

from .device_clock import global_timer

MAX_PROGRAMS = 264  # grid bound (2 programs an H100 SM): more entries per program beyond it


@triton.jit
def _gather_blocks_kernel(src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks, K,
                          stride_sks, stride_skh, stride_svs, stride_svh, stride_dks, stride_dkh, stride_dvs,
                          stride_dvh, stride_bb, stride_bh, stamp, ticket, num_programs, counts,
                          HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          D_P2: tl.constexpr, DV_P2: tl.constexpr, ROWS: tl.constexpr, COPY_V: tl.constexpr,
                          STAMP: tl.constexpr, COUNTS: tl.constexpr):
    pid = tl.program_id(0)
    q = tl.program_id(1)
    p = tl.num_programs(1)
    b = pid // HKV
    h = pid % HKV
    n = K
    if COUNTS:
        n = tl.minimum(tl.load(counts + pid), K)
    for i in tl.range(0, tl.cdiv(tl.maximum(n - q, 0), p)):
        j = q + i * p
        _copy_entry(src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks, K, j, b * stride_bb + h * stride_bh + j, h,
                    stride_sks, stride_skh, stride_svs, stride_svh, stride_dks, stride_dkh, stride_dvs, stride_dvh,
                    BS, D, DV, D_P2, DV_P2, ROWS, COPY_V)
    if STAMP > 0:  # the last program to arrive stamps LANDED (1: GPU timer; 2: the arrival count, for CPU tests)
        tl.debug_barrier()  # every thread's copies issued before the ticket
        arrived = tl.atomic_add(ticket, 1, sem="acq_rel") + 1
        if STAMP == 1:
            value = global_timer()
        else:
            value = arrived.to(tl.int64)
        tl.store(stamp, value, mask=arrived == num_programs)
        tl.atomic_xchg(ticket, 0, mask=arrived == num_programs)


@triton.jit
def _copy_entry(src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks, K, j, entry, h,
                stride_sks, stride_skh, stride_svs, stride_svh, stride_dks, stride_dkh, stride_dvs, stride_dvh,
                BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, D_P2: tl.constexpr, DV_P2: tl.constexpr,
                ROWS: tl.constexpr, COPY_V: tl.constexpr):
    src = tl.load(src_blocks + entry, mask=j < K, other=-1).to(tl.int64)
    dst = tl.load(dst_blocks + entry, mask=j < K, other=-1).to(tl.int64)
    if src >= 0:
        offs_d = tl.arange(0, D_P2)
        offs_dv = tl.arange(0, DV_P2)
        for r0 in tl.range(0, BS, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            m = rows < BS
            s_rows = src * BS + rows
            d_rows = dst * BS + rows
            mk = m[:, None] & (offs_d[None, :] < D)
            k = tl.load(src_k + s_rows[:, None] * stride_sks + h * stride_skh + offs_d[None, :], mask=mk)
            tl.store(dst_k + d_rows[:, None] * stride_dks + h * stride_dkh + offs_d[None, :], k, mask=mk)
            if COPY_V:
                mv = m[:, None] & (offs_dv[None, :] < DV)
                v = tl.load(src_v + s_rows[:, None] * stride_svs + h * stride_svh + offs_dv[None, :], mask=mv)
                tl.store(dst_v + d_rows[:, None] * stride_dvs + h * stride_dvh + offs_dv[None, :], v, mask=mv)


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def gather_blocks(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                  src_blocks: torch.Tensor, dst_blocks: torch.Tensor, block_size: int,
                  landed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, stamp_mode: int = 1,
                  counts: Optional[torch.Tensor] = None) -> None:
    """See `sglang_asynctls.offload.reference.gather_blocks`. When both V buffers are views of their K buffers
    (MLA latent: V = K[..., :Dv]) only K is copied. landed=(stamp [1] int64, ticket [1] int32 holding 0): the last
    program writes the GPU timer (stamp_mode 1, CUDA only) or the number of programs (2, a test of the ticket on
    the CPU) into stamp and leaves the ticket at 0. counts [B, Hkv] int32: entries at j >= counts[b, h] are not
    read (all must be -1 there, as in the engine's compacted list)."""
    _, hkv, d = src_k.shape
    dv = src_v.shape[2]
    b, _, kk = src_blocks.shape
    assert dst_k.shape[1:] == (hkv, d) and dst_v.shape[1:] == (hkv, dv) and src_blocks.shape[1] == hkv
    assert src_blocks.shape == dst_blocks.shape and src_blocks.stride() == dst_blocks.stride()
    assert src_blocks.stride(2) == 1 and src_blocks.dtype == dst_blocks.dtype == torch.int32
    assert all(t.stride(2) == 1 for t in (src_k, src_v, dst_k, dst_v))
    assert src_k.dtype == src_v.dtype == dst_k.dtype == dst_v.dtype
    assert len({t.device.type for t in (src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks)}) == 1, \
        "gather_blocks: all tensors on one device; on the GPU pass the host store as device_view(pinned tensor)"
    if b * kk == 0:
        return
    progs = max(1, min(kk, MAX_PROGRAMS // (b * hkv)))  # programs per (b, h)
    if counts is not None:
        assert counts.shape == (b, hkv) and counts.dtype == torch.int32 and counts.is_contiguous()
    stamp, ticket = landed if landed is not None else (src_blocks, src_blocks)
    if landed is not None:
        assert stamp.dtype == torch.int64 and ticket.dtype == torch.int32 and stamp.numel() == ticket.numel() == 1
        assert stamp.device == ticket.device == src_blocks.device and (stamp_mode == 2 or stamp.is_cuda)
    copy_v = not (_aliases(src_v, src_k) and _aliases(dst_v, dst_k))
    d_p2 = triton.next_power_of_2(d)
    rows = max(1, min(triton.next_power_of_2(block_size), 8192 // d_p2))  # ~8k elements a tile
    _gather_blocks_kernel[(b * hkv, progs)](
        src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks, kk, src_k.stride(0), src_k.stride(1),
        src_v.stride(0), src_v.stride(1), dst_k.stride(0), dst_k.stride(1), dst_v.stride(0), dst_v.stride(1),
        src_blocks.stride(0), src_blocks.stride(1), stamp, ticket, b * hkv * progs,
        counts if counts is not None else src_blocks, HKV=hkv, BS=block_size, D=d, DV=dv, D_P2=d_p2,
        DV_P2=triton.next_power_of_2(dv), ROWS=rows, COPY_V=copy_v, STAMP=0 if landed is None else stamp_mode,
        COUNTS=counts is not None)
