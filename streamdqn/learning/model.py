"""The Q-network: input normalization (baked in) followed by an MLP."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class QNetwork(nn.Module):
    """Raw feature vectors in, one Q-value per action out.

    The normalizer's mean and std are buffers of the network, so the learner, a checkpoint and the
    exported ONNX graph all apply exactly the same normalization.
    """

    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    obs_clip: torch.Tensor
    ignore_margin: torch.Tensor
    _ignore_onehot: torch.Tensor

    def __init__(
        self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (256, 256), clip: float = 10.0,
        *, dueling: bool = False,
    ) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.hidden = tuple(hidden)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("obs_clip", torch.tensor(float(clip)))
        # Added to Q(ignore) when choosing the greedy action: a calibrated bias against responding
        # (set by offline training on its own episodes; 0 means plain argmax). Q-values are unchanged.
        self.register_buffer("ignore_margin", torch.tensor(0.0))
        self.register_buffer("_ignore_onehot", torch.eye(n_actions)[0], persistent=False)
        layers: list[nn.Module] = []
        width = obs_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.dueling = dueling
        # Dueling (Wang et al. 2016): one more output, the state value; the others are advantages.
        layers.append(nn.Linear(width, n_actions + 1 if dueling else n_actions))
        self.mlp = nn.Sequential(*layers)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.obs_mean) / self.obs_std
        return torch.clamp(z, -self.obs_clip, self.obs_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.normalize(x))
        if not self.dueling:
            return out
        value, advantage = out[:, :1], out[:, 1:]
        return value + advantage - advantage.mean(dim=1, keepdim=True)

    def greedy(self, q_values: torch.Tensor) -> torch.Tensor:
        """The action chosen from Q-values, with the ignore margin applied."""
        return torch.argmax(q_values + self.ignore_margin * self._ignore_onehot, dim=1)

    @torch.no_grad()
    def set_normalization(self, mean: np.ndarray, std: np.ndarray, clip: float) -> None:
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        self.obs_clip.fill_(float(clip))


class PolicyHead(nn.Module):
    """What gets exported: Q-values and the greedy action (ignore margin applied)."""

    def __init__(self, q: QNetwork) -> None:
        super().__init__()
        self.q = q

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_values = self.q(features)
        return q_values, self.q.greedy(q_values)
