"""Wiring: settings in, a Server of components out. The one place that reads the whole configuration;
every component gets the explicit values it needs.

`build()` restores the newest checkpoint (it may read hundreds of MB): call it off the event loop,
e.g. `await asyncio.to_thread(build, settings)`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamdqn.config import Settings
from streamdqn.daemon.checkpointer import Checkpointer
from streamdqn.daemon.handover import read_handovers
from streamdqn.daemon.health import HealthView
from streamdqn.daemon.ingestor import Backpressure, Ingestor
from streamdqn.daemon.publisher import Publisher
from streamdqn.daemon.ranks import Role, StateLayout, group_settings, http_port
from streamdqn.daemon.rollout import RecentTraffic, Rollout, RolloutRules
from streamdqn.daemon.sdnotify import SystemdNotifier
from streamdqn.daemon.server import HttpBinding, Server
from streamdqn.daemon.state import DaemonState, offsets_for_log
from streamdqn.daemon.watchdog import Watchdog
from streamdqn.kafka.admin import ensure_copartitioned, ensure_topics
from streamdqn.kafka.options import KafkaOptions
from streamdqn.kafka.sink import KafkaSink
from streamdqn.kafka.source import KafkaSource
from streamdqn.learning.checkpoints import CheckpointStore, LoadedCheckpoint
from streamdqn.learning.distributed import GroupSettings
from streamdqn.learning.learner import DQNLearner, resolve_device
from streamdqn.learning.replay.buffer import ReplayBuffer, make_replay
from streamdqn.learning.runners import LearnerRunner, ProcessRunner, RunnerOptions, ThreadRunner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.logs import log_event
from streamdqn.serve.app import build_app
from streamdqn.serve.metrics import DaemonMetrics
from streamdqn.snapshots.gate import PublishGate
from streamdqn.snapshots.signing import load_signer
from streamdqn.snapshots.store import SnapshotStore
from streamdqn.stream.episodes import EpisodeTracker, Finished
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.join import VerdictJoin
from streamdqn.stream.outcomes import PolicyOutcomes
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions, RateLimiter
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.rows import relabel_rewards
from streamdqn.stream.sources import MemorySink, Partition, PartitionsCallback, RecordSink, RecordSource
from streamdqn.stream.wire import Action

log = logging.getLogger("streamdqn.daemon")
ALONE = Role()


def kafka_options(s: Settings, role: Role = ALONE) -> KafkaOptions:
    """A rank of a group is a static member: when every rank restarts after a failure, none of them
    leaves the group (static members send no LeaveGroup) and each gets its partitions back, where
    all members leaving at once made tansu 0.6 keep the departed leader and stall the group for good."""
    k = s.kafka
    return KafkaOptions(
        bootstrap_servers=k.bootstrap_servers, topic=k.topic, group_id=k.group_id, dlq_topic=k.dlq_topic,
        snapshot_topic=k.snapshot_topic, verdicts_topic=k.verdicts_topic, client_id=k.client_id,
        security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_plain_username,
        sasl_plain_password=k.sasl_plain_password.get_secret_value(), ssl_cafile=k.ssl_cafile,
        ssl_certfile=k.ssl_certfile, ssl_keyfile=k.ssl_keyfile, max_poll_records=k.max_poll_records,
        fetch_max_bytes=k.fetch_max_bytes, max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        session_timeout_ms=k.session_timeout_ms,
        group_instance_id="" if role.alone else f"{k.group_id}-rank-{role.rank}",
    )


@dataclass
class KafkaClients:
    """The Kafka consumer and producer; the consumer seeks to `offsets` (the checkpoint's) on assignment."""

    options: KafkaOptions
    offsets: dict[Partition, int]
    on_revoked: PartitionsCallback | None = None
    alone: bool = True  # no other rank is configured: a shrunk assignment means a stray consumer
    handed_over: Callable[[], Mapping[Partition, int]] | None = None  # the other ranks' checkpoints
    bootstrap_servers: str = field(init=False)

    def __post_init__(self) -> None:
        self.bootstrap_servers = self.options.bootstrap_servers

    async def open(self) -> tuple[RecordSource, RecordSink]:
        o = self.options
        await ensure_topics(o, {o.dlq_topic: 1, o.snapshot_topic: 1})
        if o.verdicts_topic:
            await ensure_copartitioned(o, o.topic, o.verdicts_topic)
        sink = KafkaSink(o)
        await sink.start()
        source = KafkaSource(o, on_revoked=self.on_revoked, handed_over=self.handed_over)

        async def assigned(partitions: set[int]) -> None:
            log_event("partitions assigned", partitions=sorted(partitions))
            if self.alone:
                warn_if_sharing(partitions, source.topic_partitions(), o.topic, o.group_id)

        source.on_assigned = assigned
        source.start_offsets = self.offsets
        try:
            await source.start()
        except BaseException:
            await sink.stop()
            raise
        return source, sink


@dataclass
class GivenClients:
    """A source and sink handed in (tests, tools); the source resumes at the checkpoint's offsets."""

    source: RecordSource
    sink: RecordSink
    offsets: dict[Partition, int]
    bootstrap_servers: str = "(in memory)"

    async def open(self) -> tuple[RecordSource, RecordSink]:
        self.source.start_offsets = self.offsets
        await self.sink.start()
        await self.source.start()
        return self.source, self.sink


def warn_if_sharing(assigned: set[int], total: int | None, topic: str, group: str) -> bool:
    """A single daemon (no other rank configured) that is assigned only part of the topic shares its
    consumer group with another member: a second daemon started by mistake on the same group, or an old
    one still running. Each would learn from half the stream and publish its own snapshots."""
    if total is None or len(assigned) >= total:
        return False
    log.warning(
        "only %d of the %d partitions of %s are assigned to this daemon: another consumer is in group %r. "
        "If a second streamdqn runs with this group id, stop it or give it another kafka.group_id; a "
        "daemon learns from, checkpoints and publishes only what it is assigned.",
        len(assigned), total, topic, group)
    return True


def build(settings: Settings, source: RecordSource | None = None, sink: RecordSink | None = None) -> Server:
    """The daemon for `settings`, restored from its newest checkpoint; Kafka unless a source is given."""
    s = settings
    torch.set_num_threads(max(1, s.learner.torch_threads))
    group = group_settings(s.distributed, os.environ)
    role = Role.of(group)
    layout = StateLayout.of(Path(s.state.dir), role)
    learning = s.learner  # the config section extends LearnerSettings: used as it is
    if group is not None:  # a captured graph could not run the gradient all-reduce in the middle
        learning = learning.model_copy(update={"cuda_graph": False})
    device = resolve_device(s.learner.device)
    process_mode = s.learner.mode == "process" and device.type == "cpu"
    rewards = RewardTable()
    # Loaded now so that a missing or unreadable key stops the start with a clear error.
    signer = load_signer(s.publish.signing, s.publish.signing_key_file)
    checkpoints = CheckpointStore(layout.checkpoints, keep=s.checkpoint.keep)
    checkpoint = checkpoints.load_latest()

    lock = ProcessRunner.make_lock() if process_mode else None
    replay = make_replay(s.replay.capacity, device, prioritized=learning.prioritized,
                         alpha=learning.priority_alpha, beta=learning.priority_beta, shared=process_mode,
                         lock=lock)
    learner = DQNLearner(learning, FEATURE_DIM, len(Action), clip=s.episodes.feature_clip)
    pipeline = _pipeline(s, rewards, replay)
    offsets: dict[Partition, int] = {}
    if checkpoint is not None:
        _restore(checkpoint, learner, pipeline, replay, offsets)
    n = pipeline.normalizer
    learner.set_normalization(n.mean, n.std, n.clip)
    runner = _runner(s, learning, learner, replay, lock, process_mode, group)
    runner.note_ingested(pipeline.counters.transitions, pipeline.counters.events_consumed)
    runner.set_normalization(n.mean, n.std, n.count)

    clients: KafkaClients | GivenClients
    if source is not None:
        clients = GivenClients(source, sink if sink is not None else MemorySink(), offsets)
    else:
        handed_over = None if role.alone else lambda: read_handovers(layout.other_handovers())
        clients = KafkaClients(kafka_options(s, role), offsets, alone=role.alone, handed_over=handed_over)
    ingestor = Ingestor(
        pipeline, clients, runner,
        Backpressure(s.learner.min_samples_per_insert, learning.batch_size, s.replay.min_size),
        replay.__len__, offsets=offsets, poll_timeout_ms=s.kafka.poll_timeout_ms,
        broker_retry_max_seconds=s.lifecycle.broker_retry_max_seconds, topic=s.kafka.topic,
        observe_batch_seconds=lambda t: metrics.ingest_batch_seconds.observe(t),
        observe_verdict_delay=lambda t: metrics.verdict_delay_seconds.observe(t),
    )
    snapshots = SnapshotStore(layout.snapshots, keep=s.publish.keep)

    publisher = Publisher(
        snapshots, SnapshotStore(layout.rejected, keep=s.publish.keep), runner, ingestor,
        _gate(s), learning, rewards, interval_seconds=s.publish.interval_seconds,
        min_updates=s.publish.min_updates, device=str(device), signer=signer,
        snapshot_topic=bool(s.kafka.snapshot_topic), base_url=lambda: base_url(s, server.http_port),
        canary=s.rollout.canary_fraction > 0, counts=None if role.alone else runner.group_counts,
        active=role.publishes, observe_seconds=lambda t: metrics.snapshot_export_seconds.observe(t),
    )
    checkpointer = Checkpointer(
        checkpoints, ingestor, runner, replay, interval_seconds=s.checkpoint.interval_seconds,
        include_replay=s.checkpoint.include_replay, history_dir=layout.own, batch_size=learning.batch_size,
        snapshot_version=lambda: publisher.state.version,
        observe_seconds=lambda t: metrics.checkpoint_seconds.observe(t),
        handover=None if role.alone else layout.handover,
    )
    # Only rank 0 changes channels; the other ranks see no outcomes (so never judge), and measure drift.
    rollout = Rollout(snapshots, (lambda: pipeline.outcomes) if role.publishes else PolicyOutcomes,
                      RolloutRules(s.rollout.promote_after_episodes, s.publish.gate_max_false_positive_rate,
                                   s.publish.gate_return_tolerance, s.rollout.confidence),
                      publisher.announce,
                      lambda: RecentTraffic(pipeline.recent.recent().copy(), pipeline.normalizer.mean,
                                            pipeline.normalizer.std),
                      interval_seconds=s.rollout.check_interval_seconds)
    notifier = SystemdNotifier()
    watchdog = Watchdog(runner, ingestor, notifier,
                        progress_timeout_seconds=s.lifecycle.progress_timeout_seconds)
    health = HealthView(ingestor, runner, replay, publisher, checkpointer, watchdog, rollout,
                        batch_size=learning.batch_size,
                        updates_per_transition=s.learner.updates_per_transition, device=str(device),
                        publish_interval_seconds=s.publish.interval_seconds, role=role)
    metrics = DaemonMetrics(health.metrics)

    def observe_return(finished: Finished) -> None:
        if not finished.holdout:
            metrics.episode_return.observe(finished.logged_return)

    pipeline.on_finished = observe_return

    async def on_revoked(partitions: set[int]) -> None:
        dropped = await ingestor.drop_partitions(partitions)
        log_event("partitions revoked", partitions=sorted(partitions), open_episodes_dropped=dropped)
        await checkpointer.save(revoked=partitions)

    if isinstance(clients, KafkaClients):
        clients.on_revoked = on_revoked
    app = build_app(snapshots_dir=snapshots.root, render_metrics=metrics.render, health=health.health,
                    ready=health.ready, token=s.http.token.get_secret_value(),
                    protect_metrics=s.http.protect_metrics, canary_fraction=s.rollout.canary_fraction,
                    admin_token=s.http.admin_token.get_secret_value())
    # base_url (above) reads server.http_port once the server has bound its port.
    server = Server(ingestor, checkpointer, publisher, rollout, watchdog, health, runner,
                    HttpBinding(app, s.http.host, http_port(s.http.port, os.environ)), notifier,
                    stop_timeout_seconds=s.lifecycle.stop_timeout_seconds)
    return server


def _gate(s: Settings) -> PublishGate | None:
    p = s.publish
    if not p.gate:
        return None
    return PublishGate(p.gate_min_episodes, p.gate_return_tolerance, p.gate_max_false_positive_rate,
                       p.gate_max_missed_rate)


def base_url(s: Settings, port: int | None) -> str:
    return s.http.public_url or f"http://{s.http.host}:{port}"


def _pipeline(s: Settings, rewards: RewardTable, replay: ReplayBuffer) -> IngestPipeline:
    gamma = s.learner.gamma
    tracker = EpisodeTracker(rewards, gamma=gamma, n_steps=s.learner.n_steps,
                             idle_timeout=s.episodes.idle_timeout_seconds, reward_clip=s.episodes.reward_clip,
                             holdout_fraction=s.publish.gate_holdout_fraction if s.publish.gate else 0.0,
                             holdout_keep=s.publish.gate_episodes)

    def relabel(episode: int, malicious: bool, severity: float) -> int:
        """A revised (or overriding) verdict: recompute the episode's rows still in replay, in place."""
        index = replay.find_episode(episode)
        if len(index) == 0:
            return 0
        values, known = relabel_rewards(replay.read(index), malicious, severity, rewards, gamma)
        replay.write_rewards(index, values, known)
        return len(index)

    join = None
    if s.kafka.verdicts_topic:
        join = VerdictJoin(tracker, relabel, wait_seconds=s.verdicts.wait_seconds,
                           max_pending=s.verdicts.max_pending_episodes)
    limiter = None
    if s.ingest.rate_limit_events_per_second > 0:
        limiter = RateLimiter(s.ingest.rate_limit_events_per_second, s.ingest.rate_limit_burst)
    return IngestPipeline(
        tracker, RunningNormalizer(FEATURE_DIM, clip=s.episodes.feature_clip), replay.push,
        PipelineOptions(s.ingest.max_message_bytes, s.ingest.max_events_per_message,
                        s.kafka.rate_limit_key, s.kafka.rate_limit_header),
        limiter, join=join, verdicts_topic=s.kafka.verdicts_topic,
    )


def _restore(
    checkpoint: LoadedCheckpoint, learner: DQNLearner, pipeline: IngestPipeline, replay: ReplayBuffer,
    offsets: dict[Partition, int],
) -> None:
    state = DaemonState.from_checkpoint(checkpoint.state, str(checkpoint.path))
    learner.load_state_dict(state.learner)
    pipeline.load_state(state.stream, time.monotonic())
    if state.replay is not None:
        replay.load_state_dict(state.replay)
    offsets.update(state.offsets)
    log_event("checkpoint restored", path=str(checkpoint.path), offsets=offsets_for_log(offsets),
              events_consumed=pipeline.counters.events_consumed, updates=learner.counters.updates)


def _runner(
    s: Settings, learning: LearnerSettings, learner: DQNLearner, replay: ReplayBuffer, lock: object,
    process_mode: bool, group: GroupSettings | None,
) -> LearnerRunner:
    options = RunnerOptions(
        FEATURE_DIM, len(Action), min_size=s.replay.min_size,
        updates_per_transition=s.learner.updates_per_transition, torch_threads=s.learner.torch_threads,
        feature_clip=s.episodes.feature_clip, nice=s.learner.process_nice, group=group,
    )
    if process_mode:
        return ProcessRunner(learning, learner.state_dict(), replay, lock, options,
                             learner.online.state_dict(), learner.counters.updates)
    return ThreadRunner(learner, replay, options)


async def serve(settings: Settings) -> int:
    """Build off the event loop, then run until stopped: what `streamdqn run` does."""
    import asyncio

    server = await asyncio.to_thread(build, settings)
    return await server.serve()
