"""The health view: what /metrics, /healthz and /readyz report, read from the components at request time."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from streamdqn import __version__
from streamdqn.daemon.checkpointer import Checkpointer
from streamdqn.daemon.ingestor import Ingestor
from streamdqn.daemon.publisher import Publisher
from streamdqn.daemon.ranks import Role
from streamdqn.daemon.rollout import Rollout
from streamdqn.daemon.watchdog import Watchdog
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.runners import LearnerRunner
from streamdqn.serve.metrics import MetricsSnapshot
from streamdqn.stream.features import FEATURE_NAMES


class HealthView:
    def __init__(
        self,
        ingestor: Ingestor,
        runner: LearnerRunner,
        replay: ReplayBuffer,
        publisher: Publisher,
        checkpointer: Checkpointer,
        watchdog: Watchdog,
        rollout: Rollout,
        *,
        batch_size: int,
        updates_per_transition: float,
        device: str,
        publish_interval_seconds: float,
        role: Role | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.runner = runner
        self.replay = replay
        self.publisher = publisher
        self.checkpointer = checkpointer
        self.watchdog = watchdog
        self.rollout = rollout
        self.batch_size = batch_size
        self.updates_per_transition = updates_per_transition
        self.role = role or Role()
        self.build = {"version": __version__, "torch": torch.__version__, "device": device,
                      "rank": str(self.role.rank), "world_size": str(self.role.world_size)}
        self.publish_interval_seconds = publish_interval_seconds
        self.started = time.time()

    def metrics(self) -> MetricsSnapshot:
        stats = self.runner.stats()
        pipeline = self.ingestor.pipeline
        c = pipeline.counters
        join = pipeline.join.counters if pipeline.join is not None else None
        published = self.publisher.state
        channels = self.rollout.channels
        return MetricsSnapshot(
            events_consumed=c.events_consumed, rejected=dict(c.rejected), dead_lettered=c.dead_lettered,
            transitions=c.transitions, episodes=c.episodes, replay_size=len(self.replay),
            replay_capacity=self.replay.capacity, updates=stats.updates,
            samples_per_insert=stats.updates * self.batch_size / max(1, c.transitions),
            target_samples_per_insert=self.updates_per_transition * self.batch_size,
            ingest_paused=self.ingestor.paused,
            loss=stats.loss, td_error_abs=stats.td_error_abs, q_max_mean=stats.q_max_mean,
            consumer_lag=self.ingestor.lag(),
            verdicts_consumed=join.verdicts_consumed if join else 0,
            verdicts_rejected=dict(c.verdicts_rejected),
            labelled={"inline": join.labelled_inline, "verdict": join.labelled_by_verdict} if join else
            {"inline": c.episodes},
            unlabelled_expired=join.unlabelled_expired if join else c.unlabelled_expired,
            verdicts_orphaned=join.orphaned if join else 0,
            verdicts_revised={"before_join": join.revised_before_join, "after_join": join.revised_after_join}
            if join else {},
            label_disagreements=join.disagreements if join else 0,
            rows_relabelled=join.relabelled_rows if join else 0,
            pending_episodes=pipeline.join.pending_episodes if pipeline.join is not None else 0,
            waiting_verdicts=pipeline.join.waiting_verdicts if pipeline.join is not None else 0,
            snapshot_version=published.version, snapshot_published=published.published_at,
            snapshot_rejected=published.rejected, snapshot_failures=published.failures,
            checkpoint_failures=self.checkpointer.failures, event_loop_lag=self.watchdog.loop_lag,
            broker_connected=self.watchdog.broker_connected,
            partitions_assigned=self.ingestor.partitions_assigned(), build=self.build,
            policy_episodes={(version, outcome): n for version, stats in pipeline.outcomes.versions.items()
                             for outcome, n in stats.counts.items()},
            channels={"stable": channels.stable or 0, "canary": channels.canary or 0},
            stable_pinned=channels.stable_pin or 0,
            channel_changes={"promoted": self.rollout.promoted, "demoted": self.rollout.demoted},
            feature_drift={name: float(v) for name, v in zip(FEATURE_NAMES, self.rollout.drift.psi,
                                                             strict=True)},
            action_share=dict(self.rollout.drift.action_share),
        )

    def health(self) -> dict[str, Any]:
        return {"status": "alive", "uptime_seconds": round(time.time() - self.started, 1)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        limit = 3 * self.publish_interval_seconds
        now = time.time()
        published = self.publisher.state.published_at
        fresh = (now - published < limit) if published else (now - self.started < limit)
        checks = {
            "broker_connected": self.watchdog.broker_connected,
            "partitions_assigned": self.ingestor.partitions_assigned() > 0,
            "learner_running": self.runner.alive(),
            "snapshot_fresh": fresh,
        }
        stats = self.runner.stats()
        identity = {"rank": self.role.rank, "world_size": self.role.world_size, "updates": stats.updates,
                    "weights_sha256": self.weights_sha256()}
        return all(checks.values()), {**checks, **identity}

    def weights_sha256(self) -> str:
        """Of the acting network's weights as the learner last handed them out: equal on every rank of a
        group at the same update (they publish at the same update counts)."""
        weights, _ = self.runner.weights()
        digest = hashlib.sha256()
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
