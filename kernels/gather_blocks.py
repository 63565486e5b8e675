"""Host -> GPU block gather for the offload engine: many head-blocks per launch, one program per listed block.

One `copy_` per 256 KiB block costs ~15 us of launch overhead on the H100 (shared/MEASUREMENTS.md), so the copy
list of a whole layer goes in one launch. On the GPU the source is pinned host memory that the kernel reads over
PCIe directly (zero-copy, as SGLang's HiSparse swap-in kernel does) through a CUDA tensor aliasing it:
`offload.host_view.device_view` makes that view and refuses memory that is not pinned. Triton launches take CUDA
tensors only (a CPU tensor, pinned or not, fails in its driver with "Pointer argument cannot be accessed from
Triton"), so the launcher refuses mixed devices; under the CPU interpreter every tensor is a CPU tensor. Entries
with src < 0 are skipped, so the list keeps a static shape.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_blocks_kernel(src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks, K,
                          stride_sks, stride_skh, stride_svs, stride_svh, stride_dks, stride_dkh, stride_dvs,
                          stride_dvh, stride_bb, stride_bh,
                          HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          D_P2: tl.constexpr, DV_P2: tl.constexpr, ROWS: tl.constexpr, COPY_V: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    entry = b * stride_bb + h * stride_bh + j
    src = tl.load(src_blocks + entry).to(tl.int64)
    dst = tl.load(dst_blocks + entry).to(tl.int64)
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
                  src_blocks: torch.Tensor, dst_blocks: torch.Tensor, block_size: int) -> None:
    """See `sglang_asynctls.offload.reference.gather_blocks`. When both V buffers are views of their K buffers
    (MLA latent: V = K[..., :Dv]) only K is copied."""
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
    copy_v = not (_aliases(src_v, src_k) and _aliases(dst_v, dst_k))
    d_p2 = triton.next_power_of_2(d)
    rows = max(1, min(triton.next_power_of_2(block_size), 8192 // d_p2))  # ~8k elements a tile
    _gather_blocks_kernel[(b * hkv, kk)](
        src_k, src_v, dst_k, dst_v, src_blocks, dst_blocks, kk, src_k.stride(0), src_k.stride(1),
        src_v.stride(0), src_v.stride(1), dst_k.stride(0), dst_k.stride(1), dst_v.stride(0), dst_v.stride(1),
        src_blocks.stride(0), src_blocks.stride(1), HKV=hkv, BS=block_size, D=d, DV=dv, D_P2=d_p2,
        DV_P2=triton.next_power_of_2(dv), ROWS=rows, COPY_V=copy_v)
