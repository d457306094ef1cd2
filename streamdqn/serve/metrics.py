"""Prometheus metrics on an injected CollectorRegistry. Only this module imports prometheus_client.

Totals and gauges are read at scrape time from a `MetricsSnapshot` that the daemon builds from its
restored, checkpointed counters (so a restart does not double-count); the four histograms observe
values as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from streamdqn.stream.wire import REASON_DECODE, REASON_VALIDATION

# Reported at 0 before the first bad verdict, so that dashboards and alerts have a series to read.
VERDICT_REASONS = {REASON_DECODE: 0, REASON_VALIDATION: 0}

@dataclass(frozen=True)
class MetricsSnapshot:
    events_consumed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    transitions: int = 0
    episodes: int = 0
    replay_size: int = 0
    replay_capacity: int = 0
    updates: int = 0
    samples_per_insert: float = 0.0
    target_samples_per_insert: float = 0.0
    ingest_paused: bool = False
    loss: float = float("nan")
    td_error_abs: float = float("nan")
    q_max_mean: float = float("nan")
    consumer_lag: dict[tuple[str, int], int] = field(default_factory=dict)
    verdicts_consumed: int = 0
    verdicts_rejected: dict[str, int] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)  # source -> episodes
    unlabelled_expired: int = 0
    verdicts_orphaned: int = 0
    verdicts_revised: dict[str, int] = field(default_factory=dict)  # when -> revisions
    label_disagreements: int = 0
    rows_relabelled: int = 0
    pending_episodes: int = 0
    waiting_verdicts: int = 0
    snapshot_version: int = 0
    snapshot_published: float = 0.0
    snapshot_rejected: int = 0
    snapshot_failures: int = 0
    checkpoint_failures: int = 0
    event_loop_lag: float = 0.0
    broker_connected: bool = False
    partitions_assigned: int = 0
    build: dict[str, str] = field(default_factory=dict)
    policy_episodes: dict[tuple[str, str], int] = field(default_factory=dict)  # (version, outcome)
    channels: dict[str, int] = field(default_factory=dict)  # channel -> version (0: none)
    stable_pinned: int = 0  # the version stable is pinned to (0: not pinned)
    channel_changes: dict[str, int] = field(default_factory=dict)  # promoted / demoted
    feature_drift: dict[str, float] = field(default_factory=dict)  # feature -> PSI
    action_share: dict[str, float] = field(default_factory=dict)  # the stable policy's, on recent traffic


class _SnapshotCollector(Collector):
    def __init__(self, read: Callable[[], MetricsSnapshot]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        s = self.read()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"streamdqn_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"streamdqn_{name}", doc, value=value)

        def labelled_counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
            family = CounterMetricFamily(f"streamdqn_{name}", doc, labels=[label])
            for key, n in sorted(values.items()):
                family.add_metric([key], n)
            return family

        def labelled_gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"streamdqn_{name}", doc, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            return family

        yield counter("events_consumed", "Valid telemetry events ingested (events, not messages).",
                      s.events_consumed)
        rejected = CounterMetricFamily("streamdqn_events_rejected", "Bad events and undecodable messages.",
                                       labels=["reason"])
        for reason, n in sorted(s.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield counter("events_dead_lettered", "Records written to the dead-letter topic.", s.dead_lettered)
        yield counter("transitions", "Replay rows pushed (one per learned step, with every action's target).",
                      s.transitions)
        yield counter("episodes", "Episodes finished and labelled.", s.episodes)
        yield counter("verdicts_consumed", "Valid verdicts read from the verdicts topic.",
                      s.verdicts_consumed)
        yield labelled_counter("verdicts_rejected", "Bad verdicts and undecodable verdict messages.",
                               "reason", {**VERDICT_REASONS, **s.verdicts_rejected})
        yield labelled_counter("episodes_labelled", "Episodes finished with a label, by its source.",
                               "source", {"inline": 0, "verdict": 0, **s.labelled})
        yield counter("episodes_unlabelled_expired", "Episodes over that no verdict reached in time.",
                      s.unlabelled_expired)
        yield counter("verdicts_orphaned", "Verdicts whose episode never arrived in time.",
                      s.verdicts_orphaned)
        yield labelled_counter("verdicts_revised", "Newer revisions of a verdict, before or after its join.",
                               "when", {"before_join": 0, "after_join": 0, **s.verdicts_revised})
        yield counter("label_disagreements", "Episodes whose inline label and verdict differ.",
                      s.label_disagreements)
        yield counter("rows_relabelled", "Replay rows whose rewards a later verdict changed.",
                      s.rows_relabelled)
        yield gauge("pending_episodes", "Episodes over and waiting for their verdict.", s.pending_episodes)
        yield gauge("waiting_verdicts", "Verdicts waiting for their episode's telemetry.", s.waiting_verdicts)
        yield counter("learner_updates", "DQN gradient updates.", s.updates)
        yield counter("snapshot_rejected", "Candidate snapshots refused by the publish gate.",
                      s.snapshot_rejected)
        yield counter("snapshot_failures", "Snapshot exports or publishes that failed.", s.snapshot_failures)
        yield counter("checkpoint_failures", "Checkpoint writes that failed.", s.checkpoint_failures)
        yield gauge("replay_size", "Transitions in the replay buffer.", s.replay_size)
        yield gauge("replay_capacity", "Replay buffer capacity.", s.replay_capacity)
        yield gauge("learner_samples_per_insert", "Replay ratio achieved: rows sampled per row inserted.",
                    s.samples_per_insert)
        yield gauge("learner_target_samples_per_insert",
                    "Replay ratio the learner aims at (updates_per_transition x batch size).",
                    s.target_samples_per_insert)
        yield gauge("ingest_paused", "1 while fetching is paused for the learner (min_samples_per_insert).",
                    1.0 if s.ingest_paused else 0.0)
        yield gauge("learner_loss", "Huber TD loss of the last update.", s.loss)
        yield gauge("learner_td_error_abs", "Mean |TD error| of the last update's batch.", s.td_error_abs)
        yield gauge("learner_q_max_mean", "Mean max-Q of the last update's batch.", s.q_max_mean)
        lag = GaugeMetricFamily("streamdqn_consumer_lag", "High watermark minus position, per partition.",
                                labels=["topic", "partition"])
        for (topic, partition), value in sorted(s.consumer_lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield gauge("snapshot_version", "Version of the latest published snapshot.", s.snapshot_version)
        yield gauge("snapshot_published_timestamp_seconds",
                    "When the latest snapshot was published (epoch s).", s.snapshot_published)
        yield gauge("event_loop_lag_seconds", "How late the event loop ran a 0.5 s timer, last measurement.",
                    s.event_loop_lag)
        yield gauge("broker_connected", "1 when the Kafka broker answered the last metadata request.",
                    1.0 if s.broker_connected else 0.0)
        yield gauge("partitions_assigned", "Partitions of the telemetry topic assigned to this member.",
                    s.partitions_assigned)
        outcomes = CounterMetricFamily("streamdqn_policy_episodes",
                                       "Labelled episodes by the policy_version that acted and the outcome.",
                                       labels=["version", "outcome"])
        for (version, outcome), n in sorted(s.policy_episodes.items()):
            outcomes.add_metric([version, outcome], n)
        yield outcomes
        yield labelled_gauge("channel_version", "Snapshot version each channel serves (0: none).", "channel",
                             s.channels)
        yield gauge("stable_pinned_version", "Version an operator pinned stable to (0: none).",
                    s.stable_pinned)
        yield labelled_counter("channel_changes", "Canary promotions and demotions by the rollout.",
                               "action", {"promoted": 0, "demoted": 0, **s.channel_changes})
        yield labelled_gauge("feature_drift_psi",
                             "Population stability index of recent traffic against the normalizer.",
                             "feature", s.feature_drift)
        yield gauge("feature_drift_psi_max", "The largest per-feature PSI.",
                    max(s.feature_drift.values(), default=0.0))
        yield labelled_gauge("policy_action_share",
                             "Share of each action the stable snapshot takes on recent traffic.", "action",
                             s.action_share)
        info = GaugeMetricFamily("streamdqn_build_info", "Build information.", labels=sorted(s.build))
        info.add_metric([s.build[k] for k in sorted(s.build)], 1.0)
        yield info


class DaemonMetrics:
    """The daemon's metrics on its own registry (never the global one)."""

    def __init__(
        self, read: Callable[[], MetricsSnapshot], registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.registry.register(_SnapshotCollector(read))
        self.verdict_delay_seconds = Histogram(
            "streamdqn_verdict_delay_seconds", "Verdict time minus the episode's last event time.",
            buckets=(1, 10, 60, 300, 1800, 3600, 6 * 3600, 86_400, 7 * 86_400), registry=self.registry,
        )
        self.episode_return = Histogram(
            "streamdqn_episode_return", "Return of finished episodes under what the sandbox did (its logged "
            "actions; ignore where none were logged).",
            buckets=(-2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5), registry=self.registry,
        )
        self.ingest_batch_seconds = Histogram(
            "streamdqn_ingest_batch_seconds", "Time to process one fetched batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=self.registry,
        )
        self.snapshot_export_seconds = Histogram(
            "streamdqn_snapshot_export_seconds", "Export + check + parity + publish of a snapshot.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=self.registry,
        )
        self.checkpoint_seconds = Histogram(
            "streamdqn_checkpoint_seconds", "Time to write a checkpoint.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
