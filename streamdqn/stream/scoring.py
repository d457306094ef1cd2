"""Scoring a policy on recorded episodes under the reward table: the numbers the publish gate and the
offline evaluation both report. Numpy only.

Replaying an episode through a policy: the policy sees the episode's feature rows in step order and
the episode's outcome is its first non-ignore action (or no response). Its return under the reward
table is the ignore reward of every step before the response plus the response's reward at its step;
with no response, the ignore rewards of all steps, the last one getting the final-step reward.

A decision at a step depends only on that step's feature row (the running context is part of the
row), so a policy is a plain function of a feature matrix, and scoring many episodes is one batched
call over all their rows:

    batch    = EpisodeBatch.of(episodes)          # rows of all episodes, concatenated
    actions  = decide(batch.features)             # Policy: [R, 30] -> [R] int64
    outcomes = replay(actions, batch, rewards)    # first response and return per episode
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action

Policy = Callable[[np.ndarray], np.ndarray]
"""Feature rows float32 [R, 30] to one action per row, int64 [R] (0 ignore … 4 review)."""

RESPONSES = (Action.CONTAIN, Action.TERMINATE, Action.QUARANTINE)


class LabelledEpisode(Protocol):
    """What scoring needs of an episode: its feature rows in step order and its label."""

    @property
    def features(self) -> np.ndarray: ...
    @property
    def malicious(self) -> bool: ...
    @property
    def severity(self) -> float: ...


@dataclass(frozen=True)
class EpisodeBatch:
    """The rows of many episodes concatenated in episode order, each episode's rows in step order."""

    features: np.ndarray  # float32 [R, 30]
    group: np.ndarray  # int64 [R]: index of each row's episode
    position: np.ndarray  # int64 [R]: 0-based position of each row within its episode
    lengths: np.ndarray  # int64 [E]
    malicious: np.ndarray  # bool [E]
    severity: np.ndarray  # float64 [E]

    @classmethod
    def of(cls, episodes: Sequence[LabelledEpisode]) -> EpisodeBatch:
        """Concatenate episodes; raises ValueError for an empty list or an episode without rows."""
        if not episodes:
            raise ValueError("no episodes to evaluate")
        lengths = np.array([len(e.features) for e in episodes], dtype=np.int64)
        if (lengths == 0).any():
            raise ValueError("an episode has no rows")
        group = np.repeat(np.arange(len(episodes), dtype=np.int64), lengths)
        starts = np.cumsum(lengths) - lengths
        return cls(
            features=np.concatenate([e.features for e in episodes]).astype(np.float32, copy=False),
            group=group,
            position=np.arange(len(group), dtype=np.int64) - starts[group],
            lengths=lengths,
            malicious=np.array([e.malicious for e in episodes], dtype=bool),
            severity=np.array([e.severity for e in episodes], dtype=np.float64),
        )

    @property
    def rows(self) -> int:
        return len(self.group)

    def __len__(self) -> int:
        return len(self.lengths)


class Outcomes(NamedTuple):
    """What a policy did to each episode of a batch."""

    first_response: np.ndarray  # int64 [E]: position of the first non-ignore action, -1 if none
    action: np.ndarray  # int64 [E]: that action, IGNORE if none
    returns: np.ndarray  # float64 [E]: return under the reward table


def replay(actions: np.ndarray, batch: EpisodeBatch, rewards: RewardTable) -> Outcomes:
    """Outcome and return of each episode when `actions` (one per row of `batch`) are taken.

    Only the first non-ignore action of an episode counts: it ends the episode. Raises ValueError
    when `actions` does not hold one valid action per row.
    """
    actions = _checked_actions(actions, batch.rows)
    n = len(batch)
    responding_rows = np.flatnonzero(actions != Action.IGNORE)
    episodes_responding, first_index = np.unique(batch.group[responding_rows], return_index=True)
    first_row = responding_rows[first_index]
    first = np.full(n, -1, dtype=np.int64)
    first[episodes_responding] = batch.position[first_row]
    action = np.full(n, int(Action.IGNORE), dtype=np.int64)
    action[episodes_responding] = actions[first_row]

    # Rows up to the response (all rows without one) earn rewards; the response row earns its own.
    cutoff = np.where(first >= 0, first, batch.lengths)[batch.group]
    taken = np.where(batch.position == cutoff, actions, Action.IGNORE)
    final = batch.position == batch.lengths[batch.group] - 1
    per_row = rewards.rewards(taken, batch.malicious[batch.group], batch.severity[batch.group], final)
    counted = np.where(batch.position <= cutoff, per_row, 0.0)
    returns = np.bincount(batch.group, weights=counted, minlength=n)
    return Outcomes(first, action, returns)


def _checked_actions(actions: np.ndarray, rows: int) -> np.ndarray:
    out = np.asarray(actions)
    if out.shape != (rows,):
        raise ValueError(f"policy returned actions of shape {out.shape}, expected ({rows},)")
    if out.dtype.kind not in "iu" or (rows and (out.min() < 0 or out.max() >= len(Action))):
        raise ValueError(f"policy returned actions outside 0..{len(Action) - 1} (dtype {out.dtype})")
    return out.astype(np.int64, copy=False)


@dataclass(frozen=True)
class Metrics:
    """How a policy did on a set of episodes. A rate is None when no episode of its class exists."""

    episodes: int
    malicious_episodes: int
    mean_return: float
    detection_rate: float | None  # malicious episodes with any non-ignore action
    false_positive_rate: float | None  # benign episodes contained, terminated or quarantined
    benign_review_rate: float | None  # benign episodes sent to review
    missed_rate: float | None  # malicious episodes with no response
    mean_steps_to_response: float | None  # mean 0-based row position of the first response

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(hits: np.ndarray, of: np.ndarray) -> float | None:
    total = int(of.sum())
    return float((hits & of).sum() / total) if total else None


def metrics_of(outcomes: Outcomes, batch: EpisodeBatch) -> Metrics:
    """Aggregate per-episode outcomes into Metrics."""
    malicious, benign = batch.malicious, ~batch.malicious
    responded = outcomes.first_response >= 0
    return Metrics(
        episodes=len(batch),
        malicious_episodes=int(malicious.sum()),
        mean_return=float(outcomes.returns.mean()),
        detection_rate=_rate(responded, malicious),
        false_positive_rate=_rate(np.isin(outcomes.action, RESPONSES), benign),
        benign_review_rate=_rate(outcomes.action == Action.REVIEW, benign),
        missed_rate=_rate(~responded, malicious),
        mean_steps_to_response=float(outcomes.first_response[responded].mean()) if responded.any() else None,
    )


def evaluate_rows(decide: Policy, episodes: Sequence[LabelledEpisode], rewards: RewardTable) -> Metrics:
    """Metrics of a policy on episodes that only need features, labels and severity (no events)."""
    batch = EpisodeBatch.of(episodes)
    return metrics_of(replay(decide(batch.features), batch, rewards), batch)
