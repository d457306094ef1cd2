"""The reward table cell by cell, and the episode tracker: episode ends, pending transitions, rejects."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from streamdqn.offline.dataset import split_episodes
from streamdqn.stream.episodes import (
    REASON_DUPLICATE,
    REASON_EPISODE_CLOSED,
    REASON_OUT_OF_ORDER,
    EpisodeTracker,
    TransitionBatch,
)
from streamdqn.stream.features import FEATURE_NAMES
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action, TelemetryEvent
from tests.factories import make_event

IGNORE, CONTAIN, TERMINATE, QUARANTINE, REVIEW = (int(a) for a in Action)
LOG_STEP = FEATURE_NAMES.index("log_step")
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
    assert reward(CONTAIN, True, below_third) == 1.0 and reward(CONTAIN, True, 1 / 3) == 0.6
    assert reward(CONTAIN, True, below_two_thirds) == 0.6 and reward(CONTAIN, True, 2 / 3) == 0.3
    assert reward(TERMINATE, True, below_third) == 0.7 and reward(TERMINATE, True, 1 / 3) == 1.0
    assert reward(TERMINATE, True, below_two_thirds) == 1.0 and reward(TERMINATE, True, 2 / 3) == 0.7
    assert reward(QUARANTINE, True, below_two_thirds) == 0.7 and reward(QUARANTINE, True, 2 / 3) == 1.0


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
    assert d["contain_malicious"] == [1.0, 0.6, 0.3] and d["review_benign"] == -0.2


# --- the tracker -----------------------------------------------------------------------------------


def tracker_of(**options: object) -> EpisodeTracker:
    """A tracker yielding only the experienced transitions (no counterfactual responses)."""
    return EpisodeTracker(counterfactual_responses=False, **options)  # type: ignore[arg-type]


def ev(episode: int | str, step: int, sandbox: str = "sb", **fields: object) -> TelemetryEvent:
    fields.setdefault("severity", 0.5)
    fields.setdefault("syscall_count", 10 * step + 1)
    return make_event(episode_id=episode, step=step, sandbox_id=sandbox, **fields)


def feed(
    tracker: EpisodeTracker, events: list[TelemetryEvent], actions: list[int] | None = None, now: float = 0.0
) -> tuple[TransitionBatch, TransitionBatch, list[tuple[int, str]]]:
    """observe + act, the policy choosing actions[i] for events[i] (default: ignore).

    Returns (episodes the batch closed in observe, transitions from act, [(index, reject reason)]).
    """
    observed, closing = tracker.observe(events, now)
    chosen = np.array(actions if actions is not None else [IGNORE] * len(events), dtype=np.int64)
    batch = tracker.act(observed, chosen[observed.accepted])
    return closing, batch, [(r.index, r.reason) for r in observed.rejects]


def steps_of(states: np.ndarray) -> list[int]:
    """Recover each state's step index from its log_step feature."""
    return [round(float(np.expm1(s))) for s in states[:, LOG_STEP]]


def rows(batch: TransitionBatch) -> list[tuple[int, int, float, int, bool]]:
    return [
        (s, int(a), round(float(r), 6), s2, bool(d))
        for s, a, r, s2, d in zip(
            steps_of(batch.states),
            batch.actions,
            batch.rewards,
            steps_of(batch.next_states),
            batch.dones,
            strict=True,
        )
    ]


def test_ignore_continues_and_final_ends_the_episode() -> None:
    tracker = tracker_of()
    closing, batch, rejects = feed(tracker, [ev(1, 0), ev(1, 1), ev(1, 2, final=True)])
    assert len(closing) == 0 and rejects == []
    assert rows(batch) == [(0, 0, -0.05, 1, False), (1, 0, -0.05, 2, False), (2, 0, -1.0, 2, True)]
    assert batch.episode_returns == [pytest.approx(-1.1)] and batch.episode_malicious == [True]
    assert tracker.open_episodes == 0


def test_benign_episode_let_run_to_the_end_earns_half() -> None:
    tracker = tracker_of()
    _, batch, _ = feed(tracker, [ev(1, 0, is_malicious=False), ev(1, 1, is_malicious=False, final=True)])
    assert rows(batch) == [(0, 0, 0.0, 1, False), (1, 0, 0.5, 1, True)]


