"""The episode tracker, row by row: one row per step with every action's target, how episodes end,
steps that wait for their next state or their label, logged actions, shadow mode, n-step windows,
rejects, partitions, checkpoints and the gate's held-out window."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from streamdqn.stream.episodes import (
    REASON_DUPLICATE,
    REASON_EPISODE_CLOSED,
    REASON_OUT_OF_ORDER,
    EpisodeTracker,
    Label,
    TrackerState,
)
from streamdqn.stream.features import FEATURE_NAMES
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.rows import ReplayRows, relabel_rewards
from streamdqn.stream.wire import Action, columns_of
from tests.factories import make_event

IGNORE, CONTAIN, TERMINATE, QUARANTINE, REVIEW = (int(a) for a in Action)
LOG_STEP = FEATURE_NAMES.index("log_step")
TABLE = RewardTable()
GAMMA = 0.9


def ev(episode: int | str, step: int, sandbox: str = "sb", **fields: object) -> Any:
    fields.setdefault("severity", 0.5)
    fields.setdefault("is_malicious", True)
    fields.setdefault("syscall_count", 10 * step + 1)
    return make_event(episode_id=episode, step=step, sandbox_id=sandbox, **fields)


def unlabelled(episode: int | str, step: int, sandbox: str = "sb", **fields: object) -> Any:
    return make_event(episode_id=episode, step=step, sandbox_id=sandbox, syscall_count=10 * step + 1,
                      **{"is_malicious": None, "severity": None, **fields})


def tracker_of(**options: Any) -> EpisodeTracker:
    options.setdefault("gamma", GAMMA)
    return EpisodeTracker(TABLE, **options)


def feed(tracker: EpisodeTracker, events: list[Any], now: float = 0.0,
         partitions: list[int] | None = None) -> tuple[ReplayRows, list[tuple[int, str]]]:
    """One batch: (rows it pushed, [(event position, reject reason)])."""
    parts = np.array(partitions if partitions is not None else [0] * len(events), np.int64)
    observed = tracker.observe(columns_of(events), parts, now)
    return observed.emitted.all_rows, [(i, r.reason) for i, r in observed.rejects]


def step_of(states: np.ndarray) -> list[int]:
    """Recover each state's step index from its log_step feature."""
    return [round(float(np.expm1(s))) for s in states[:, LOG_STEP]]


def table(action: int, malicious: bool, severity: float, final: bool = False) -> float:
    return float(TABLE.rewards(np.array([action]), np.array([malicious]), np.array([severity]),
                               np.array([final]))[0])


def responses(malicious: bool, severity: float) -> list[float]:
    return [table(a, malicious, severity) for a in (CONTAIN, TERMINATE, QUARANTINE, REVIEW)]


def summary(rows: ReplayRows) -> list[tuple[int, int, int, float]]:
    """(step, next step, horizon, ignore target's reward) per row; the next step only when bootstrapping."""
    out = []
    for s, s2, h, r in zip(step_of(rows.states), step_of(rows.next_states), rows.horizon, rows.rewards[:, 0],
                           strict=True):
        out.append((s, s2 if h > 0 else -1, int(h), round(float(r), 6)))
    return out


def test_one_row_per_step_with_every_actions_target() -> None:
    tracker = tracker_of()
    rows, rejects = feed(tracker, [ev(1, 0), ev(1, 1), ev(1, 2, final=True)])
    assert rejects == []
    assert tracker.open_episodes == 0
    assert summary(rows) == [(0, 1, 1, -0.05), (1, 2, 1, -0.05), (2, -1, 0, -1.0)]
    assert rows.known.all()
    np.testing.assert_allclose(rows.rewards[:, 1:], [responses(True, 0.5)] * 3)
    assert rows.table_mask.tolist() == [0b11111] * 3
    assert (rows.logged_action == -1).all()


def test_benign_episode_let_run_to_the_end_earns_half() -> None:
    tracker = tracker_of()
    rows, _ = feed(tracker, [ev(1, 0, is_malicious=False, severity=0.0),
                             ev(1, 1, is_malicious=False, severity=0.0, final=True)])
    assert summary(rows) == [(0, 1, 1, 0.0), (1, -1, 0, 0.5)]
    np.testing.assert_allclose(rows.rewards[0, 1:], [-0.5, -1.0, -1.0, -0.2])


