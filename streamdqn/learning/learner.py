"""DQN learning on replay rows: a pure row_loss(), and DQNLearner (networks + optimizer).

The learner's boundary is narrow on purpose: replay rows in, weights and stats out. That is what
lets it run as a thread or in its own process over shared-memory replay (see streamdqn.learning.runners).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from streamdqn.learning.graphs import GraphedStep
from streamdqn.learning.model import QNetwork
from streamdqn.learning.replay.buffer import ReplayBuffer, RowBatch
from streamdqn.learning.settings import LearnerSettings


class UpdateStats(NamedTuple):
    loss: float
    td_error_abs: float
    q_max_mean: float


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def row_loss(
    online: QNetwork, target: QNetwork, batch: RowBatch, gamma: float, double_dqn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked Huber loss over every known target of each row; (loss, |TD error| per row, max-Q per row).

    Responses regress on their known (terminal) rewards; ignore on rewards[:, 0] plus
    gamma**horizon * Q_target(next) when horizon > 0, the next action picked by the online network
    under double DQN. A row's loss is weighted by its importance weight (1 under uniform sampling).
    """
    q = online(batch.states)
    horizon = batch.horizon.to(q.dtype)
    with torch.no_grad():
        next_target = target(batch.next_states)
        if double_dqn:
            # Double DQN: the online network picks the action, the target network values it.
            best = online(batch.next_states).argmax(dim=1, keepdim=True)
            next_q = next_target.gather(1, best).squeeze(1)
        else:
            next_q = next_target.max(dim=1).values
        bootstrap = torch.where(horizon > 0, torch.pow(gamma, horizon) * next_q, torch.zeros_like(next_q))
        y = batch.rewards.clone()
        y[:, 0] += bootstrap
    known = batch.known.to(q.dtype)
    # Huber loss: less sensitive to outlier TD errors than squared error.
    per_entry = F.smooth_l1_loss(q, y, reduction="none") * known
    loss = (per_entry * batch.weights.unsqueeze(1)).sum() / known.sum().clamp(min=1.0)
    td_abs = ((q.detach() - y).abs() * known).sum(dim=1) / known.sum(dim=1).clamp(min=1.0)
    return loss, td_abs, q.detach().max(dim=1).values


@dataclass
class LearnerCounters:
    updates: int = 0
    last: UpdateStats = field(default_factory=lambda: UpdateStats(float("nan"), float("nan"), float("nan")))


