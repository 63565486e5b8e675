"""Last-arrival tickets: fuse a split-over-programs pass with the reduction that needs all of its splits.

Each program of a group (e.g. the splits of one KV group) writes its partial result, then takes a ticket from the
group's counter; the program that draws the last ticket reads every split's result back and finishes the group,
then resets the counter to 0 for the next launch. No program waits on another (no spin, no deadlock at any
occupancy), and one launch replaces two: inside a CUDA-graph decode step at small batch, launches and the gaps
between them, not bytes, are the cost. The pattern is CUDA's threadFenceReduction sample: the atomic is
acq_rel at GPU scope, after a CTA barrier, so every thread's stores are visible to the finishing program, whose
reads go through L2 (`.cg`) rather than a possibly stale L1.
"""

import torch
import triton
import triton.language as tl

# counters per (device, purpose): never shared by two kernels of one step, so kernels that overlap stay apart
_COUNTERS = {}
MAX_GROUPS = 1 << 16


@triton.jit
def last_arrival(counter, num_arrivals):
    """True in exactly one program of the num_arrivals that call this with the same counter: the last one."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    last = ticket == num_arrivals - 1
    tl.store(counter, 0, mask=last)  # ready for the next launch (every arrival has counted)
    return last


def ticket_counters(device: torch.device, purpose: str, num_groups: int) -> torch.Tensor:
    """Zeroed int32 counters for up to num_groups groups, kept for the process: allocated at the first (eager)
    call, so a CUDA-graph capture that follows finds them in place; each launch leaves them at 0 again."""
    if num_groups > MAX_GROUPS:
        raise ValueError(f"{num_groups} ticket groups; at most {MAX_GROUPS}")
    key = (str(device), purpose)
    buf = _COUNTERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ticket counters must be allocated before CUDA-graph capture (run one eager step)")
        buf = _COUNTERS[key] = torch.zeros(MAX_GROUPS, dtype=torch.int32, device=device)
    return buf
