"""Whole recorded episodes for offline training and evaluation: a telemetry file's events grouped by
(sandbox_id, episode_id), ordered by step and featurized."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamdqn.stream.features import featurize, new_carry
from streamdqn.stream.wire import Event, raw_matrix


@dataclass(frozen=True)
class EpisodeData:
    """One whole recorded episode, for offline training and evaluation."""

    sandbox_id: str
    episode_id: str
    events: list[Event]
    features: np.ndarray  # float32 [T, FEATURE_DIM]
    malicious: bool
    severity: float

    def __len__(self) -> int:
        return len(self.events)


def split_episodes(events: Sequence[Event]) -> list[EpisodeData]:
    """Group events by (sandbox_id, episode_id), order each by step (duplicate steps keep the first),
    and featurize. Episodes come out in order of their first event."""
    by_key: dict[tuple[str, str], dict[int, Event]] = {}
    for event in events:
        by_key.setdefault(event.episode_key, {}).setdefault(event.step, event)
    out = []
    for (sandbox, episode), steps in by_key.items():
        ordered = [steps[k] for k in sorted(steps)]
        step = np.array([e.step for e in ordered], dtype=np.float64)
        features, _ = featurize(raw_matrix(ordered), step, np.zeros(len(ordered), dtype=np.int64),
                                new_carry(1))
        out.append(
            EpisodeData(
                sandbox, episode, ordered, features,
                malicious=any(bool(e.is_malicious) for e in ordered),
                severity=max(e.severity or 0.0 for e in ordered),
            )
        )
    return out