def test_a_response_ends_the_episode_and_later_events_give_nothing() -> None:
    tracker = tracker_of()
    _, batch, _ = feed(
        tracker, [ev(1, 0), ev(1, 1), ev(1, 2), ev(1, 3)], [IGNORE, TERMINATE, IGNORE, CONTAIN]
    )
    assert rows(batch) == [(0, 0, -0.05, 1, False), (1, TERMINATE, 1.0, 1, True)]
    assert batch.episode_returns == []  # it stays open, consuming events, until final or timeout
    _, later, rejects = feed(tracker, [ev(1, 4), ev(1, 5, final=True)], [QUARANTINE, IGNORE])
    assert rejects == [] and len(later) == 0
    assert later.episode_returns == [pytest.approx(0.95)]


def test_pending_transition_gets_the_next_batch_first_state() -> None:
    tracker = tracker_of()
    _, first, _ = feed(tracker, [ev(1, 0), ev(1, 1)])
    assert rows(first) == [(0, 0, -0.05, 1, False)]  # step 1 waits for its next state
    _, second, _ = feed(tracker, [ev(1, 2), ev(1, 3)], [REVIEW, IGNORE])
    assert rows(second) == [(1, 0, -0.05, 2, False), (2, REVIEW, 0.4, 2, True)]


def test_sandbox_starting_another_episode_ends_the_previous_one_in_a_later_batch() -> None:
    tracker = tracker_of()
    feed(tracker, [ev(1, 0), ev(1, 1)])
    closing, batch, _ = feed(tracker, [ev(2, 0)])
    assert rows(closing) == [(1, 0, -1.0, 1, True)]  # its last step counts as final: -(0.5 + s)
    assert closing.episode_returns == [pytest.approx(-1.05)]
    assert len(batch) == 0 and tracker.open_episodes == 1


def test_sandbox_starting_another_episode_in_the_same_batch_ends_the_previous_one() -> None:
    # Regression: the previous episode was closed during observe, before its rows in this batch were
    # acted on: its last transition was lost and a pending transition was left behind.
    tracker = tracker_of()
    closing, batch, rejects = feed(tracker, [ev(1, 0), ev(1, 1), ev(2, 0), ev(1, 2)])
    assert rejects == [(3, REASON_EPISODE_CLOSED)]
    assert len(closing) == 0
    assert rows(batch) == [(0, 0, -0.05, 1, False), (1, 0, -1.0, 1, True)]
    assert batch.episode_returns == [pytest.approx(-1.05)]
    assert tracker.open_episodes == 1


def test_events_after_final_in_the_same_batch_are_rejected() -> None:
    # Regression: they used to be accepted and yield transitions after the episode's terminal one.
    tracker = tracker_of()
    _, batch, rejects = feed(tracker, [ev(1, 0, final=True), ev(1, 1), ev(1, 2)])
    assert rejects == [(1, REASON_EPISODE_CLOSED), (2, REASON_EPISODE_CLOSED)]
    assert rows(batch) == [(0, 0, -1.0, 0, True)]


@pytest.mark.parametrize(("malicious", "final_reward"), [(True, -1.3), (False, 0.5)])
def test_idle_timeout_ends_the_episode_with_the_last_step_as_final(
    malicious: bool, final_reward: float
) -> None:
    tracker = tracker_of(idle_timeout=10.0)
    feed(tracker, [ev(1, 0, is_malicious=malicious, severity=0.8)], now=100.0)
    assert len(tracker.expire(110.0)) == 0 and tracker.open_episodes == 1
    expired = tracker.expire(110.5)
    assert rows(expired) == [(0, 0, final_reward, 0, True)]
    assert expired.episode_returns == [pytest.approx(final_reward)]
    assert feed(tracker, [ev(1, 1)])[2] == [(0, REASON_EPISODE_CLOSED)]


def test_logged_action_and_reward_override_the_policy_and_the_table() -> None:
    tracker = tracker_of(reward_clip=2.0)
    events = [ev(1, 0, reward=0.25), ev(1, 1, action="ignore", reward=-7.0), ev(1, 2, action="quarantine")]
    _, batch, _ = feed(tracker, events, [CONTAIN, CONTAIN, CONTAIN])
    # The first row takes the policy's contain with the logged reward; the later rows are never reached.
    assert rows(batch) == [(0, CONTAIN, 0.25, 0, True)]
    tracker = tracker_of(reward_clip=2.0)
    _, batch, _ = feed(tracker, events[1:], [CONTAIN, CONTAIN])
    assert rows(batch) == [(1, IGNORE, -2.0, 2, False), (2, QUARANTINE, 0.7, 2, True)]


def test_reward_override_of_a_pending_step_is_kept_across_batches() -> None:
    tracker = tracker_of()
    feed(tracker, [ev(1, 0, reward=3.0)])
    closing = tracker.close_all()
    assert rows(closing) == [(0, 0, 3.0, 0, True)]


