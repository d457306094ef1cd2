"""Uniform sampling of ring positions, drawn on the storage's device."""

from __future__ import annotations

import torch


class UniformSampler:
    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.device = device

    def indices(self, size: int, batch_size: int) -> torch.Tensor:
        return torch.randint(0, size, (batch_size,), device=self.device, generator=self.generator)
