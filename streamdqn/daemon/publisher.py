"""The publish component: every interval, gate the learner's current weights on held-out episodes,
export and check them, publish a snapshot, and announce it.

An idle stream publishes nothing new: without new updates or events the same weights would be
exported and gated again. The final publish on stop always happens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamdqn.daemon.ingestor import BROKER_CALL_TIMEOUT_SECONDS, Ingestor, describe_broker_error
from streamdqn.learning.model import QNetwork
from streamdqn.learning.runners import LearnedCounts, LearnerRunner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.logs import log_event
from streamdqn.snapshots.export import Provenance, publish_snapshot
from streamdqn.snapshots.gate import LoggedDecisions, PublishGate
from streamdqn.snapshots.layout import CANARY, STABLE, Channel
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.snapshots.store import Signer, Snapshot, SnapshotStore
from streamdqn.stream.episodes import HeldOutEpisode
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import RESPONSES, EpisodeBatch, metrics_of, replay
from streamdqn.stream.wire import Action


@dataclass
class PublishedState:
    """What the health view reports about publishing."""

    version: int = 0
    published_at: float = 0.0
    rejected: int = 0
    failures: int = 0


class Publisher:
    def __init__(
        self,
        store: SnapshotStore,
        rejected: SnapshotStore,
        runner: LearnerRunner,
        ingestor: Ingestor,
        gate: PublishGate | None,
        learner_settings: LearnerSettings,
        rewards: RewardTable,
        *,
        interval_seconds: float,
        min_updates: int,
        device: str,
        signer: Signer | None,
        snapshot_topic: bool,
        base_url: Callable[[], str],
        canary: bool = False,
        counts: Callable[[], LearnedCounts] | None = None,
        active: bool = True,
        observe_seconds: Callable[[float], None] = lambda s: None,
    ) -> None:
        """`counts`: what the snapshots were learned from (default: this daemon's own counters; in a
        group, the sums over its ranks). `active` False: publish nothing (the ranks other than 0)."""
        self.store = store
        self.rejected_store = rejected
        self.runner = runner
        self.ingestor = ingestor
        self.gate = gate
        self.learner_settings = learner_settings
        self.rewards = rewards
        self.interval_seconds = interval_seconds
        self.min_updates = min_updates
        self.device = device
        self.signer = signer
        self.snapshot_topic = snapshot_topic
        self.base_url = base_url
        self.canary = canary  # passing candidates go to the canary channel once a stable exists
        self.counts = counts or self._own_counts
        self.active = active
        self.observe_seconds = observe_seconds
        self.state = PublishedState()
        latest = store.latest_version()
        if latest is not None:
            self.state.version = latest
            self.state.published_at = store.read(latest).manifest.created_at
        # (updates, events consumed) at the last gated or published snapshot.
        self._last_progress: tuple[int, int] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        if not self.active:
            await stop.wait()
            return
        while not stop.is_set():
            await asyncio.sleep(self.interval_seconds)
            await self.publish()

    def _own_counts(self) -> LearnedCounts:
        pipeline = self.ingestor.pipeline
        c = pipeline.counters
        return LearnedCounts(c.events_consumed, c.transitions, pipeline.normalizer.count)

    async def publish(self, *, final: bool = False) -> bool:
        stats = self.runner.stats()
        if not self.active or stats.updates < self.min_updates:
            return False
        learned = self.counts()
        progress = (stats.updates, learned.events)
        if progress == self._last_progress and not final:
            return False
        started = time.perf_counter()
        weights, _ = self.runner.weights()
        provenance = Provenance(stats.updates, learned.events, learned.transitions, learned.normalizer_count,
                                self.learner_settings.as_dict(), self.device)
        held_out = list(self.ingestor.pipeline.tracker.holdout) if self.gate is not None else []
        try:
            snapshot, passed = await asyncio.to_thread(self._export, weights, provenance, held_out)
        except Exception as exc:  # noqa: BLE001 - a failed export is counted and logged; the daemon goes on
            self.state.failures += 1
            log_event("snapshot failed", error=repr(exc)[:500])
            return False
        self._last_progress = progress
        if not passed:
            self.state.rejected += 1
            log_event("snapshot rejected", candidate=str(snapshot.path),
                      reason=snapshot.manifest.evaluation["gate"], updates=stats.updates, final=final)
            return False
        seconds = time.perf_counter() - started
        self.observe_seconds(seconds)
        self.state.version = snapshot.version
        self.state.published_at = snapshot.manifest.created_at
        log_event("snapshot published", version=snapshot.version, sha256=snapshot.manifest.sha256,
                  updates=stats.updates, seconds=round(seconds, 3), final=final)
        await self._announce(snapshot)
        return True

    def _export(
        self, weights: dict[str, torch.Tensor], provenance: Provenance, held_out: Sequence[HeldOutEpisode]
    ) -> tuple[Snapshot, bool]:
        """Gate, export, check and publish (in a worker thread). Returns (snapshot, passed the gate)."""
        q = QNetwork(FEATURE_DIM, len(Action), self.learner_settings.hidden,
                     dueling=self.learner_settings.dueling)
        q.load_state_dict(weights)
        q.eval()
        passed, evaluation = self._gate_candidate(q, held_out)
        probe = np.random.default_rng(0).normal(size=(64, FEATURE_DIM)).astype(np.float32) * 3
        if not passed:
            snapshot = publish_snapshot(self.rejected_store, q, probe, provenance, rewards=self.rewards,
                                        evaluation=evaluation, signer=self.signer, channel=None)
            return snapshot, False
        channel: Channel = CANARY if self.canary and self.store.latest_version() is not None else STABLE
        snapshot = publish_snapshot(self.store, q, probe, provenance, rewards=self.rewards,
                                    evaluation=evaluation, signer=self.signer, channel=channel)
        return snapshot, True

    def _gate_candidate(self, q: QNetwork, held_out: Sequence[HeldOutEpisode]) -> tuple[bool, dict[str, Any]]:
        gate = self.gate
        if gate is None:
            return True, {"gate": "off"}
        if len(held_out) < gate.min_episodes:
            return True, {"gate": f"skipped: {len(held_out)} held-out episodes < {gate.min_episodes}"}

        def candidate(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                q_values = q(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
                actions: np.ndarray = q_values.argmax(1).numpy()
            return actions

        batch = EpisodeBatch.of(held_out)
        ours = replay(candidate(batch.features), batch, self.rewards)
        theirs = None
        stable = self.store.latest_version()
        if stable is not None:
            policy = OnnxPolicy(self.store.path_of(stable) / "model.onnx")
            theirs = replay(policy(batch.features), batch, self.rewards)
        responded = np.isin(ours.action, RESPONSES)
        verdict = gate.judge_policies(
            ours.returns, None if theirs is None else theirs.returns,
            candidate_false_positives=int((responded & ~batch.malicious).sum()),
            benign_episodes=int((~batch.malicious).sum()),
            candidate_missed=int(((ours.first_response < 0) & batch.malicious).sum()),
            malicious_episodes=int(batch.malicious.sum()),
            logged=logged_decisions(held_out, candidate, self.rewards),
        )
        return verdict.passed, {"gate": verdict.reason, "held_out_episodes": len(held_out),
                                "candidate": metrics_of(ours, batch).as_dict(),
                                "stable": metrics_of(theirs, batch).as_dict() if theirs is not None else None,
                                "bounds": verdict.as_dict()}

    async def _announce(self, snapshot: Snapshot) -> None:
        base = self.base_url()
        await self.announce(json.dumps({
            "version": snapshot.version, "sha256": snapshot.manifest.sha256,
            "url": f"{base}/snapshots/{snapshot.version}/model.onnx",
            "manifest_url": f"{base}/snapshots/{snapshot.version}/manifest.json",
            "channel": snapshot.channel,  # None: held, stable is pinned
        }).encode())

    async def announce(self, payload: bytes) -> None:
        """A message on the snapshot topic (when there is one); a failure is logged, never raised."""
        sink = self.ingestor.sink
        if sink is None or not self.snapshot_topic:
            return
        try:
            await asyncio.wait_for(sink.announce(payload), timeout=BROKER_CALL_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - an announcement is informational: log and go on
            log_event("snapshot announcement failed", error=describe_broker_error(exc))


def logged_decisions(
    held_out: Sequence[HeldOutEpisode], candidate: Callable[[np.ndarray], np.ndarray], rewards: RewardTable
) -> LoggedDecisions | None:
    """The held-out steps where a deployed policy logged its action with a probability, with each
    action's one-step reward and what the candidate would have done there (None when there are none).

    Censored episodes (the deployed policy responded, so the detonation stopped) contribute the steps
    up to and including that response: what a later decision would have earned is unknown, and the
    estimate is per decision, not per episode, so nothing is imputed for the steps never seen.
    """
    parts = []
    for e in held_out:
        if e.action is None or e.action_prob is None:
            continue
        logged = (e.action >= 0) & np.isfinite(e.action_prob)
        if not logged.any():
            continue
        index = np.flatnonzero(logged)
        final = index == len(e.action) - 1
        n = len(index)
        reward = rewards.rewards(e.action[index].astype(np.int64), np.full(n, e.malicious),
                                 np.full(n, e.severity), final)
        parts.append((e.action[index].astype(np.int64), e.action_prob[index].astype(np.float64), reward,
                      candidate(e.features[index])))
    if not parts:
        return None
    actions, probabilities, reward_values, chosen = (np.concatenate(c) for c in zip(*parts, strict=True))
    return LoggedDecisions(actions, probabilities, reward_values, chosen)

