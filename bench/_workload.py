"""The ingest workload that bench/concurrency.py, bench/gpu.py and bench/learner.py share: pre-built
records, the daemon's ingest stage over them (no broker), and the replay rows it makes of them."""

from __future__ import annotations

import time
import zlib

import msgpack

from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.runners import LearnerRunner
from streamdqn.offline.simulator import simulate
from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions
from streamdqn.stream.rows import N_ACTIONS, ReplayRows
from streamdqn.stream.sources import Record

__all__ = ["BATCH_RECORDS", "N_ACTIONS", "PARTITIONS", "Ingest", "build_records", "simulated_rows"]
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
        self.normalizer = RunningNormalizer(FEATURE_DIM)
        self.pipeline = self._pipeline()
        self.position = 0
        self.last_housekeeping = 0.0

    def _pipeline(self) -> IngestPipeline:
        return IngestPipeline(EpisodeTracker(), self.normalizer, self.buffer.push, PipelineOptions())

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
            self.runner.set_normalization(self.normalizer.mean, self.normalizer.std, self.normalizer.count)
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


def simulated_rows(n: int, seed: int = 11) -> ReplayRows:
    """About n replay rows as the ingest stage builds them from simulated events (inline labels)."""
    parts: list[ReplayRows] = []
    pipeline = IngestPipeline(EpisodeTracker(), RunningNormalizer(FEATURE_DIM), parts.append,
                              PipelineOptions())
    records = build_records(n + n // 4, seed)
    for start in range(0, len(records), BATCH_RECORDS):
        pipeline.process(records[start : start + BATCH_RECORDS])
        if sum(p.size for p in parts) >= n:
            break
    else:
        pipeline.close_all()
    rows = ReplayRows.concat(parts)
    return ReplayRows(*(column[:n] for column in rows))
