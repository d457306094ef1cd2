"""CUDA graphs for the learner: one whole update captured per batch size, then replayed.

A replay launches the update's forward, backward, clipping and optimizer kernels as one graph, with no
Python and no per-kernel launch cost in between: for a network this small that cost is most of an
eager update on a GPU. It is correct only under the rules of CUDA graphs
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs): every replay reads and writes the very
tensors the capture saw. So batches are copied into static input tensors, and whatever the step reads
(parameters, normalization buffers, the target network, optimizer state) must be changed in place,
never replaced; whoever replaces them calls reset().
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamdqn.learning.replay.buffer import RowBatch

log = logging.getLogger(__name__)

# Eager calls per batch size before its capture; the CUDA graph notes warm up for three iterations.
WARMUP_STEPS = 3

Step = Callable[[RowBatch], torch.Tensor]


@dataclass
class _Capture:
    """One batch size's static inputs, and its graph and static output once captured."""

    inputs: RowBatch
    warmups: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None


class GraphedStep:
    """`step(batch)` on a CUDA device, replayed from a CUDA graph captured for each batch size.

    Every call is one real step: the first WARMUP_STEPS calls of a batch size run it eagerly on a side
    stream (so that lazy state such as the optimizer's moments is created outside the capture), the next
    one captures it and replays the graph, and the rest replay. The returned tensor is the graph's static
    output: read it before the next call overwrites it. If a capture raises, a warning is logged once and
    every later call runs `step` eagerly.
    """

    def __init__(self, step: Step, device: torch.device) -> None:
        self._step = step
        self._device = device
        self._side = torch.cuda.Stream(device)
        self._captures: dict[int, _Capture] = {}
        self.error: str | None = None

    @property
    def captured(self) -> bool:
        """Whether a batch size is replayed from a graph now."""
        return any(c.graph is not None for c in self._captures.values())

    def reset(self) -> None:
        """Drop every graph (state the step reads was replaced): the next calls warm up and capture anew."""
        self._captures.clear()

    def __call__(self, batch: RowBatch) -> torch.Tensor:
        if self.error is not None:
            return self._step(batch)
        capture = self._captures.get(len(batch.states))
        if capture is None:
            inputs = RowBatch(*(torch.empty_like(t, device=self._device) for t in batch))
            capture = self._captures[len(batch.states)] = _Capture(inputs)
        for static, value in zip(capture.inputs, batch, strict=True):
            static.copy_(value, non_blocking=True)
        if capture.graph is None or capture.output is None:
            if capture.warmups < WARMUP_STEPS:
                capture.warmups += 1
                return self._warm_up(capture.inputs)
            try:
                capture.graph, capture.output = self._capture(capture.inputs)
            except Exception as exc:  # noqa: BLE001 - a failed capture costs speed, never the learner
                self.error = f"{type(exc).__name__}: {exc}"
                self._captures.clear()
                log.warning("CUDA graph capture failed; updates run eagerly from now on: %s", self.error)
                return self._step(batch)
        capture.graph.replay()
        return capture.output

    def _warm_up(self, inputs: RowBatch) -> torch.Tensor:
        current = torch.cuda.current_stream(self._device)
        self._side.wait_stream(current)
        with torch.cuda.device(self._device), torch.cuda.stream(self._side):
            output = self._step(inputs)
        current.wait_stream(self._side)
        return output

    def _capture(self, inputs: RowBatch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (ingest pushing into a GPU replay buffer) keep using CUDA during a
        # capture, and in the default global mode their calls would fail. torch.compile's CUDA graph
        # trees capture in this mode for the same reason.
        with torch.cuda.device(self._device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self._step(inputs)
        return graph, output
