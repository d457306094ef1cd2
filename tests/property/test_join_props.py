"""The verdict join on its own: any interleaving of telemetry and verdicts, cut into any poll batches,
gives the same learned rows as labelling the telemetry inline, also when a wrong earlier revision of a
verdict was learned from first."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import RunningNormalizer
from streamdqn.stream.join import VerdictJoin
from streamdqn.stream.pipeline import IngestPipeline
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.rows import ReplayRows, relabel_rewards
from streamdqn.stream.sources import Record
from tests.factories import activity
from tests.property.examples import examples

GAMMA = 0.95
TABLE = RewardTable()


class ListReplay:
    """The learned rows, with the relabelling the daemon's replay buffer does in place."""

    def __init__(self) -> None:
        self.rows: list[ReplayRows] = []

    def push(self, rows: ReplayRows) -> None:
        self.rows.append(rows)

    def relabel(self, episode: int, malicious: bool, severity: float) -> int:
        moved = 0
        for i, rows in enumerate(self.rows):
            mine = rows.episode == episode
            if mine.any():
                values, _ = relabel_rewards(ReplayRows(*(c[mine] for c in rows)), malicious, severity,
                                                TABLE, GAMMA)
                rewards = rows.rewards.copy()
                rewards[mine] = values
                self.rows[i] = rows._replace(
                    rewards=rewards, malicious=np.where(mine, malicious, rows.malicious),
                    severity=np.where(mine, severity, rows.severity).astype(np.float32),
                )
                moved += int(mine.sum())
        return moved

    def by_episode(self) -> dict[int, ReplayRows]:
        rows = ReplayRows.concat(self.rows)
        return {int(h): ReplayRows(*(c[rows.episode == h] for c in rows)) for h in np.unique(rows.episode)}


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[list[dict[str, Any]]], list[tuple[bool, float]]]:
    episodes, labels = [], []
    for e in range(draw(st.integers(1, 4))):
        sandbox = f"sbx-{e % 2}" if draw(st.booleans()) else f"sbx-{e}"
        n = draw(st.integers(1, 6))
        events = [{"sandbox_id": sandbox, "episode_id": e, "step": s, **draw(activity()),
                   "final": s == n - 1 and draw(st.booleans())} for s in range(n)]
        episodes.append(events)
        labels.append((draw(st.booleans()), draw(st.floats(0, 1, allow_nan=False))))
    return episodes, labels


def run(records: list[Record], cuts: list[int], with_join: bool) -> dict[int, ReplayRows]:
    replay = ListReplay()
    tracker = EpisodeTracker(TABLE, gamma=GAMMA, n_steps=2)
    join = VerdictJoin(tracker, replay.relabel) if with_join else None
    pipeline = IngestPipeline(tracker, RunningNormalizer(), replay.push, join=join, verdicts_topic="verdicts")
    for lo, hi in zip([0, *cuts], [*cuts, len(records)], strict=True):
        pipeline.process(records[lo:hi], now=0.0)
    pipeline.close_all()
    return replay.by_episode()


def _record(topic: str, offset: int, value: dict[str, Any]) -> Record:
    return Record(topic, 0, offset, json.dumps(value).encode())


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(), st.data())
def test_any_interleaving_of_events_and_verdicts_learns_what_inline_labels_teach(
    case: tuple[list[list[dict[str, Any]]], list[tuple[bool, float]]], data: st.DataObject
) -> None:
    episodes, labels = case
    # Episodes run one after another per sandbox, so events keep their order (one partition).
    events = [e for episode in episodes for e in episode]
    inline = [_record("telemetry", i, {**e, "is_malicious": labels[e["episode_id"]][0],
                                       "severity": labels[e["episode_id"]][1]}) for i, e in enumerate(events)]
    expected = run(inline, [], with_join=False)

    stream = [_record("telemetry", i, e) for i, e in enumerate(events)]
    for k, (malicious, severity) in enumerate(labels):
        sandbox = episodes[k][0]["sandbox_id"]
        verdict = {"sandbox_id": sandbox, "episode_id": k, "is_malicious": malicious, "severity": severity,
                   "revision": 1}
        stream.insert(data.draw(st.integers(0, len(stream))), _record("verdicts", 0, verdict))
        if data.draw(st.booleans()):
            # A wrong earlier revision: before the right one (maybe learned from first, then relabelled)
            # or after it (stale, ignored).
            wrong = {**verdict, "is_malicious": not malicious, "severity": 1 - severity, "revision": 0}
            stream.insert(data.draw(st.integers(0, len(stream))), _record("verdicts", 0, wrong))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(stream)), max_size=4, unique=True)))
    got = run(stream, cuts, with_join=True)

    assert set(got) == set(expected)
    for h, want in expected.items():
        mine = got[h]
        np.testing.assert_array_equal(mine.states, want.states)
        np.testing.assert_array_equal(mine.known, want.known)
        np.testing.assert_array_equal(mine.horizon, want.horizon)
        np.testing.assert_allclose(np.where(mine.known, mine.rewards, 0),
                                   np.where(want.known, want.rewards, 0), rtol=1e-5, atol=1e-6)