def test_a_step_waits_for_the_next_batch_first_state() -> None:
    tracker = tracker_of()
    first, _ = feed(tracker, [ev(1, 0), ev(1, 1)])
    assert summary(first) == [(0, 1, 1, -0.05)]  # step 1 waits for its next state
    second, _ = feed(tracker, [ev(1, 2), ev(1, 3)])
    assert summary(second) == [(1, 2, 1, -0.05), (2, 3, 1, -0.05)]


def test_a_carried_out_logged_response_censors_the_episode() -> None:
    tracker = tracker_of()
    rows, rejects = feed(tracker, [ev(1, 0), ev(1, 1, action="terminate", action_prob=0.5), ev(1, 2)])
    assert rejects == []  # later events are consumed...
    assert summary(rows) == [(0, 1, 1, -0.05), (1, -1, 0, 0.0)]  # ...but yield no rows
    # What waiting at step 1 would have earned is unknown: the sandbox did not wait.
    assert rows.known[1].tolist() == [False, True, True, True, True]
    assert rows.logged_action.tolist() == [-1, TERMINATE]
    assert rows.action_prob[1] == pytest.approx(0.5)
    later, rejects = feed(tracker, [ev(1, 3, final=True)])
    assert rejects == []
    assert later.size == 0
    assert tracker.open_episodes == 0


def test_a_shadow_decision_is_logged_but_the_episode_goes_on() -> None:
    tracker = tracker_of()
    rows, _ = feed(tracker, [ev(1, 0), ev(1, 1, action="contain", shadow=True), ev(1, 2, final=True)])
    assert summary(rows) == [(0, 1, 1, -0.05), (1, 2, 1, -0.05), (2, -1, 0, -1.0)]
    assert rows.known.all()
    assert rows.logged_action.tolist() == [-1, CONTAIN, -1]


def test_the_logged_reward_replaces_the_tables_for_the_logged_action_only() -> None:
    tracker = tracker_of(reward_clip=2.0)
    rows, _ = feed(tracker, [ev(1, 0, reward=0.25), ev(1, 1, action="ignore", reward=-7.0),
                             ev(1, 2, action="quarantine", reward=0.9, shadow=True), ev(1, 3, final=True)])
    assert rows.rewards[0, IGNORE] == pytest.approx(0.25)  # no logged action: the reward is ignore's
    assert rows.rewards[1, IGNORE] == pytest.approx(-2.0)  # clipped to the reward clip
    assert rows.rewards[2, QUARANTINE] == pytest.approx(0.9)
    np.testing.assert_allclose(rows.rewards[2, [CONTAIN, TERMINATE, REVIEW]], [0.6, 1.0, 0.4])
    assert rows.table_mask.tolist() == [0b11110, 0b11110, 0b10111, 0b11111]


def test_n_step_windows_sum_the_ignore_rewards_and_bootstrap_n_steps_on() -> None:
    tracker = tracker_of(n_steps=3)
    events = [ev(1, s, severity=0.5) for s in range(5)] + [ev(1, 5, final=True)]
    rows, _ = feed(tracker, events)
    r, last = -0.05, -1.0
    three = r + GAMMA * r + GAMMA**2 * r
    assert summary(rows) == [
        (0, 3, 3, round(three, 6)), (1, 4, 3, round(three, 6)), (2, 5, 3, round(three, 6)),
        (3, -1, 0, round(r + GAMMA * r + GAMMA**2 * last, 6)),  # the window reaches the final step: terminal
        (4, -1, 0, round(r + GAMMA * last, 6)), (5, -1, 0, last),
    ]
    assert rows.ignore_steps.tolist() == [3, 3, 3, 3, 2, 1]
    assert rows.window_final.tolist() == [False, False, False, True, True, True]


def test_an_n_step_window_stops_before_a_censoring_response() -> None:
    tracker = tracker_of(n_steps=3)
    rows, _ = feed(tracker, [ev(1, 0), ev(1, 1), ev(1, 2, action="review")])
    assert summary(rows)[:2] == [(0, 2, 2, round(-0.05 + GAMMA * -0.05, 6)), (1, 2, 1, -0.05)]


