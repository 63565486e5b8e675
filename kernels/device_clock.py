"""The GPU's global nanosecond timer as a Triton device function: a timestamp taken in stream order, without a host
sync and inside a captured CUDA graph (CUDA events can do neither), for the offload engine's stall telemetry
(`resident_candidates` stamps NEEDED, `gather_blocks` LANDED). CUDA only: the interpreter has no %globaltimer."""

import triton
import triton.language as tl


@triton.jit
def global_timer():
    """int64 ns of the GPU's %globaltimer."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
