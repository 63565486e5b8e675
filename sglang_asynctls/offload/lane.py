"""Copy lanes: where the host -> GPU gathers run and how the main stream waits for them.

CudaLane: a side stream; one event per layer orders a layer's copy before its first use at the next step.
InlineLane: runs the copy at once (CPU, or debugging); waiting is a no-op. Both keep a per-layer `CopyState`.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, List

import torch


class CopyState(Enum):
    IDLE = "idle"
    IN_FLIGHT = "in_flight"


class InlineLane:
    def __init__(self, num_layers: int):
        self.state: List[CopyState] = [CopyState.IDLE] * num_layers

    def submit(self, layer: int, copy: Callable[[], None], *tensors: torch.Tensor):
        copy()

    def wait(self, layer: int):
        self.state[layer] = CopyState.IDLE

    def synchronize(self):
        self.state = [CopyState.IDLE] * len(self.state)


class CudaLane(InlineLane):
    def __init__(self, num_layers: int, device=None):
        super().__init__(num_layers)
        self.stream = torch.cuda.Stream(device)
        self.events = [torch.cuda.Event() for _ in range(num_layers)]

    def submit(self, layer: int, copy: Callable[[], None], *tensors: torch.Tensor):
        """Run `copy` on the side stream after everything the main stream has queued so far (this layer's
        attention reads the slots the copy may overwrite); `tensors` made on the main stream stay alive for it."""
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            copy()
        for t in tensors:
            t.record_stream(self.stream)
        self.events[layer].record(self.stream)
        self.state[layer] = CopyState.IN_FLIGHT

    def wait(self, layer: int):
        if self.state[layer] is CopyState.IN_FLIGHT:
            torch.cuda.current_stream().wait_event(self.events[layer])
        self.state[layer] = CopyState.IDLE

    def synchronize(self):
        """Host wait for every copy (abort path: pages may be freed only after the copies into them landed)."""
        self.stream.synchronize()
        super().synchronize()
