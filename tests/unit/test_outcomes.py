"""Per-version outcomes of deployed policies, through the real pipeline."""

from __future__ import annotations

import json

import pytest

from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import RunningNormalizer
from streamdqn.stream.outcomes import OUTCOMES, PolicyOutcomes, outcome_of
from streamdqn.stream.pipeline import IngestPipeline, decode_state, encode_state
from streamdqn.stream.sources import Record
from streamdqn.stream.wire import Action
from tests.factories import event_dict


@pytest.mark.parametrize(("first", "malicious", "expected"), [
    (-1, True, "missed"), (-1, False, "benign_let_run"), (int(Action.CONTAIN), True, "detected"),
    (int(Action.QUARANTINE), False, "false_positive"), (int(Action.REVIEW), True, "review"),
    (int(Action.REVIEW), False, "review"),
])
def test_outcome_of(first: int, malicious: bool, expected: str) -> None:
    assert outcome_of(first, malicious) == expected


def episode(sandbox: str, episode_id: int, malicious: bool, version: str | None, actions: list[str | None],
            shadow: bool = False) -> list[dict[str, object]]:
    out = []
    for step, action in enumerate(actions):
        e = event_dict(sandbox_id=sandbox, episode_id=episode_id, step=step, is_malicious=malicious,
                       severity=0.8 if malicious else 0.0, final=step == len(actions) - 1)
        if version is not None:
            e["policy_version"] = version
        if action is not None:
            e.update(action=action, action_prob=0.9, shadow=shadow)
        out.append(e)
    return out


def test_the_pipeline_counts_each_versions_outcomes_and_keeps_them_in_its_state() -> None:
    events = [
        *episode("a", 1, True, "3", [None, "ignore", "terminate"]),  # detected by 3
        *episode("b", 1, False, "3", ["ignore", "quarantine"]),  # a false positive of 3
        *episode("c", 1, False, "4", ["ignore", "ignore"]),  # benign, let run by 4
        *episode("d", 1, True, "4", ["ignore", "contain"], shadow=True),  # 4 decided (shadow): detected
        *episode("e", 1, False, "4", ["review", "ignore"], shadow=True),  # a benign review by 4
        *episode("f", 1, True, None, ["contain"]),  # no version: not counted
    ]
    records = [Record("t", 0, i, json.dumps(e).encode()) for i, e in enumerate(events)]
    pipeline = IngestPipeline(EpisodeTracker(), RunningNormalizer(), lambda rows: None)
    outcome = pipeline.process(records, now=0.0)
    assert outcome.events == len(events)
    three, four = pipeline.outcomes.of(3), pipeline.outcomes.of("4")
    assert three.counts == {**dict.fromkeys(OUTCOMES, 0), "detected": 1, "false_positive": 1}
    assert four.counts == {**dict.fromkeys(OUTCOMES, 0), "benign_let_run": 1, "detected": 1, "review": 1}
    assert (three.episodes, three.benign, four.benign) == (2, 1, 2)
    assert set(pipeline.outcomes.versions) == {"3", "4"}
    assert pipeline.outcomes.of(99).episodes == 0
    assert three.mean_return() == pytest.approx((three.returns_sum) / 2)

    restored = IngestPipeline(EpisodeTracker(), RunningNormalizer(), lambda rows: None)
    restored.load_state(decode_state(encode_state(pipeline.state())), 0.0)
    assert restored.outcomes == pipeline.outcomes
    assert restored.outcomes is not pipeline.outcomes


def test_return_variance_needs_two_episodes() -> None:
    outcomes = PolicyOutcomes()
    outcomes.observe("1", -1, False, 0.5)
    assert outcomes.of("1").return_variance() is None
    outcomes.observe("1", -1, False, 1.5)
    assert outcomes.of("1").return_variance() == pytest.approx(0.5)
    assert outcomes.of("1").mean_return() == pytest.approx(1.0)

