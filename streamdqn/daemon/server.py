"""The online-learning daemon: the one place everything is wired, and its lifecycle.

    signals -> restore checkpoint -> HTTP up -> connect to Kafka (retrying) -> learner starts
    -> tasks: ingest | publish timer | checkpoint timer | housekeeping (watchdog, lag, weights)
    -> on SIGTERM/SIGINT: stop fetching, finish the batch, final checkpoint and snapshot, commit, exit 0

The event loop owns I/O and the ingest stage; the learner runs in a thread or a process and shares
only the replay buffer. Checkpoints hold the Kafka offsets their state corresponds to, so after a
crash the events since the last checkpoint are read again: nothing lost, nothing learned twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdqn import __version__
from streamdqn.config import Settings
from streamdqn.daemon.sdnotify import SystemdNotifier
from streamdqn.history import HistoryPoint, append_history
from streamdqn.kafka.source import KafkaOptions, KafkaSource, ensure_topics
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.learning.learner import ActingPolicy, DQNLearner, LearnerSettings, resolve_device
from streamdqn.learning.model import QNetwork
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.runners import LearnerRunner, ProcessRunner, RunnerOptions, ThreadRunner
from streamdqn.logs import last_kafka_error
from streamdqn.serve.app import build_app, start_http, stop_http
from streamdqn.serve.metrics import DaemonMetrics, MetricsSnapshot
from streamdqn.snapshots.gate import PublishGate
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.snapshots.signing import load_signer
from streamdqn.snapshots.store import SnapshotStore, publish_snapshot
from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import FEATURE_DIM, FeatureSpec, RunningNormalizer
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions, RateLimiter
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import evaluate_rows
from streamdqn.stream.sources import DeadLetter, RecordSource
from streamdqn.stream.wire import ACTION_NAMES, Action

log = logging.getLogger("streamdqn.daemon.server")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_LEARNER_DIED = 70
EXIT_STALLED = 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings us back

# Bound on an offset commit or a snapshot announcement. aiokafka waits for a hung or restarting
# coordinator indefinitely, and both are only informational (the offsets that count are in the
# checkpoint), so they must not hold up the next checkpoint, publish or the shutdown.
BROKER_CALL_TIMEOUT_SECONDS = 5.0


# A poll batch keeps its parsed records and events alive together; at CPython's default gen-0
# threshold (700) the collector rescans them, and all the daemon holds, many times per batch.
GC_THRESHOLDS = (20_000, 50, 1_000)


def tune_gc() -> None:
    """Freeze what startup allocated (never rescanned again) and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def learner_settings(s: Settings) -> LearnerSettings:
    c = s.learner
    return LearnerSettings(
        hidden=tuple(c.hidden), lr=c.lr, weight_decay=c.weight_decay, gamma=c.gamma, batch_size=c.batch_size,
        target_update_interval=c.target_update_interval, tau=c.tau, grad_clip=c.grad_clip,
        double_dqn=c.double_dqn, epsilon_start=c.epsilon_start, epsilon_end=c.epsilon_end,
        epsilon_decay_steps=c.epsilon_decay_steps, explore_ignore_probability=c.explore_ignore_probability,
        device=c.device, cuda_graph=c.cuda_graph, seed=c.seed,
    )


def kafka_options(s: Settings) -> KafkaOptions:
    k = s.kafka
    return KafkaOptions(
        bootstrap_servers=k.bootstrap_servers, topic=k.topic, group_id=k.group_id, dlq_topic=k.dlq_topic,
        snapshot_topic=k.snapshot_topic, client_id=k.client_id, security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_plain_username,
        sasl_plain_password=k.sasl_plain_password.get_secret_value(), ssl_cafile=k.ssl_cafile,
        ssl_certfile=k.ssl_certfile, ssl_keyfile=k.ssl_keyfile, max_poll_records=k.max_poll_records,
        fetch_max_bytes=k.fetch_max_bytes, max_partition_fetch_bytes=k.max_partition_fetch_bytes,
    )


def _describe_broker_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer from the broker within {BROKER_CALL_TIMEOUT_SECONDS:g} s"
    return repr(exc)[:300]


def _log_commit_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log_event("offset commit failed", error=_describe_broker_error(task.exception()))  # type: ignore[arg-type]


