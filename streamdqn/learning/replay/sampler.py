"""Uniform sampling of ring positions, drawn on the storage's device.

A sampler answers `indices(size, batch) -> (positions, importance weights)` and hears about writes and
TD errors; the uniform one ignores both (its weights are all 1). See prioritized.py for the other.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Sampler(Protocol):
    def indices(self, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def on_write(self, positions: torch.Tensor) -> None: ...
    def update_priorities(self, positions: torch.Tensor, priorities: torch.Tensor) -> None: ...


class UniformSampler:
    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self.seed(seed)

    def seed(self, seed: int | None) -> None:
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __getstate__(self) -> dict[str, object]:
        # A generator is per process: the other side draws its own stream.
        return {"device": self.device}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.device = state["device"]  # type: ignore[assignment]
        self.seed(None)

    def indices(self, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, size, (batch_size,), device=self.device, generator=self.generator)
        return index, torch.ones(batch_size, device=self.device)

    def on_write(self, positions: torch.Tensor) -> None:
        pass

    def update_priorities(self, positions: torch.Tensor, priorities: torch.Tensor) -> None:
        pass
