"""The rollout: promotion and demotion of a canary from per-version outcomes, on a real snapshot store
with real ONNX snapshots; drift measured on recent traffic."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from streamdqn.daemon.rollout import (
    RecentTraffic,
    Rollout,
    RolloutRules,
    judge_canary,
    return_difference_lower_bound,
)
from streamdqn.snapshots.layout import CANARY
from streamdqn.snapshots.store import SnapshotStore
from streamdqn.stream.outcomes import PolicyOutcomes, VersionOutcomes
from streamdqn.stream.wire import Action
from tests.factories import publish_small

RULES = RolloutRules(promote_after_episodes=100, max_false_positive_rate=0.2, return_tolerance=0.05)
CONTAIN, NONE = int(Action.CONTAIN), -1


def outcomes(version: str, *, benign: int, false_positives: int, malicious: int, detected: int,
             mean_return: float, spread: float = 0.2, seed: int = 0) -> PolicyOutcomes:
    """`benign` + `malicious` labelled episodes of `version` with these outcomes and returns."""
    out = PolicyOutcomes()
    rng = np.random.default_rng(seed)
    for i in range(benign):
        first = CONTAIN if i < false_positives else NONE
        out.observe(version, first, False, mean_return + spread * rng.normal())
    for i in range(malicious):
        out.observe(version, CONTAIN if i < detected else NONE, True, mean_return + spread * rng.normal())
    return out


def merged(*parts: PolicyOutcomes) -> PolicyOutcomes:
    out = PolicyOutcomes()
    for p in parts:
        out.versions.update(p.versions)
    return out


def test_a_clear_false_positive_breach_demotes_early_and_a_good_canary_waits_then_promotes() -> None:
    stable = outcomes("1", benign=100, false_positives=5, malicious=100, detected=90, mean_return=0.4).of(1)
    # 12 of 20 benign episodes responded to: far above 0.2 even at 20 episodes (well before 100).
    bad = outcomes("2", benign=20, false_positives=12, malicious=0, detected=0, mean_return=0.0).of(2)
    decision = judge_canary(bad, stable, RULES)
    assert decision.action == "demote"
    assert "lower bound" in decision.reason
    # 2 of 20: the rate is fine but there is not enough evidence yet.
    young = outcomes("2", benign=20, false_positives=2, malicious=20, detected=18, mean_return=0.4).of(2)
    assert judge_canary(young, stable, RULES).action == "wait"
    good = outcomes("2", benign=100, false_positives=5, malicious=100, detected=92, mean_return=0.42,
                    seed=1).of(2)
    decision = judge_canary(good, stable, RULES)
    assert decision.action == "promote", decision.reason


def test_a_canary_with_a_worse_return_or_an_uncertain_rate_is_not_promoted() -> None:
    stable = outcomes("1", benign=100, false_positives=5, malicious=100, detected=90, mean_return=0.4).of(1)
    worse = outcomes("2", benign=100, false_positives=5, malicious=100, detected=90, mean_return=0.2,
                     seed=2).of(2)
    decision = judge_canary(worse, stable, RULES)
    assert decision.action == "wait"
    assert "return vs stable" in decision.reason
    # 18 % observed: not a breach (no demotion) but its upper bound is above 0.2 (no promotion).
    borderline = outcomes("2", benign=100, false_positives=18, malicious=100, detected=90, mean_return=0.4,
                          seed=3).of(2)
    decision = judge_canary(borderline, stable, RULES)
    assert decision.action == "wait"
    assert "upper bound" in decision.reason


def test_the_return_bound_matches_a_hand_computation() -> None:
    a, b = VersionOutcomes(), VersionOutcomes()
    for v in (1.0, 2.0, 3.0):
        a.counts["missed"] += 1
        a.returns_sum += v
        a.returns_sq += v * v
    for v in (0.0, 1.0):
        b.counts["missed"] += 1
        b.returns_sum += v
        b.returns_sq += v * v
    # means 2 and 0.5, variances 1 and 0.5, z(0.95) = 1.6449.
    expected = 1.5 - 1.6448536269514722 * np.sqrt(1 / 3 + 0.5 / 2)
    assert return_difference_lower_bound(a, b, 0.95) == pytest.approx(expected)
    assert return_difference_lower_bound(a, VersionOutcomes(), 0.95) is None


class Announced:
    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []

    async def __call__(self, payload: bytes) -> None:
        self.messages.append(json.loads(payload))


def run_step(rollout: Rollout) -> object:
    return asyncio.run(rollout.step())


def traffic() -> RecentTraffic:
    features = np.random.default_rng(0).normal(size=(500, 30)).astype(np.float32)
    return RecentTraffic(features, np.zeros(30), np.ones(30))


def a_canary_better_than_stable(tmp_path: Path) -> tuple[SnapshotStore, int, int, PolicyOutcomes]:
    """A store with a stable and a canary, and evidence on which the canary is due for promotion."""
    store = SnapshotStore(tmp_path / "snapshots")
    stable = publish_small(store, seed=1).version
    canary = publish_small(store, seed=2, channel=CANARY).version
    evidence = merged(
        outcomes(str(stable), benign=100, false_positives=5, malicious=100, detected=90, mean_return=0.4),
        outcomes(str(canary), benign=100, false_positives=4, malicious=100, detected=93, mean_return=0.42,
                 seed=4),
    )
    return store, stable, canary, evidence


def test_rollout_promotes_and_demotes_in_the_store_and_announces(tmp_path: Path) -> None:
    store, _stable, canary, evidence = a_canary_better_than_stable(tmp_path)
    announced = Announced()
    rollout = Rollout(store, lambda: evidence, RULES, announced, traffic, interval_seconds=0.01)
    decision = run_step(rollout)
    assert getattr(decision, "action", None) == "promote"
    channels = store.channels()
    assert (channels.stable, channels.canary) == (canary, None)
    assert announced.messages[-1]["event"] == "promoted"
    assert announced.messages[-1]["version"] == canary
    assert rollout.promoted == 1
    # The drift step ran: PSI per feature of standard-normal traffic against N(0, 1) is small, and the
    # stable policy's action shares sum to one.
    assert rollout.drift.psi.shape == (30,)
    assert rollout.drift.psi.max() < 0.2
    assert sum(rollout.drift.action_share.values()) == pytest.approx(1.0)

    # A bad canary is taken out, and stable stays what it was.
    bad = publish_small(store, seed=3, channel=CANARY).version
    evidence.versions.update(outcomes(str(bad), benign=30, false_positives=20, malicious=0, detected=0,
                                      mean_return=-0.5).versions)
    decision = run_step(rollout)
    assert getattr(decision, "action", None) == "demote"
    channels = store.channels()
    assert (channels.stable, channels.canary) == (canary, None)
    assert announced.messages[-1]["event"] == "demoted"
    # Nothing more to judge: no canary.
    assert run_step(rollout) is None


def test_a_pinned_stable_holds_promotion_logged_once_and_demotion_still_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, stable, canary, evidence = a_canary_better_than_stable(tmp_path)
    store.pin_stable(stable, actor="operator")
    announced = Announced()
    rollout = Rollout(store, lambda: evidence, RULES, announced, traffic, interval_seconds=0.01)
    with caplog.at_level("INFO", logger="streamdqn.daemon"):
        decisions = [run_step(rollout) for _ in range(3)]
    assert [getattr(d, "action", None) for d in decisions] == ["hold"] * 3
    assert f"stable is pinned to {stable}" in str(getattr(decisions[0], "reason", ""))
    held = [r for r in caplog.records if r.getMessage() == "canary promotion held: stable is pinned"]
    assert len(held) == 1
    assert (store.channels().stable, store.channels().canary) == (stable, canary)
    assert (rollout.promoted, announced.messages) == (0, [])

    # A bad canary is still demoted while stable is pinned, and the pin stays.
    bad = publish_small(store, seed=3, channel=CANARY).version
    evidence.versions.update(outcomes(str(bad), benign=30, false_positives=20, malicious=0, detected=0,
                                      mean_return=-0.5).versions)
    assert getattr(run_step(rollout), "action", None) == "demote"
    record = store.channels()
    assert (record.stable, record.canary, record.stable_pin) == (stable, None, stable)

    # Unpinned, the next good canary is promoted.
    good = publish_small(store, seed=4, channel=CANARY).version
    evidence.versions.update(outcomes(str(good), benign=100, false_positives=4, malicious=100, detected=93,
                                      mean_return=0.42, seed=5).versions)
    store.unpin_stable()
    assert getattr(run_step(rollout), "action", None) == "promote"
    assert store.channels().stable == good


def test_a_pin_taken_between_the_judgement_and_the_promotion_wins(tmp_path: Path) -> None:
    store, stable, canary, evidence = a_canary_better_than_stable(tmp_path)

    def pin_then_report() -> PolicyOutcomes:
        store.pin_stable(stable, actor="operator")  # the operator pins while the rollout is judging
        return evidence

    rollout = Rollout(store, pin_then_report, RULES, Announced(), traffic, interval_seconds=0.01)
    assert run_step(rollout) is None  # the store refused the promotion under its lock
    record = store.channels()
    assert (record.stable, record.canary, record.stable_pin, rollout.promoted) == (stable, canary, stable, 0)