def test_a_window_that_needs_steps_not_seen_yet_waits_for_them() -> None:
    tracker = tracker_of(n_steps=3)
    assert feed(tracker, [ev(1, 0), ev(1, 1), ev(1, 2)])[0].size == 0
    rows, _ = feed(tracker, [ev(1, 3)])
    assert summary(rows) == [(0, 3, 3, round(-0.05 * (1 + GAMMA + GAMMA**2), 6))]


def test_the_sandbox_starting_another_episode_ends_the_previous_one_in_a_later_batch() -> None:
    tracker = tracker_of()
    feed(tracker, [ev(1, 0), ev(1, 1)])
    rows, _ = feed(tracker, [ev(2, 0)])
    assert summary(rows) == [(1, -1, 0, -1.0)]  # its last step counts as final: -(0.5 + s)
    assert tracker.open_episodes == 1


def test_the_sandbox_starting_another_episode_in_the_same_batch_ends_the_previous_one() -> None:
    tracker = tracker_of()
    rows, rejects = feed(tracker, [ev(1, 0), ev(1, 1), ev(2, 0), ev(1, 2)])
    assert rejects == [(3, REASON_EPISODE_CLOSED)]
    assert summary(rows) == [(0, 1, 1, -0.05), (1, -1, 0, -1.0)]
    assert tracker.open_episodes == 1


def test_events_after_final_in_the_same_batch_are_rejected() -> None:
    tracker = tracker_of()
    rows, rejects = feed(tracker, [ev(1, 0, final=True), ev(1, 1), ev(1, 2)])
    assert rejects == [(1, REASON_EPISODE_CLOSED), (2, REASON_EPISODE_CLOSED)]
    assert summary(rows) == [(0, -1, 0, -1.0)]


@pytest.mark.parametrize(("malicious", "final_reward"), [(True, -1.3), (False, 0.5)])
def test_idle_timeout_ends_the_episode_with_the_last_step_as_final(
    malicious: bool, final_reward: float
) -> None:
    tracker = tracker_of(idle_timeout=10.0)
    feed(tracker, [ev(1, 0, is_malicious=malicious, severity=0.8 if malicious else 0.0)], now=100.0)
    assert tracker.expire(110.0).all_rows.size == 0
    assert tracker.open_episodes == 1
    expired = tracker.expire(110.5)
    assert summary(expired.all_rows) == [(0, -1, 0, final_reward)]
    assert [f.label.malicious for f in expired.finished] == [malicious]
    assert feed(tracker, [ev(1, 1)])[1] == [(0, REASON_EPISODE_CLOSED)]


def test_duplicates_and_out_of_order_steps_are_rejected() -> None:
    tracker = tracker_of()
    _, rejects = feed(tracker, [ev(1, 0), ev(1, 2), ev(1, 2), ev(1, 1)])
    assert rejects == [(2, REASON_DUPLICATE), (3, REASON_OUT_OF_ORDER)]
    rows, rejects = feed(tracker, [ev(1, 2), ev(1, 0), ev(1, 3)])
    assert rejects == [(0, REASON_DUPLICATE), (1, REASON_OUT_OF_ORDER)]
    assert summary(rows) == [(2, 3, 1, -0.05)]  # step 0's row came with the first batch


def test_events_of_a_closed_episode_are_rejected() -> None:
    tracker = tracker_of()
    feed(tracker, [ev(1, 0, final=True)])
    rows, rejects = feed(tracker, [ev(1, 1), ev("1", 2), ev(1, 0, sandbox="other")])
    assert rejects == [(0, REASON_EPISODE_CLOSED), (1, REASON_EPISODE_CLOSED)]  # 1 and "1": the same episode
    assert rows.size == 0
    assert tracker.open_episodes == 1


def test_an_unlabelled_episode_waits_for_its_label_then_yields_its_rows() -> None:
    tracker = tracker_of()
    rows, _ = feed(tracker, [unlabelled(1, 0), unlabelled(1, 1)])
    assert rows.size == 0
    episode = tracker.episode(("sb", "1"))
    assert episode is not None
    assert episode.waiting.size == 2
    emitted = tracker.label(episode, Label(False, 0.0, "verdict", 0), over=False)
    assert summary(emitted.all_rows) == [(0, 1, 1, 0.0)]
    rows, _ = feed(tracker, [unlabelled(1, 2, final=True)])
    assert summary(rows) == [(1, 2, 1, 0.0), (2, -1, 0, 0.5)]