def test_duplicates_and_out_of_order_steps_are_rejected() -> None:
    tracker = tracker_of()
    _, _, rejects = feed(tracker, [ev(1, 0), ev(1, 2), ev(1, 2), ev(1, 1)])
    assert rejects == [(2, REASON_DUPLICATE), (3, REASON_OUT_OF_ORDER)]
    _, batch, rejects = feed(tracker, [ev(1, 2), ev(1, 0), ev(1, 3)])
    assert rejects == [(0, REASON_DUPLICATE), (1, REASON_OUT_OF_ORDER)]
    assert rows(batch) == [(2, 0, -0.05, 3, False)]


def test_events_of_a_closed_episode_are_rejected() -> None:
    tracker = tracker_of()
    feed(tracker, [ev(1, 0, final=True)])
    _, batch, rejects = feed(tracker, [ev(1, 1), ev("1", 2), ev(1, 0, sandbox="other")])
    assert rejects == [(0, REASON_EPISODE_CLOSED), (1, REASON_EPISODE_CLOSED)]  # 1 and "1": same episode
    assert len(batch) == 0 and tracker.open_episodes == 1  # another sandbox's episode 1 is another episode


def test_drop_partitions_forgets_their_open_episodes() -> None:
    tracker = tracker_of()
    observed, _ = tracker.observe(
        [ev(1, 0, sandbox="a"), ev(2, 0, sandbox="b"), ev(3, 0, sandbox="c")], 0.0, partitions=[0, 1, 0]
    )
    tracker.act(observed, np.zeros(3, np.int64))
    assert tracker.drop_partitions({0}) == 2
    assert tracker.open_episodes == 1
    closing = tracker.close_all()
    assert len(closing.episode_returns) == 1 and tracker.open_episodes == 0


def through_checkpoint(state: dict[str, Any]) -> Any:
    """torch.save then a weights_only load, as checkpoints are read: plain types only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_continues_identically() -> None:
    first = [ev(1, 0, sandbox="a"), ev(1, 1, sandbox="a"), ev(2, 0, sandbox="b"), ev(3, 0, sandbox="c")]
    second = [
        ev(1, 2, sandbox="a"),
        ev(2, 1, sandbox="b", final=True),
        ev(4, 0, sandbox="c"),
        ev(3, 1, sandbox="c"),
    ]
    original = tracker_of()
    feed(original, first, [IGNORE, IGNORE, IGNORE, REVIEW])
    restored = tracker_of()
    restored.load_state_dict(through_checkpoint(original.state_dict()), now=0.0)
    assert restored.open_episodes == original.open_episodes == 3
    outcomes = []
    for tracker in (original, restored):
        closing, batch, rejects = feed(tracker, second, [IGNORE, IGNORE, IGNORE, IGNORE])
        final = tracker.close_all()
        outcomes.append(
            (
                rows(closing),
                rows(batch),
                rows(final),
                rejects,
                closing.episode_returns,
                batch.episode_returns,
                final.episode_returns,
            )
        )
        # The numbers themselves, not only the recovered steps.
        outcomes.append(np.concatenate([batch.states, batch.next_states, final.states]).tobytes())
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[3]
    assert outcomes[0][3] == [(3, REASON_EPISODE_CLOSED)]  # episode 3 of c ended when c started episode 4


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
    assert episodes[0].malicious and episodes[0].severity == 0.9
    assert episodes[0].features.shape == (2, len(FEATURE_NAMES))


def test_the_held_out_window_survives_a_checkpoint() -> None:
    """The publish gate's evaluation episodes are part of the state, so a restart keeps gating."""
    original = tracker_of(holdout_fraction=0.5, holdout_keep=4)
    for episode in range(40):
        feed(original, [ev(episode, s, sandbox=f"s{episode}", final=s == 2, is_malicious=episode % 2 == 0)
                        for s in range(3)])
    assert len(original.holdout) == 4  # the most recent ones, up to holdout_keep
    restored = tracker_of(holdout_fraction=0.5, holdout_keep=4)
    restored.load_state_dict(through_checkpoint(original.state_dict()), now=0.0)
    assert [(h.malicious, h.severity) for h in restored.holdout] == [(h.malicious, h.severity)
                                                                      for h in original.holdout]
    for before, after in zip(original.holdout, restored.holdout, strict=True):
        assert after.features.dtype == np.float32
        np.testing.assert_array_equal(after.features, before.features)
    old_checkpoint = {k: v for k, v in original.state_dict().items() if k != "holdout"}
    restored.load_state_dict(through_checkpoint(old_checkpoint), now=0.0)  # written before the window was
    assert len(restored.holdout) == 0