def log_event(event: str, **fields: Any) -> None:
    """One structured log line: `event` plus fields (rendered as JSON keys with --log json)."""
    log.info(event, extra={"fields": fields})


@dataclass
class _Health:
    started: float
    last_progress: float
    broker_connected: bool = False
    loop_lag: float = 0.0
    snapshot_version: int = 0
    snapshot_published: float = 0.0
    snapshot_rejected: int = 0
    snapshot_failures: int = 0
    checkpoint_failures: int = 0
    fatal: int | None = None


class DeadLettersPending(Exception):
    """A stop was requested while dead letters still waited for the broker."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} dead letters unacknowledged")
        self.count = count


class Daemon:
    """`streamdqn run`: settings in, exit code out."""

    def __init__(self, settings: Settings, source: RecordSource | None = None) -> None:
        self.settings = settings
        s = settings
        self.state_dir = Path(s.state.dir)
        self.snapshots = SnapshotStore(self.state_dir / "snapshots", keep=s.publish.keep)
        self.checkpoints = CheckpointStore(self.state_dir / "checkpoints", keep=s.checkpoint.keep)
        self.learner_settings = learner_settings(s)
        self.device = resolve_device(s.learner.device)
        self.process_mode = s.learner.mode == "process" and self.device.type == "cpu"
        self.rewards = RewardTable()
        # Loaded now so that a missing or unreadable key stops the start with a clear error.
        self.signer = load_signer(s.publish.signing, s.publish.signing_key_file)
        self.gate = PublishGate(s.publish.gate_min_episodes, s.publish.gate_return_tolerance,
                                s.publish.gate_max_false_positive_rate, s.publish.gate_max_missed_rate)
        self.rejected = SnapshotStore(self.state_dir / "rejected", keep=s.publish.keep)
        self.offsets: dict[int, int] = {}
        self._external_source = source
        self.source: RecordSource | None = source
        self.stop_event = asyncio.Event()
        self.health = _Health(started=time.time(), last_progress=time.monotonic())
        self.notifier = SystemdNotifier()
        self._ingest_lock = asyncio.Lock()
        self._commit_task: asyncio.Task[None] | None = None
        self._signals = 0
        # (updates, events consumed) at the last gated or published snapshot: nothing new, nothing to export.
        self._last_publish: tuple[int, int] | None = None
        self._resume_from_last_checkpoint = False  # set when stopping left a batch unacknowledged
        self._returns_since_history: list[float] = []
        self.runner: LearnerRunner | None = None
        self.replay: ReplayBuffer | None = None
        self.pipeline: IngestPipeline | None = None
        self.http_port: int | None = None
        self.metrics = DaemonMetrics(self._metrics_snapshot)

    # ---------------------------------------------------------------- wiring
    def _build(self) -> None:
        s = self.settings
        checkpoint = self.checkpoints.load_latest()
        state = checkpoint.state if checkpoint else None
        lock = ProcessRunner.make_lock() if self.process_mode else None
        self.replay = ReplayBuffer(s.replay.capacity, FEATURE_DIM, self.device, shared=self.process_mode,
                                   lock=lock)
        learner = DQNLearner(self.learner_settings, FEATURE_DIM, len(Action), clip=s.episodes.feature_clip)
        policy = ActingPolicy(self.learner_settings, FEATURE_DIM, len(Action), clip=s.episodes.feature_clip)
        tracker = EpisodeTracker(self.rewards, idle_timeout=s.episodes.idle_timeout_seconds,
                                 reward_clip=s.episodes.reward_clip,
                                 holdout_fraction=s.publish.gate_holdout_fraction if s.publish.gate else 0.0,
                                 holdout_keep=s.publish.gate_episodes)
        limiter = None
        if s.ingest.rate_limit_events_per_second > 0:
            limiter = RateLimiter(s.ingest.rate_limit_events_per_second, s.ingest.rate_limit_burst)
        self.pipeline = IngestPipeline(
            tracker, RunningNormalizer(FEATURE_DIM, clip=s.episodes.feature_clip), policy, self._push,
            PipelineOptions(s.ingest.max_message_bytes, s.ingest.max_events_per_message,
                            s.kafka.rate_limit_key, s.kafka.rate_limit_header),
            limiter,
        )
        if state is not None:
            learner.load_state_dict(state["learner"])
            self.pipeline.load_state_dict(state["pipeline"], time.monotonic())
            if "replay" in state:
                self.replay.load_state_dict(state["replay"])
            self.offsets.update({int(p): int(o) for p, o in state["offsets"].items()})
            log_event("checkpoint restored", path=str(checkpoint.path),  # type: ignore[union-attr]
                      offsets=self.offsets, events_consumed=self.pipeline.counters.events_consumed,
                      updates=learner.counters.updates)
        policy.load_weights(learner.online.state_dict(), -1)
        n = self.pipeline.normalizer
        learner.set_normalization(n.mean, n.std, n.clip)
        options = RunnerOptions(
            FEATURE_DIM, len(Action), min_size=s.replay.min_size,
            updates_per_transition=s.learner.updates_per_transition, torch_threads=s.learner.torch_threads,
            feature_clip=s.episodes.feature_clip,
        )
        if self.process_mode:
            self.runner = ProcessRunner(
                self.learner_settings, learner.state_dict(), self.replay, lock, options,
                learner.online.state_dict(), learner.counters.updates,
            )
        else:
            self.runner = ThreadRunner(learner, self.replay, options)
        self.runner.note_inserted(self.pipeline.counters.transitions)
        self.runner.set_normalization(n.mean, n.std)
        latest = self.snapshots.latest_version()
        if latest is not None:
            self.health.snapshot_version = latest
            self.health.snapshot_published = self.snapshots.read(latest).manifest.get("created_at", 0.0)

    def _push(self, batch: TransitionBatch) -> None:
        assert self.replay is not None
        self.replay.push(batch.states, batch.actions, batch.rewards, batch.next_states, batch.dones)
        for r in batch.episode_returns:
            self.metrics.episode_return.observe(r)
        self._returns_since_history += batch.episode_returns

    # ---------------------------------------------------------------- lifecycle
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.error("second %s: exiting now without a final checkpoint", signal.Signals(sig).name)
            os._exit(EXIT_FAILURE)
        log_event("shutdown requested", signal=signal.Signals(sig).name)
        self.stop_event.set()

    async def _serve(self) -> int:
        s = self.settings
        torch.set_num_threads(max(1, s.learner.torch_threads))
        await asyncio.to_thread(self._build)
        app = build_app(
            snapshots_dir=self.snapshots.root, render_metrics=self.metrics.render, health=self._health_info,
            ready=self._ready, token=s.http.token.get_secret_value(), protect_metrics=s.http.protect_metrics,
        )
        http_runner, self.http_port = await start_http(app, s.http.host, s.http.port)
        log_event("http listening", host=s.http.host, port=self.http_port)
        tasks: list[asyncio.Task[Any]] = []
        try:
            if not await self._connect():
                return EXIT_OK  # asked to stop before the broker ever answered
            assert self.runner is not None
            self.runner.start()
            tune_gc()
            log_event("learner started", mode="process" if self.process_mode else "thread",
                      device=str(self.device))
            self.notifier.ready(f"consuming {s.kafka.topic}")
            tasks = [
                asyncio.create_task(self._ingest_loop(), name="ingest"),
                asyncio.create_task(self._every(s.publish.interval_seconds, self.publish), name="publish"),
                asyncio.create_task(self._every(s.checkpoint.interval_seconds, self.checkpoint),
                                    name="checkpoint"),
                asyncio.create_task(self._housekeeping(), name="housekeeping"),
            ]
            stop_wait = asyncio.create_task(self.stop_event.wait())
            done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    log.error("task %s failed: %r", task.get_name(), task.exception())
                    self.health.fatal = self.health.fatal or EXIT_FAILURE
            if self.health.fatal is not None:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return self.health.fatal
            self.stop_event.set()
            self.notifier.stopping()
            try:
                await asyncio.wait_for(self._shutdown(tasks), timeout=s.lifecycle.stop_timeout_seconds)
            except TimeoutError:
                log.error("shutdown took longer than %.0fs; exiting without finishing it",
                          s.lifecycle.stop_timeout_seconds)
                return EXIT_FAILURE
            return EXIT_OK
        finally:
            for task in tasks:
                task.cancel()
            if self.runner is not None:
                await asyncio.to_thread(self.runner.stop)
            if self.source is not None:
                await self.source.stop()
            await stop_http(http_runner)
            log_event("stopped")

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        ingest = tasks[0]
        await ingest  # it sees the stop event after the batch in hand
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        if self._resume_from_last_checkpoint:
            return
        await self.checkpoint(final=True)
        await self.publish(final=True)

    async def _connect(self) -> bool:
        """Start the Kafka source, retrying with backoff until it works or we are told to stop."""
        if self._external_source is not None:
            await self._external_source.start()
            self.health.broker_connected = True
            return True
        s = self.settings
        options = kafka_options(s)
        delay = 0.5
        while not self.stop_event.is_set():
            source = KafkaSource(options, on_assigned=self._on_assigned, on_revoked=self._on_revoked)
            source.start_offsets = self.offsets
            try:
                await ensure_topics(options, {options.dlq_topic: 1, options.snapshot_topic: 1})
                await source.start()
            except Exception as exc:
                log_event("broker unreachable", bootstrap_servers=s.kafka.bootstrap_servers,
                          error=repr(exc)[:300], cause=last_kafka_error(), retry_in_seconds=delay)
                await self._sleep_unless_stopped(delay)
                delay = min(delay * 2, s.lifecycle.broker_retry_max_seconds)
                continue
            self.source = source
            self.health.broker_connected = True
            log_event("broker connected", bootstrap_servers=s.kafka.bootstrap_servers, topic=s.kafka.topic)
            return True
        return False

    async def _on_assigned(self, partitions: set[int]) -> None:
        log_event("partitions assigned", partitions=sorted(partitions))

    async def _on_revoked(self, partitions: set[int]) -> None:
        assert self.pipeline is not None
        async with self._ingest_lock:
            dropped = self.pipeline.drop_partitions(partitions)
        log_event("partitions revoked", partitions=sorted(partitions), open_episodes_dropped=dropped)
        await self.checkpoint(revoked=partitions)

    # ---------------------------------------------------------------- tasks
    async def _ingest_loop(self) -> None:
        assert self.pipeline is not None and self.runner is not None and self.replay is not None
        s = self.settings
        paused = False
        while not self.stop_event.is_set():
            source = self.source
            assert source is not None
            lagging = self._learner_lagging()
            if lagging != paused:
                source.pause() if lagging else source.resume()
                paused = lagging
                log_event("backpressure", paused=paused)
            records = await source.fetch(s.kafka.poll_timeout_ms)
            if not records:
                continue
            async with self._ingest_lock:
                started = time.perf_counter()
                outcome = self.pipeline.process(records)
                try:
                    await self._dead_letter(outcome.dead_letters)
                except DeadLettersPending as pending:
                    # The batch is in the learner's replay but not acknowledged: the last periodic
                    # checkpoint stays the one to resume from, and a restart reads the batch again.
                    self._resume_from_last_checkpoint = True
                    log_event("stopping with dead letters unacknowledged", records=pending.count,
                              note="final checkpoint skipped; the batch is read again after a restart")
                    return
                self.pipeline.counters.dead_lettered += len(outcome.dead_letters)
                self.offsets.update(outcome.next_offsets)
                self.runner.note_inserted(self.pipeline.counters.transitions)
                self.metrics.ingest_batch_seconds.observe(time.perf_counter() - started)
                self.health.last_progress = time.monotonic()

    def _learner_lagging(self) -> bool:
        assert self.runner is not None and self.replay is not None and self.pipeline is not None
        ratio = self.settings.learner.updates_per_transition
        if ratio <= 0 or len(self.replay) < self.settings.replay.min_size:
            return False
        wanted = ratio * self.pipeline.counters.transitions
        done = self.runner.stats().updates
        return wanted > self.settings.learner.max_lag_ratio * max(done, 1)

    async def _dead_letter(self, letters: list[DeadLetter]) -> None:
        """A bad record counts as done only once its dead letter is acknowledged: retry until it is.

        Once a stop is requested, one last attempt is bounded by BROKER_CALL_TIMEOUT_SECONDS; if it
        fails, DeadLettersPending tells the ingest loop to leave the batch unacknowledged.
        """
        assert self.source is not None
        delay = 0.5
        while letters:
            stopping = self.stop_event.is_set()
            try:
                write = self.source.dead_letter(letters)
                await (asyncio.wait_for(write, BROKER_CALL_TIMEOUT_SECONDS) if stopping else write)
                return
            except Exception as exc:
                if stopping:
                    raise DeadLettersPending(len(letters)) from exc
                log_event("dead-letter write failed", error=repr(exc)[:300], records=len(letters),
                          retry_in_seconds=delay)
                await self._sleep_unless_stopped(delay)
                delay = min(delay * 2, 10.0)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """A retry backoff that a stop request cuts short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)

    async def _every(self, interval: float, action: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            await action()

    async def _housekeeping(self) -> None:
        """Loop lag, systemd watchdog, progress watchdog, broker reachability, acting weights."""
        s = self.settings
        assert self.runner is not None and self.pipeline is not None
        last_broker_check = 0.0
        last_watchdog = 0.0
        last_expire = time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.5)
            now = time.monotonic()
            self.health.loop_lag = max(0.0, now - before - 0.5)
            if not self.runner.alive():
                log.error("the learner stopped unexpectedly; exiting so that systemd restarts the service")
                self.health.fatal = EXIT_LEARNER_DIED
                return
            weights, version = self.runner.weights()
            if version != self.pipeline.policy.weights_version:
                self.pipeline.policy.load_weights(weights, version)
            n = self.pipeline.normalizer
            self.runner.set_normalization(n.mean, n.std)
            if now - last_broker_check > 5 and self.source is not None:
                last_broker_check = now
                connected = await self.source.broker_reachable()
                if connected != self.health.broker_connected:
                    cause = {} if connected else {"cause": last_kafka_error()}
                    log_event("broker reconnected" if connected else "broker disconnected",
                              bootstrap_servers=s.kafka.bootstrap_servers, **cause)
                self.health.broker_connected = connected
            if now - last_expire > 5:
                last_expire = now
                async with self._ingest_lock:
                    expired = self.pipeline.tracker.expire(now)
                    self._push(expired)
                    self.pipeline.counters.transitions += len(expired)
                    self.pipeline.counters.episodes += len(expired.episode_returns)
            stalled = self._stalled(now)
            if stalled:
                log.error("no progress for %.0fs while %d events wait (lag); "
                          "exiting with code %d for a restart",
                          s.lifecycle.progress_timeout_seconds, sum(self._lag().values()), EXIT_STALLED)
                self.health.fatal = EXIT_STALLED
                return
            if self.notifier.watchdog_interval and now - last_watchdog >= self.notifier.watchdog_interval:
                last_watchdog = now
                self.notifier.watchdog()

    def _lag(self) -> dict[int, int]:
        if self.source is None:
            return {}
        return {p: max(0, h - self.offsets.get(p, 0)) for p, h in self.source.highwater().items()}

    def _stalled(self, now: float) -> bool:
        idle = now - self.health.last_progress
        if idle < self.settings.lifecycle.progress_timeout_seconds:
            return False
        if sum(self._lag().values()) > 0 and not self._learner_lagging():
            return True
        self.health.last_progress = now - self.settings.lifecycle.progress_timeout_seconds / 2
        return False

    # ---------------------------------------------------------------- checkpoints and snapshots
    async def checkpoint(self, final: bool = False, revoked: set[int] | None = None) -> bool:
        """Capture state + offsets consistently (ingest paused), write it off the loop, then commit."""
        assert self.pipeline is not None and self.runner is not None and self.replay is not None
        started = time.perf_counter()
        try:
            async with self._ingest_lock:
                if self._resume_from_last_checkpoint:
                    return False  # the state holds a batch whose offsets must not be saved as done
                state: dict[str, Any] = {
                    "pipeline": self.pipeline.state_dict(),
                    "offsets": {str(p): o for p, o in self.offsets.items()},
                    "learner": await asyncio.to_thread(self.runner.learner_state),
                }
                if self.settings.checkpoint.include_replay:
                    state["replay"] = await asyncio.to_thread(self.replay.state_dict)
                offsets = dict(self.offsets)
            path = await asyncio.to_thread(self.checkpoints.save, state)
        except Exception as exc:
            self.health.checkpoint_failures += 1
            log_event("checkpoint failed", error=repr(exc)[:500])
            return False
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_seconds.observe(seconds)
        self._append_history(state)
        log_event("checkpoint written", path=str(path), seconds=round(seconds, 3), offsets=offsets,
                  events_consumed=state["pipeline"]["counters"]["events_consumed"],
                  updates=state["learner"]["updates"], final=final)
        if self.source is not None:
            if revoked is not None:
                offsets = {p: offsets[p] for p in revoked if p in offsets}
            await self._commit(offsets)
        return True

    async def _commit(self, offsets: dict[int, int]) -> None:
        """Commit offsets to the group, waiting at most BROKER_CALL_TIMEOUT_SECONDS.

        A commit still waiting after that goes on in the background (cancelling it would leave the
        error of aiokafka's shielded request unretrieved) and later commits are skipped until it ends.
        """
        assert self.source is not None
        pending = self._commit_task
        if pending is not None and not pending.done():
            log_event("offset commit skipped", reason="the previous commit still waits for the broker")
            return
        task = asyncio.create_task(self.source.commit(offsets), name="commit")
        task.add_done_callback(_log_commit_failure)
        self._commit_task = task
        await asyncio.wait({task}, timeout=BROKER_CALL_TIMEOUT_SECONDS)
        if not task.done():
            log_event("offset commit failed", error=f"no answer from the broker within "
                      f"{BROKER_CALL_TIMEOUT_SECONDS:g} s; still trying in the background")

    def _append_history(self, state: dict[str, Any]) -> None:
        returns, self._returns_since_history = self._returns_since_history, []
        assert self.runner is not None and self.pipeline is not None
        try:
            append_history(self.state_dir, HistoryPoint(
                time.time(), state["pipeline"]["counters"]["events_consumed"], state["learner"]["updates"],
                float(np.mean(returns)) if returns else float("nan"), self.runner.stats().loss,
                self.pipeline.policy.epsilon, self.health.snapshot_version))
        except OSError as exc:
            log_event("history append failed", error=repr(exc)[:300])

    async def publish(self, final: bool = False) -> bool:
        assert self.runner is not None and self.pipeline is not None
        stats = self.runner.stats()
        if stats.updates < self.settings.publish.min_updates:
            return False
        counters = self.pipeline.counters
        progress = (stats.updates, counters.events_consumed)
        if progress == self._last_publish and not final:
            return False  # an idle stream: the same weights would be exported and gated again
        started = time.perf_counter()
        weights, _ = self.runner.weights()
        info = {
            "updates": stats.updates,
            "events_learned": counters.events_consumed,
            "transitions_learned": counters.transitions,
            "feature_spec": {"version": FeatureSpec().version, "names": list(FeatureSpec().names)},
            "action_names": list(ACTION_NAMES),
            "reward_table": self.rewards.as_dict(),
            "normalizer": {"mean": weights["obs_mean"].tolist(), "std": weights["obs_std"].tolist(),
                           "clip": float(weights["obs_clip"])},
            "learner": self.learner_settings.as_dict(),
            "device": str(self.device),
            "evaluation": {},
        }
        held_out = list(self.pipeline.tracker.holdout) if self.settings.publish.gate else []
        try:
            snapshot, passed = await asyncio.to_thread(self._export, weights, info, held_out)
        except Exception as exc:
            self.health.snapshot_failures += 1
            log_event("snapshot failed", error=repr(exc)[:500])
            return False
        self._last_publish = progress
        if not passed:
            self.health.snapshot_rejected += 1
            log_event("snapshot rejected", candidate=str(snapshot.path),
                      reason=snapshot.manifest["evaluation"]["gate"], updates=stats.updates, final=final)
            return False
        seconds = time.perf_counter() - started
        self.metrics.snapshot_export_seconds.observe(seconds)
        self.health.snapshot_version = snapshot.version
        self.health.snapshot_published = snapshot.manifest["created_at"]
        log_event("snapshot published", version=snapshot.version, sha256=snapshot.manifest["sha256"],
                  updates=stats.updates, seconds=round(seconds, 3), final=final)
        await self._announce(snapshot.version, snapshot.manifest["sha256"])
        return True

    def _export(
        self, weights: dict[str, torch.Tensor], info: dict[str, Any], held_out: list[Any]
    ) -> tuple[Any, bool]:
        """Gate, export, check and publish (in a worker thread). Returns (snapshot, passed the gate)."""
        q = QNetwork(FEATURE_DIM, len(Action), self.learner_settings.hidden)
        q.load_state_dict(weights)
        q.eval()
        passed, info["evaluation"] = self._gate_candidate(q, held_out)
        probe = np.random.default_rng(0).normal(size=(64, FEATURE_DIM)).astype(np.float32) * 3
        store = self.snapshots if passed else self.rejected
        return publish_snapshot(store, q, probe, info, signer=self.signer), passed

    def _gate_candidate(self, q: QNetwork, held_out: list[Any]) -> tuple[bool, dict[str, Any]]:
        if not self.settings.publish.gate:
            return True, {"gate": "off"}
        if len(held_out) < self.gate.min_episodes:
            return True, {"gate": f"skipped: {len(held_out)} held-out episodes < {self.gate.min_episodes}"}

        def candidate(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return q(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).argmax(1).numpy()

        metrics = evaluate_rows(candidate, held_out, self.rewards)
        current = None
        latest = self.snapshots.latest_version()
        if latest is not None:
            current = evaluate_rows(OnnxPolicy(self.snapshots.path_of(latest) / "model.onnx"), held_out,
                                    self.rewards)
        passed, why = self.gate.check(metrics, current)
        evaluation = {"gate": why, "held_out_episodes": len(held_out), "candidate": metrics.as_dict(),
                      "latest": current.as_dict() if current else None}
        return passed, evaluation

    async def _announce(self, version: int, sha256: str) -> None:
        if self.source is None or not self.settings.kafka.snapshot_topic:
            return
        base = self.settings.http.public_url or f"http://{self.settings.http.host}:{self.http_port}"
        payload = json.dumps({"version": version, "sha256": sha256,
                              "url": f"{base}/snapshots/{version}/model.onnx",
                              "manifest_url": f"{base}/snapshots/{version}/manifest.json"}).encode()
        try:
            await asyncio.wait_for(self.source.announce(payload), timeout=BROKER_CALL_TIMEOUT_SECONDS)
        except Exception as exc:
            log_event("snapshot announcement failed", error=_describe_broker_error(exc))

    # ---------------------------------------------------------------- observability
    def _metrics_snapshot(self) -> MetricsSnapshot:
        pipeline, runner, replay = self.pipeline, self.runner, self.replay
        if pipeline is None or runner is None or replay is None:
            return MetricsSnapshot(build=self._build_info())
        stats = runner.stats()
        c = pipeline.counters
        inserted = max(1, c.transitions)
        return MetricsSnapshot(
            events_consumed=c.events_consumed, rejected=dict(c.rejected), dead_lettered=c.dead_lettered,
            transitions=c.transitions, episodes=c.episodes, replay_size=len(replay),
            replay_capacity=replay.capacity, updates=stats.updates,
            samples_per_insert=stats.updates * self.learner_settings.batch_size / inserted,
            loss=stats.loss, td_error_abs=stats.td_error_abs, q_max_mean=stats.q_max_mean,
            epsilon=pipeline.policy.epsilon, consumer_lag=self._lag(),
            snapshot_version=self.health.snapshot_version, snapshot_published=self.health.snapshot_published,
            snapshot_rejected=self.health.snapshot_rejected, snapshot_failures=self.health.snapshot_failures,
            checkpoint_failures=self.health.checkpoint_failures, event_loop_lag=self.health.loop_lag,
            broker_connected=self.health.broker_connected,
            partitions_assigned=len(self.source.assignment()) if self.source else 0,
            build=self._build_info(),
        )

    def _build_info(self) -> dict[str, str]:
        return {"version": __version__, "torch": torch.__version__, "device": str(self.device)}

    def _health_info(self) -> dict[str, Any]:
        return {"status": "alive", "uptime_seconds": round(time.time() - self.health.started, 1)}

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        limit = 3 * self.settings.publish.interval_seconds
        now = time.time()
        fresh = (now - self.health.snapshot_published < limit) if self.health.snapshot_published else (
            now - self.health.started < limit)
        checks = {
            "broker_connected": self.health.broker_connected,
            "partitions_assigned": bool(self.source and self.source.assignment()),
            "learner_running": bool(self.runner and self.runner.alive()),
            "snapshot_fresh": fresh,
        }
        return all(checks.values()), checks