class DQNLearner:
    """Owns the online and target networks and the optimizer.

    On CUDA with `settings.cuda_graph`, each update is replayed from a CUDA graph (see learning.graphs):
    the same update, launched as one graph. That is why everything an update reads is changed in place.
    """

    def __init__(
        self, settings: LearnerSettings, obs_dim: int, n_actions: int, clip: float = 10.0,
        after_backward: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        """`after_backward(online)` runs in every update between the backward pass and gradient clipping:
        where a data-parallel group averages the gradients (streamdqn.learning.distributed)."""
        self.settings = settings
        self.after_backward = after_backward
        self.device = resolve_device(settings.device)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        self.online = QNetwork(obs_dim, n_actions, settings.hidden, clip, dueling=settings.dueling)
        self.online.to(self.device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        # A hook runs inside the step, and a collective (or any Python) in it cannot be captured into a
        # CUDA graph: with a hook every update runs eagerly.
        graphed = settings.cuda_graph and self.device.type == "cuda" and after_backward is None
        self.optimizer = _optimizer(self.online, settings, self.device, capturable=graphed)
        self.graphed_step = GraphedStep(self._step, self.device) if graphed else None
        self.counters = LearnerCounters()
        # |TD error| of each row of the last update (what a prioritized sampler is told).
        self.td_abs = torch.zeros(0, device=self.device)

    def update(self, batch: RowBatch) -> UpdateStats:
        step = self._step if self.graphed_step is None else self.graphed_step
        out = step(batch)
        self.counters.updates += 1
        self._sync_target()
        # Copied before a graph's next replay overwrites them; one device-to-host transfer for the stats.
        self.td_abs = out[3:].clone()
        stats = UpdateStats(*out[:3].tolist())
        self.counters.last = stats
        return stats

    def _step(self, batch: RowBatch) -> torch.Tensor:
        """One gradient step of the online network; (loss, mean |TD error|, mean max-Q, |TD error| per
        row...) as one tensor."""
        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        loss, td_abs, q_max = row_loss(self.online, self.target, batch, s.gamma, s.double_dqn)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(self.online)
        torch.nn.utils.clip_grad_norm_(self.online.parameters(), s.grad_clip)
        self.optimizer.step()
        return torch.cat([torch.stack([loss.detach(), td_abs.mean(), q_max.mean()]), td_abs])

    @torch.no_grad()
    def _sync_target(self) -> None:
        s = self.settings
        if s.tau > 0:
            for t, o in zip(self.target.parameters(), self.online.parameters(), strict=True):
                t.lerp_(o, s.tau)
        elif self.counters.updates % s.target_update_interval == 0:
            # load_state_dict copies in place: a captured update keeps reading the target's own tensors.
            self.target.load_state_dict(self.online.state_dict())

    def set_normalization(self, mean: np.ndarray, std: np.ndarray, clip: float) -> None:
        self.online.set_normalization(mean, std, clip)
        self.target.set_normalization(mean, std, clip)

    @torch.no_grad()
    def q_values(self, features: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        return np.asarray(self.online(x).cpu().numpy())

    @torch.no_grad()
    def act(self, features: np.ndarray) -> np.ndarray:
        """The greedy action (ignore margin applied) for a batch of states: what a snapshot would do."""
        if len(features) == 0:
            return np.zeros(0, dtype=np.int64)
        q = self.online(torch.as_tensor(features, dtype=torch.float32, device=self.device))
        return np.asarray(self.online.greedy(q).cpu().numpy(), dtype=np.int64)

    def state_dict(self) -> dict[str, object]:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.counters.updates,
            "settings": self.settings.as_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.online.load_state_dict(state["online"])  # type: ignore[arg-type]
        self.target.load_state_dict(state["target"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(_with_own_flags(self.optimizer, state["optimizer"]))  # type: ignore[arg-type]
        if self.graphed_step is not None:
            # Loading replaced the optimizer's state tensors, which the captured graphs still point at.
            self.graphed_step.reset()
        self.counters.updates = int(state["updates"])  # type: ignore[call-overload]


def _optimizer(
    online: QNetwork, settings: LearnerSettings, device: torch.device, *, capturable: bool
) -> torch.optim.Optimizer:
    options = _fast_adam(device)
    if capturable:
        # A CUDA graph may only capture a capturable optimizer; the fused kernel computes the same either way.
        options["capturable"] = True
    if settings.weight_decay > 0:
        return torch.optim.AdamW(
            online.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, **options
        )
    return torch.optim.Adam(online.parameters(), lr=settings.lr, **options)


def _fast_adam(device: torch.device) -> dict[str, Any]:
    # The fused Adam kernel is the fastest step measured on this class of CPU and on CUDA.
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _with_own_flags(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state with `optimizer`'s own implementation flags in place of the saver's.

    Loading would otherwise adopt the saver's flags: a CPU checkpoint would make a GPU learner's
    optimizer uncapturable (and its graph capture fail), a GPU checkpoint a CPU learner's capturable.
    """
    own = {k: optimizer.defaults[k] for k in _IMPLEMENTATION_FLAGS if k in optimizer.defaults}
    return {**saved, "param_groups": [{**g, **own} for g in saved["param_groups"]]}


def update_from(learner: DQNLearner, buffer: ReplayBuffer) -> UpdateStats:
    """One update on a batch sampled from `buffer`; a prioritized sampler hears the rows' TD errors."""
    batch = buffer.sample(learner.settings.batch_size)
    stats = learner.update(batch)
    if buffer.prioritized:
        buffer.update_priorities(batch.positions, learner.td_abs)
    return stats
