"""Recorded episodes for the offline mode: grouped, ordered, featurized."""

from __future__ import annotations

from streamdqn.offline.dataset import split_episodes
from streamdqn.stream.features import FEATURE_NAMES
from streamdqn.stream.wire import TelemetryEvent
from tests.factories import make_event


def ev(episode: int | str, step: int, sandbox: str = "sb", **fields: object) -> TelemetryEvent:
    fields.setdefault("severity", 0.5)
    fields.setdefault("syscall_count", 10 * step + 1)
    return make_event(episode_id=episode, step=step, sandbox_id=sandbox, **fields)


def test_split_episodes_groups_orders_and_keeps_first_duplicate() -> None:
    events = [
        ev(2, 1, sandbox="b"),
        ev(1, 1),
        ev(2, 0, sandbox="b", is_malicious=False, severity=0.9),
        ev(1, 0, syscall_count=5),
        ev(1, 0, syscall_count=7),
    ]
    episodes = split_episodes(events)
    assert [(e.sandbox_id, e.episode_id, len(e)) for e in episodes] == [("b", "2", 2), ("sb", "1", 2)]
    assert [e.step for e in episodes[1].events] == [0, 1]
    assert episodes[1].events[0].syscall_count == 5
    assert episodes[0].malicious
    assert episodes[0].severity == 0.9
    assert episodes[0].features.shape == (2, len(FEATURE_NAMES))