def test_an_unlabelled_episode_that_ends_waits_over() -> None:
    tracker = tracker_of()
    observed = tracker.observe(columns_of([unlabelled(1, 0), unlabelled(1, 1, final=True)]),
                               np.zeros(2, np.int64), 0.0)
    (waiting,) = observed.emitted.unlabelled
    emitted = tracker.label(waiting, Label(True, 0.9, "verdict", 0), over=True)
    assert summary(emitted.all_rows) == [(0, 1, 1, -0.09), (1, -1, 0, -1.4)]
    assert [f.label.source for f in emitted.finished] == ["verdict"]


def test_rows_relabelled_in_place_equal_rows_built_with_the_new_label() -> None:
    def build(malicious: bool, severity: float) -> ReplayRows:
        tracker = tracker_of(n_steps=3)
        events = [ev(1, s, is_malicious=malicious, severity=severity) for s in range(4)]
        events += [ev(1, 4, is_malicious=malicious, severity=severity, final=True, action="review",
                      reward=0.3)]
        return feed(tracker, events)[0]

    before, after = build(True, 0.9), build(False, 0.0)
    values, known = relabel_rewards(before, False, 0.0, TABLE, GAMMA)
    np.testing.assert_allclose(values, after.rewards, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(known, after.known)


def test_drop_partitions_forgets_their_open_episodes() -> None:
    tracker = tracker_of()
    feed(tracker, [ev(1, 0, sandbox="a"), ev(2, 0, sandbox="b"), ev(3, 0, sandbox="c")], partitions=[0, 1, 0])
    assert tracker.drop_partitions({0}) == 2
    assert tracker.open_episodes == 1
    assert len(tracker.close_all().finished) == 1
    assert tracker.open_episodes == 0


def through_checkpoint(state: TrackerState) -> TrackerState:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=TrackerState)


def test_state_round_trip_continues_identically() -> None:
    first = [ev(1, 0, sandbox="a"), ev(1, 1, sandbox="a"), unlabelled(2, 0, sandbox="b"),
             ev(3, 0, sandbox="c")]
    second = [ev(1, 2, sandbox="a"), unlabelled(2, 1, sandbox="b", final=True), ev(4, 0, sandbox="c"),
              ev(3, 1, sandbox="c")]
    original = tracker_of(n_steps=2)
    feed(original, first)
    restored = tracker_of(n_steps=2)
    restored.load_state(through_checkpoint(original.state()), now=0.0)
    assert restored.open_episodes == original.open_episodes == 3
    outcomes = []
    for tracker in (original, restored):
        rows, rejects = feed(tracker, second)
        final = tracker.close_all()
        all_rows = ReplayRows.concat([rows, final.all_rows])
        outcomes.append((rejects, summary(all_rows), [e.key for e in final.unlabelled],
                         b"".join(np.ascontiguousarray(c).tobytes() for c in all_rows)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == [(3, REASON_EPISODE_CLOSED)]  # episode 3 of c ended when c started episode 4


def test_the_held_out_window_survives_a_checkpoint() -> None:
    """The publish gate's evaluation episodes are part of the state, so a restart keeps gating."""
    original = tracker_of(holdout_fraction=0.5, holdout_keep=4)
    pushed = 0
    for episode in range(40):
        rows, _ = feed(original, [ev(episode, s, sandbox=f"s{episode}", final=s == 2,
                                     is_malicious=episode % 2 == 0) for s in range(3)])
        pushed += rows.size
    assert len(original.holdout) == 4  # the most recent ones, up to holdout_keep
    assert 0 < pushed < 40 * 3  # held-out episodes are never learned from
    restored = tracker_of(holdout_fraction=0.5, holdout_keep=4)
    restored.load_state(through_checkpoint(original.state()), now=0.0)
    assert [(h.malicious, h.severity) for h in restored.holdout] == [(h.malicious, h.severity)
                                                                      for h in original.holdout]
    for before, after in zip(original.holdout, restored.holdout, strict=True):
        assert after.features.dtype == np.float32
        np.testing.assert_array_equal(after.features, before.features)
