"""Programmatic dependent launch (sm_90+) for the decode-step kernels; a device helper, no kernel here.

Launched with launch_pdl, a kernel may start while the one before it in the stream still runs: until
`wait_for_inputs`, which blocks until the previous grid has finished and its writes are visible and then lets the
next kernel launch, it reads only q, label channels, seq_lens and req_pool_indices. Those must therefore not be
written by the kernel launched just before (in the decode step they come from the model and the batch metadata,
several kernels earlier; the previous kernel's writes are visible only after the wait, even once it has exited).
In a latency-bound chain that hides each launch and its prologue behind the previous kernel's tail. Off unless
SGLANG_ASYNCTLS_PDL=1 (an A/B switch; on the H100 with every other switched path on, GQA's step went 83.2 -> 90.7 us
and MLA's 97.9 -> 90.4, benchmarks/results/issue3_ab_h100.json); the CPU interpreter has no grid dependency control,
so tests run it off.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("SGLANG_ASYNCTLS_PDL", "0") == "1"


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Everything after this may read what the previous kernel wrote; the next kernel may launch from here (it
    waits in turn before reading ours)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def use_pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch: enabled, and a CUDA device of compute capability 9 or above."""
    return (ENABLED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)
