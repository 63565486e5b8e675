"""Copy lanes: where the host -> GPU gathers run and how the main stream waits for them.

CudaLane: a side stream; one event per layer orders a layer's copy before its first use at the next step.
InlineLane: runs the copy at once (CPU, or debugging); waiting is a no-op. Both keep a per-layer `CopyState`.
CudaLane(capture=True): for a decode step captured in a CUDA graph. A graph cannot leave the side stream unjoined,
so `end_step` joins it (the main stream waits for every copy of the step: the last layers' copies are exposed), and
the next step's waits are then no-ops. `record_stream` is needed there too: without it the allocator hands a layer's
copy list, freed on the main stream during the capture, to the next layer's outputs while the graph's side-stream
gather still reads it (seen on the H100: an illegal address in replays); under capture it defers such frees to the
capture's end.
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

    def end_step(self):
        """After the last layer of a decode step."""


class CudaLane(InlineLane):
    def __init__(self, num_layers: int, device=None, capture: bool = False):
        super().__init__(num_layers)
        self.capture = capture
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

    def end_step(self):
        if self.capture:  # join: the graph ends with every copy of the step landed
            torch.cuda.current_stream().wait_stream(self.stream)
            self.state = [CopyState.IDLE] * len(self.state)

    def synchronize(self):
        """Host wait for every copy (abort path: pages may be freed only after the copies into them landed)."""
        self.stream.synchronize()
        super().synchronize()
