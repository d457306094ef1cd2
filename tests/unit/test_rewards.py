"""The reward table, cell by cell."""

from __future__ import annotations

import numpy as np
import pytest

from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action

IGNORE, CONTAIN, TERMINATE, QUARANTINE, REVIEW = (int(a) for a in Action)
TABLE = RewardTable()


def reward(action: int, malicious: bool, severity: float, final: bool = False) -> float:
    return float(
        TABLE.rewards(np.array([action]), np.array([malicious]), np.array([severity]), np.array([final]))[0]
    )


# --- the reward table ------------------------------------------------------------------------------

LOW, MID, HIGH = 0.2, 0.5, 0.9


@pytest.mark.parametrize(
    ("action", "severity", "expected"),
    [
        (CONTAIN, LOW, 1.0),
        (CONTAIN, MID, 0.6),
        (CONTAIN, HIGH, 0.3),
        (TERMINATE, LOW, 0.7),
        (TERMINATE, MID, 1.0),
        (TERMINATE, HIGH, 0.7),
        (QUARANTINE, LOW, 0.7),
        (QUARANTINE, MID, 0.7),
        (QUARANTINE, HIGH, 1.0),
        (REVIEW, LOW, 0.4),
        (REVIEW, MID, 0.4),
        (REVIEW, HIGH, 0.4),
    ],
)
def test_responses_to_malicious_samples_by_severity_third(
    action: int, severity: float, expected: float
) -> None:
    assert reward(action, True, severity) == pytest.approx(expected)
    assert reward(action, True, severity, final=True) == pytest.approx(expected)  # final or not


@pytest.mark.parametrize(
    ("action", "expected"), [(CONTAIN, -0.5), (TERMINATE, -1.0), (QUARANTINE, -1.0), (REVIEW, -0.2)]
)
@pytest.mark.parametrize("severity", [0.0, 0.5, 1.0])
def test_responses_to_benign_samples(action: int, expected: float, severity: float) -> None:
    assert reward(action, False, severity) == pytest.approx(expected)
    assert reward(action, False, severity, final=True) == pytest.approx(expected)


@pytest.mark.parametrize("severity", [0.0, 0.25, 1 / 3, 0.8, 1.0])
def test_ignore_rewards(severity: float) -> None:
    assert reward(IGNORE, True, severity) == pytest.approx(-0.1 * severity)
    assert reward(IGNORE, False, severity) == 0.0
    assert reward(IGNORE, True, severity, final=True) == pytest.approx(-(0.5 + severity))
    assert reward(IGNORE, False, severity, final=True) == pytest.approx(0.5)


def test_severity_boundaries_at_exactly_one_third_and_two_thirds() -> None:
    below_third, below_two_thirds = np.nextafter(1 / 3, 0), np.nextafter(2 / 3, 0)
    assert reward(CONTAIN, True, below_third) == 1.0
    assert reward(CONTAIN, True, 1 / 3) == 0.6
    assert reward(CONTAIN, True, below_two_thirds) == 0.6
    assert reward(CONTAIN, True, 2 / 3) == 0.3
    assert reward(TERMINATE, True, below_third) == 0.7
    assert reward(TERMINATE, True, 1 / 3) == 1.0
    assert reward(TERMINATE, True, below_two_thirds) == 1.0
    assert reward(TERMINATE, True, 2 / 3) == 0.7
    assert reward(QUARANTINE, True, below_two_thirds) == 0.7
    assert reward(QUARANTINE, True, 2 / 3) == 1.0


def test_best_action_is_the_severity_matched_response() -> None:
    assert TABLE.best_action(False, 0.9) == IGNORE
    assert [TABLE.best_action(True, s) for s in (0.1, 1 / 3, 0.5, 2 / 3, 1.0)] == [
        CONTAIN,
        TERMINATE,
        TERMINATE,
        QUARANTINE,
        QUARANTINE,
    ]


def test_as_dict_is_json_like() -> None:
    d = TABLE.as_dict()
    assert d["contain_malicious"] == [1.0, 0.6, 0.3]
    assert d["review_benign"] == -0.2
