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
from streamdqn.learning.runners import LearnerRunner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.logs import log_event
from streamdqn.snapshots.export import Provenance, publish_snapshot
from streamdqn.snapshots.gate import PublishGate
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.snapshots.store import Signer, Snapshot, SnapshotStore
from streamdqn.stream.episodes import HeldOutEpisode
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import evaluate_rows
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
        observe_seconds: Callable[[float], None] = lambda s: None,
    ) -> None:
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
        self.observe_seconds = observe_seconds
        self.state = PublishedState()
        latest = store.latest_version()
        if latest is not None:
            self.state.version = latest
            self.state.published_at = store.read(latest).manifest.created_at
        # (updates, events consumed) at the last gated or published snapshot.
        self._last_progress: tuple[int, int] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.interval_seconds)
            await self.publish()

    async def publish(self, *, final: bool = False) -> bool:
        stats = self.runner.stats()
        if stats.updates < self.min_updates:
            return False
        counters = self.ingestor.pipeline.counters
        progress = (stats.updates, counters.events_consumed)
        if progress == self._last_progress and not final:
            return False
        started = time.perf_counter()
        weights, _ = self.runner.weights()
        provenance = Provenance(stats.updates, counters.events_consumed, counters.transitions,
                                self.ingestor.pipeline.normalizer.count, self.learner_settings.as_dict(),
                                self.device)
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
        store = self.store if passed else self.rejected_store
        snapshot = publish_snapshot(store, q, probe, provenance, rewards=self.rewards, evaluation=evaluation,
                                    signer=self.signer)
        return snapshot, passed

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

        metrics = evaluate_rows(candidate, held_out, self.rewards)
        current = None
        latest = self.store.latest_version()
        if latest is not None:
            current = evaluate_rows(OnnxPolicy(self.store.path_of(latest) / "model.onnx"), held_out,
                                    self.rewards)
        passed, why = gate.check(metrics, current)
        return passed, {"gate": why, "held_out_episodes": len(held_out), "candidate": metrics.as_dict(),
                        "latest": current.as_dict() if current else None}

    async def _announce(self, snapshot: Snapshot) -> None:
        sink = self.ingestor.sink
        if sink is None or not self.snapshot_topic:
            return
        base = self.base_url()
        payload = json.dumps({"version": snapshot.version, "sha256": snapshot.manifest.sha256,
                              "url": f"{base}/snapshots/{snapshot.version}/model.onnx",
                              "manifest_url": f"{base}/snapshots/{snapshot.version}/manifest.json"}).encode()
        try:
            await asyncio.wait_for(sink.announce(payload), timeout=BROKER_CALL_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - an announcement is informational: log and go on
            log_event("snapshot announcement failed", error=describe_broker_error(exc))
