"""DQN learning: a pure td_loss(), DQNLearner (networks + optimizer), and the epsilon schedule.

The learner's boundary is narrow on purpose: replay samples in, weights and stats out. That is what
lets it run as a thread or in its own process over shared-memory replay (see streamdqn.learning.runners).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from streamdqn.learning.graphs import GraphedStep
from streamdqn.learning.model import QNetwork
from streamdqn.learning.replay.buffer import ReplaySamples
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


def epsilon_at(step: int, s: LearnerSettings) -> float:
    """Linear decay from epsilon_start to epsilon_end over epsilon_decay_steps acting steps."""
    if s.epsilon_decay_steps <= 0:
        return s.epsilon_end
    frac = min(1.0, step / s.epsilon_decay_steps)
    return s.epsilon_start + frac * (s.epsilon_end - s.epsilon_start)


def epsilon_greedy(rng: np.random.Generator, greedy: np.ndarray, epsilon: float, settings: LearnerSettings,
                   n_actions: int) -> np.ndarray:
    """Epsilon-greedy over `greedy` actions (see LearnerSettings.explore_ignore_probability)."""
    n = len(greedy)
    p_ignore = settings.explore_ignore_probability
    if p_ignore is None:
        random = rng.integers(0, n_actions, size=n)
    else:
        random = np.where(rng.random(n) < p_ignore, 0, rng.integers(1, n_actions, size=n))
    return np.where(rng.random(n) < epsilon, random, greedy).astype(np.int64)


def td_loss(
    online: QNetwork, target: QNetwork, batch: ReplaySamples, gamma: float, double_dqn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Huber TD loss; returns (loss, |td error| per sample, max-Q per sample)."""
    q_all = online(batch.states)
    q = q_all.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        next_target = target(batch.next_states)
        if double_dqn:
            # Double DQN: the online network picks the action, the target network values it.
            best = online(batch.next_states).argmax(dim=1, keepdim=True)
            next_q = next_target.gather(1, best).squeeze(1)
        else:
            next_q = next_target.max(dim=1).values
        y = batch.rewards + gamma * (~batch.dones).float() * next_q
    td = q - y
    # Huber loss: less sensitive to outlier TD errors than squared error.
    loss = F.smooth_l1_loss(q, y)
    return loss, td.detach().abs(), q_all.detach().max(dim=1).values


@dataclass
class LearnerCounters:
    updates: int = 0
    acting_steps: int = 0
    last: UpdateStats = field(default_factory=lambda: UpdateStats(float("nan"), float("nan"), float("nan")))


class DQNLearner:
    """Owns the online and target networks and the optimizer.

    On CUDA with `settings.cuda_graph`, each update is replayed from a CUDA graph (see learning.graphs):
    the same update, launched as one graph. That is why everything an update reads is changed in place.
    """

    def __init__(self, settings: LearnerSettings, obs_dim: int, n_actions: int, clip: float = 10.0) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        self.online = QNetwork(obs_dim, n_actions, settings.hidden, clip).to(self.device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        graphed = settings.cuda_graph and self.device.type == "cuda"
        self.optimizer = _optimizer(self.online, settings, self.device, capturable=graphed)
        self.graphed_step = GraphedStep(self._step, self.device) if graphed else None
        self.counters = LearnerCounters()
        self._rng = np.random.default_rng(settings.seed)

    @property
    def epsilon(self) -> float:
        return epsilon_at(self.counters.acting_steps, self.settings)

    def update(self, batch: ReplaySamples) -> UpdateStats:
        step = self._step if self.graphed_step is None else self.graphed_step
        out = step(batch)
        self.counters.updates += 1
        self._sync_target()
        # One device-to-host transfer for all three numbers, before a graph's next replay overwrites them.
        stats = UpdateStats(*out.tolist())
        self.counters.last = stats
        return stats

    def _step(self, batch: ReplaySamples) -> torch.Tensor:
        """One gradient step of the online network; (loss, mean |TD error|, mean max-Q) as one tensor."""
        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        loss, td_abs, q_max = td_loss(self.online, self.target, batch, s.gamma, s.double_dqn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.online.parameters(), s.grad_clip)
        self.optimizer.step()
        return torch.stack([loss.detach(), td_abs.mean(), q_max.mean()])

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
        return self.online(x).cpu().numpy()

    def act(self, features: np.ndarray, *, explore: bool = True) -> np.ndarray:
        """Epsilon-greedy actions for a batch of states (greedy with explore=False).

        The caller advances `counters.acting_steps` by the steps that were really acted on (rows
        after an episode's response are not), which drives the epsilon schedule.
        """
        n = len(features)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        with torch.no_grad():
            q = self.online(torch.as_tensor(features, dtype=torch.float32, device=self.device))
            greedy = self.online.greedy(q).cpu().numpy()
        if not explore:
            return greedy.astype(np.int64)
        return epsilon_greedy(self._rng, greedy, self.epsilon, self.settings, self.online.n_actions)

    def state_dict(self) -> dict[str, object]:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.counters.updates,
            "acting_steps": self.counters.acting_steps,
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
        self.counters.acting_steps = int(state["acting_steps"])  # type: ignore[call-overload]


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


def _fast_adam(device: torch.device) -> dict[str, bool]:
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


class ActingPolicy:
    """The behaviour policy on the ingest side: a copy of the online network, epsilon-greedy.

    Its weights are refreshed from the learner (which may live in another process) now and then;
    acting on slightly stale weights is what every distributed DQN does.
    """

    def __init__(self, settings: LearnerSettings, obs_dim: int, n_actions: int, clip: float = 10.0) -> None:
        self.settings = settings
        self.network = QNetwork(obs_dim, n_actions, settings.hidden, clip).eval().requires_grad_(False)
        self.acting_steps = 0
        self.weights_version = -1
        self._rng = np.random.default_rng(settings.seed)

    @property
    def epsilon(self) -> float:
        return epsilon_at(self.acting_steps, self.settings)

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.network.load_state_dict(state)
        self.weights_version = version

    def set_normalization(self, mean: np.ndarray, std: np.ndarray, clip: float) -> None:
        self.network.set_normalization(mean, std, clip)

    @torch.no_grad()
    def act(self, features: np.ndarray) -> np.ndarray:
        n = len(features)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        q = self.network(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        greedy = self.network.greedy(q).numpy()
        return epsilon_greedy(self._rng, greedy, self.epsilon, self.settings, self.network.n_actions)
