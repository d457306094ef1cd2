"""The rollout component: promote the canary to stable, or demote it, from what it did in production.

Sandboxes in the canary share act with the canary's snapshot and log its version (`policy_version`);
once their verdicts are joined, the pipeline counts each version's outcomes (streamdqn.stream.outcomes).
Every `interval_seconds`:

    demote   as soon as the Clopper-Pearson *lower* bound of the canary's false-positive rate (benign
             episodes it contained, terminated or quarantined) is above the limit: the evidence says it
             is worse than allowed. Stable is untouched.
    promote  once the canary has `promote_after_episodes` labelled episodes, the *upper* bound of its
             false-positive rate is within the limit, and the lower bound of its mean return minus
             stable's (normal approximation on the two independent samples of episodes) is above
             -return_tolerance.
    wait     otherwise.
    hold     promotion is due but stable is pinned (`streamdqn snapshots pin`): nothing changes until it
             is unpinned, logged once (`canary promotion held: stable is pinned`). Demotion still works.

Each change is logged (`channel promoted`, `channel demoted`) and announced on the snapshot topic.

The same step measures drift for the metrics: the PSI of each feature of recent traffic against the
normalizer's moments (streamdqn.stream.drift), and the share of each action the stable snapshot takes
on that recent traffic.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from streamdqn.errors import SnapshotError
from streamdqn.logs import log_event
from streamdqn.snapshots.channels import ChannelRecord
from streamdqn.snapshots.layout import MODEL_FILE
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.snapshots.stats import clopper_pearson_lower, clopper_pearson_upper
from streamdqn.snapshots.store import SnapshotStore
from streamdqn.stream.drift import psi
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.outcomes import PolicyOutcomes, VersionOutcomes
from streamdqn.stream.wire import ACTION_NAMES


@dataclass(frozen=True)
class RolloutRules:
    promote_after_episodes: int
    max_false_positive_rate: float
    return_tolerance: float
    confidence: float = 0.95


@dataclass(frozen=True)
class Decision:
    action: Literal["promote", "demote", "wait", "hold"]
    reason: str


def judge_canary(canary: VersionOutcomes, stable: VersionOutcomes, rules: RolloutRules) -> Decision:
    fp, benign = canary.counts["false_positive"], canary.benign
    limit = rules.max_false_positive_rate
    if benign and clopper_pearson_lower(fp, benign, rules.confidence) > limit:
        low = clopper_pearson_lower(fp, benign, rules.confidence)
        return Decision("demote", f"false-positive rate {fp}/{benign}: lower bound {low:.3f} > {limit}")
    n = canary.episodes
    if n < rules.promote_after_episodes:
        return Decision("wait", f"{n} of {rules.promote_after_episodes} labelled canary episodes")
    if not benign:
        return Decision("wait", "no benign canary episode yet: its false-positive rate is unknown")
    upper = clopper_pearson_upper(fp, benign, rules.confidence)
    if upper > limit:
        return Decision("wait", f"false-positive rate {fp}/{benign}: upper bound {upper:.3f} > {limit}")
    lower = return_difference_lower_bound(canary, stable, rules.confidence)
    if lower is not None and lower < -rules.return_tolerance:
        return Decision("wait", f"return vs stable: lower bound {lower:+.3f} < {-rules.return_tolerance}")
    shown = "no stable episodes to compare" if lower is None else f"return vs stable >= {lower:+.3f}"
    return Decision("promote", f"{n} episodes, false-positive upper bound {upper:.3f}, {shown}")


def return_difference_lower_bound(a: VersionOutcomes, b: VersionOutcomes, confidence: float) -> float | None:
    """Lower bound of mean(a) - mean(b) (independent episodes, normal approximation); None without two
    episodes on each side."""
    va, vb, ma, mb = a.return_variance(), b.return_variance(), a.mean_return(), b.mean_return()
    if va is None or vb is None or ma is None or mb is None:
        return None
    z = statistics.NormalDist().inv_cdf(confidence)
    return (ma - mb) - z * math.sqrt(va / a.episodes + vb / b.episodes)


class RecentTraffic(NamedTuple):
    features: np.ndarray  # float32 [N, 30]: the most recent feature vectors
    mean: np.ndarray  # the normalizer's
    std: np.ndarray


@dataclass
class Drift:
    psi: np.ndarray = field(default_factory=lambda: np.zeros(FEATURE_DIM))
    action_share: dict[str, float] = field(default_factory=dict)  # of the stable snapshot, on recent traffic


class Rollout:
    def __init__(
        self,
        store: SnapshotStore,
        outcomes: Callable[[], PolicyOutcomes],
        rules: RolloutRules,
        announce: Callable[[bytes], Awaitable[None]],
        recent: Callable[[], RecentTraffic],
        *,
        interval_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.outcomes = outcomes
        self.rules = rules
        self.announce = announce
        self.recent = recent
        self.interval_seconds = interval_seconds
        self.promoted = 0
        self.demoted = 0
        self.drift = Drift()
        # What the channels served at the last reading (the metrics show it; no file reads per scrape).
        self.channels = store.channels()
        self._policy: tuple[int, OnnxPolicy] | None = None
        self._held: tuple[int, int] | None = None  # (canary, stable pin) last logged as held

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.interval_seconds)
            await self.step()

    async def step(self) -> Decision | None:
        channels = self.channels = await asyncio.to_thread(self.store.channels)
        traffic = self.recent()  # on the loop, which owns the pipeline
        self.drift = await asyncio.to_thread(self._measure_drift, channels.stable, traffic)
        return await self._judge(channels)

    def _measure_drift(self, stable: int | None, traffic: RecentTraffic) -> Drift:
        share: dict[str, float] = {}
        if stable is not None and len(traffic.features):
            if self._policy is None or self._policy[0] != stable:
                self._policy = (stable, OnnxPolicy(self.store.path_of(stable) / MODEL_FILE))
            actions = self._policy[1](traffic.features)
            counts = np.bincount(actions, minlength=len(ACTION_NAMES))
            share = {name: float(c / len(actions)) for name, c in zip(ACTION_NAMES, counts, strict=True)}
        return Drift(psi(traffic.features, traffic.mean, traffic.std), share)

    async def _judge(self, channels: ChannelRecord) -> Decision | None:
        canary = channels.canary
        if canary is None:
            return None
        outcomes = self.outcomes()
        decision = judge_canary(outcomes.of(canary), outcomes.of(channels.stable), self.rules)
        if decision.action == "promote" and channels.stable_pin is not None:
            return self._hold(canary, channels.stable_pin, decision)
        if channels.stable_pin is None:
            self._held = None  # a later pin logs its hold again
        if decision.action == "wait":
            return decision
        try:
            if decision.action == "promote":
                self.channels = await asyncio.to_thread(self.store.promote, canary, actor="rollout",
                                                        reason=decision.reason)
                self.promoted += 1
            else:
                self.channels = await asyncio.to_thread(self.store.demote, actor="rollout",
                                                        reason=decision.reason)
                self.demoted += 1
        except SnapshotError as exc:  # an operator changed the channels meanwhile: judge again next time
            log_event("channel change skipped", version=canary, action=decision.action, error=str(exc))
            return None
        event = "channel promoted" if decision.action == "promote" else "channel demoted"
        log_event(event, version=canary, stable_before=channels.stable, reason=decision.reason)
        await self.announce(json.dumps({"event": event.split()[1], "version": canary,
                                        "stable_before": channels.stable,
                                        "reason": decision.reason}).encode())
        return decision

    def _hold(self, canary: int, pinned: int, due: Decision) -> Decision:
        if self._held != (canary, pinned):
            self._held = (canary, pinned)
            log_event("canary promotion held: stable is pinned", version=canary, stable_pin=pinned,
                      reason=due.reason)
        return Decision("hold", f"stable is pinned to {pinned}; promotion due: {due.reason}")
