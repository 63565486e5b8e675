"""Attention, split-K second pass: merge the per-split partial outputs by their log-sum-exp."""

from typing import Optional

import torch
import triton
import triton.language as tl



@triton.jit
def _splitk_combine_kernel(mid_o, mid_lse, out, out_rows, NSPLIT, stride_mb, stride_mh, stride_ms, stride_lb,
                           stride_lh, stride_ob, stride_oh, HQ: tl.constexpr, DV: tl.constexpr, NSP: tl.constexpr,
                           HAS_ROWS: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, NSP)
    offs_d = tl.arange(0, DV)
    lse = tl.load(mid_lse + b * stride_lb + h * stride_lh + offs_s, mask=offs_s < NSPLIT, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0))  # empty splits (lse = -inf) weigh 0
    o = tl.load(mid_o + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                mask=(offs_s < NSPLIT)[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    write = offs_d < DV
    if HAS_ROWS:  # rows not flagged keep what out holds (the backend's dense output)
        write = write & (tl.load(out_rows + b) != 0)
    tl.store(out + b * stride_ob + h * stride_oh + offs_d, res.to(out.dtype.element_ty), mask=write)


def splitk_combine(mid_o: torch.Tensor, mid_lse: torch.Tensor, dtype: torch.dtype,
                   out: Optional[torch.Tensor] = None, out_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mid_o: [B, Hq, splits, Dv] float32 normalised partial outputs; mid_lse: [B, Hq, splits] float32 log2-sum-exp
    (-inf = empty split). Returns o: [B, Hq, Dv] in `dtype` (zeros for heads with no valid slot, as the reference).
    out_rows: [B] bool, with out: only the flagged rows are written."""
    b, hq, splits, dv = mid_o.shape
    assert mid_lse.shape == (b, hq, splits) and mid_o.stride(3) == 1 and mid_lse.stride(2) == 1
    if out is None:
        out = torch.empty(b, hq, dv, dtype=dtype, device=mid_o.device)
    assert out.shape == (b, hq, dv) and out.dtype == dtype and out.stride(2) == 1
    assert out_rows is None or out_rows.shape == (b,)
    _splitk_combine_kernel[(b * hq,)](
        mid_o, mid_lse, out, out_rows if out_rows is not None else mid_lse, splits, mid_o.stride(0),
        mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HQ=hq, DV=dv, NSP=triton.next_power_of_2(splits), HAS_ROWS=out_rows is not None, num_warps=4)
    return out
