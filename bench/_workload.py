"""The ingest workload that bench/concurrency.py and bench/gpu.py share: pre-built records and the
daemon's ingest stage over them (no broker)."""

from __future__ import annotations

import time
import zlib

import msgpack

from streamdqn.learning.learner import ActingPolicy
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.runners import LearnerRunner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.offline.simulator import simulate
from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions
from streamdqn.stream.sources import Record
from streamdqn.stream.wire import Action

N_ACTIONS = len(Action)
PARTITIONS = 4
BATCH_RECORDS = 2000  # the daemon's kafka.max_poll_records


def build_records(n: int, seed: int = 11) -> list[Record]:
    """Simulated events as the broker would hand them over: msgpack, keyed, content-type header."""
    out: list[Record] = []
    offsets = [0] * PARTITIONS
    for event in simulate(n // 8 + 10, seed):
        key = str(event["sandbox_id"]).encode()
        partition = zlib.crc32(key) % PARTITIONS
        out.append(
            Record(
                "telemetry",
                partition,
                offsets[partition],
                msgpack.packb(event),
                key,
                (("content-type", b"application/msgpack"),),
            )
        )
        offsets[partition] += 1
        if len(out) == n:
            break
    return out


class Ingest:
    """The daemon's ingest stage over a fixed list of records, replayed as new episodes each lap."""

    def __init__(self, records: list[Record], buffer: ReplayBuffer, runner: LearnerRunner) -> None:
        self.records = records
        self.buffer = buffer
        self.runner = runner
        settings = LearnerSettings(device="cpu", seed=0)
        self.policy = ActingPolicy(settings, FEATURE_DIM, N_ACTIONS)
        self.normalizer = RunningNormalizer(FEATURE_DIM)
        self.pipeline = self._pipeline()
        self.position = 0
        self.last_housekeeping = 0.0

    def _pipeline(self) -> IngestPipeline:
        def push(batch: TransitionBatch) -> None:
            self.buffer.push(batch.states, batch.actions, batch.rewards, batch.next_states, batch.dones)

        return IngestPipeline(EpisodeTracker(), self.normalizer, self.policy, push, PipelineOptions())

    def step(self, n: int) -> int:
        """Process the next n records; returns the events consumed."""
        if self.position + n > len(self.records):
            self.position = 0
            self.pipeline = self._pipeline()  # a fresh tracker: the same records are new episodes again
        batch = self.records[self.position : self.position + n]
        self.position += n
        events = self.pipeline.process(batch).events
        now = time.monotonic()
        if now - self.last_housekeeping > 0.5:  # as the daemon's Ingestor does
            self.last_housekeeping = now
            weights, version = self.runner.weights()
            if version != self.policy.weights_version:
                self.policy.load_weights(weights, version)
            self.runner.set_normalization(self.normalizer.mean, self.normalizer.std)
        return events

    def full_speed(self, seconds: float) -> float:
        events = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            events += self.step(BATCH_RECORDS)
        return events / (time.perf_counter() - started)

    def paced(self, rate: float, seconds: float) -> float:
        """About `rate` events/s in batches of rate/20 (what arrives between two polls); achieved rate."""
        n = max(1, min(BATCH_RECORDS, int(rate / 20)))
        events = 0
        started = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            ahead = sent / rate - elapsed
            if ahead > 0:
                time.sleep(ahead)
            events += self.step(n)
            sent += n
        return events / (time.perf_counter() - started)
