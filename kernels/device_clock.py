"""The GPU's global nanosecond timer, written into a tensor by a one-lane kernel: a timestamp taken in stream
order, without a host sync and inside a captured CUDA graph (CUDA events can do neither), for the offload
engine's stall telemetry. CUDA only: the interpreter has no %globaltimer."""

import torch
import triton
import triton.language as tl


@triton.jit
def _device_clock_kernel(out, index):
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(out + index, now)


def device_clock(out: torch.Tensor, index: int) -> None:
    """out[index] = the GPU's global timer in ns (int64 tensor on the GPU), in the current stream's order."""
    assert out.is_cuda and out.dtype == torch.int64 and out.is_contiguous()
    _device_clock_kernel[(1,)](out, index, num_warps=1)
