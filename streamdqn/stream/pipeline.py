"""The ingest stage: records -> decode and validate (columns) -> rate cap -> episodes -> features ->
replay rows. Synchronous and vectorized per batch; the daemon calls it between fetches.

Every record ends up accounted for: its valid events are consumed, its invalid ones are rejected
by reason, and a record with any rejection is returned as a dead letter carrying its original bytes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from streamdqn.stream.drift import RecentWindow
from streamdqn.stream.episodes import Emitted, EpisodeTracker, Finished, TrackerState
from streamdqn.stream.features import FEATURE_DIM, NormalizerState, RunningNormalizer
from streamdqn.stream.join import JoinState, VerdictJoin, decode_verdicts
from streamdqn.stream.outcomes import PolicyOutcomes
from streamdqn.stream.rows import ReplayRows
from streamdqn.stream.sources import DeadLetter, Partition, Record
from streamdqn.stream.wire import EventColumns, Reject, decode_batch

REASON_RATE_LIMITED = "rate_limited"


class Counters(msgspec.Struct):
    """Cumulative counts, saved in checkpoints so that each event is counted once across restarts."""

    events_consumed: int = 0
    records: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    dead_lettered: int = 0
    transitions: int = 0  # replay rows pushed
    episodes: int = 0  # episodes over and labelled (held-out ones included)
    unlabelled_expired: int = 0  # episodes over that no label ever reached (without a verdicts topic)
    verdict_records: int = 0
    verdicts_rejected: dict[str, int] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class BatchOutcome:
    events: int
    transitions: int
    rejected: Counter[str]
    dead_letters: list[DeadLetter]
    next_offsets: dict[Partition, int]  # (topic, partition) -> offset after the batch's last record
    finished: list[Finished]
    rejects: dict[int, list[Reject]]  # record position in the batch -> its rejects


class RateLimiter:
    """Token bucket per source: `rate` events per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float, max_sources: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, source: str, n: int, now: float) -> int:
        """How many of n events from `source` fit now."""
        tokens, last = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = min(n, int(tokens))
        if len(self._buckets) >= self.max_sources and source not in self._buckets:
            self._buckets.clear()  # bounded memory under a flood of distinct keys
        self._buckets[source] = (tokens - allowed, now)
        return allowed


def content_type(record: Record) -> str | None:
    ct = record.header("content-type")
    return ct.decode("latin-1") if ct else None


@dataclass(frozen=True)
class PipelineOptions:
    max_message_bytes: int = 1 << 20
    max_events_per_message: int = 10_000
    rate_limit_key: str = "record_key"  # record_key | header | sandbox_id
    rate_limit_header: str = "x-sandbox-host"


class PipelineState(msgspec.Struct):
    tracker: TrackerState
    normalizer: NormalizerState
    counters: Counters
    join: JoinState | None = None
    outcomes: PolicyOutcomes | None = None


@dataclass
class IngestPipeline:
    tracker: EpisodeTracker
    normalizer: RunningNormalizer
    push: Callable[[ReplayRows], None]
    options: PipelineOptions = field(default_factory=PipelineOptions)
    rate_limiter: RateLimiter | None = None
    counters: Counters = field(default_factory=Counters)
    # With a verdicts topic: records of that topic are verdicts, joined to their episodes.
    join: VerdictJoin | None = None
    verdicts_topic: str = ""
    on_finished: Callable[[Finished], None] | None = None  # each episode as it finishes (metrics)
    outcomes: PolicyOutcomes = field(default_factory=PolicyOutcomes)  # per deployed policy_version
    recent: RecentWindow = field(default_factory=lambda: RecentWindow(FEATURE_DIM))  # for drift metrics
    # Finished episodes since the last take_finished() (the daemon's history and metrics read them).
    _finished: list[Finished] = field(default_factory=list)

    def process(self, records: Sequence[Record], now: float | None = None) -> BatchOutcome:
        now = time.monotonic() if now is None else now
        next_offsets: dict[Partition, int] = {}
        for record in records:
            key = (record.topic, record.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), record.offset + 1)
        if self.join is not None and any(r.topic == self.verdicts_topic for r in records):
            telemetry = [i for i, r in enumerate(records) if r.topic != self.verdicts_topic]
            verdicts = [i for i, r in enumerate(records) if r.topic == self.verdicts_topic]
        else:
            telemetry, verdicts = list(range(len(records))), []
        events, transitions, problems, finished = self._telemetry([records[i] for i in telemetry], now)
        problems = {telemetry[r]: rejects for r, rejects in problems.items()}
        if verdicts:
            more, verdict_problems, verdict_finished = self._verdicts([records[i] for i in verdicts])
            transitions += more
            finished += verdict_finished
            problems.update({verdicts[r]: rejects for r, rejects in verdict_problems.items()})
        rejected: Counter[str] = Counter()
        letters = []
        for r_index, rejects in sorted(problems.items()):
            for reject in rejects:
                rejected[reject.reason] += 1
            detail = "; ".join(f"[{r.position}] {r.detail}" if r.position >= 0 else r.detail for r in rejects)
            letters.append(DeadLetter(records[r_index], rejects[0].reason, detail[:2000]))
        self.counters.records += len(records)
        return BatchOutcome(events, transitions, rejected, letters, next_offsets, finished,
                            dict(sorted(problems.items())))

    def _telemetry(
        self, records: Sequence[Record], now: float
    ) -> tuple[int, int, dict[int, list[Reject]], list[Finished]]:
        if not records:
            return 0, 0, {}, []
        o = self.options
        decoded = decode_batch([r.value for r in records], [content_type(r) for r in records],
                               max_bytes=o.max_message_bytes, max_events=o.max_events_per_message)
        problems = decoded.rejects
        events, origin, position = decoded.events, decoded.origin, decoded.position
        if self.rate_limiter is not None and events.size:
            keep = self._rate_limit(records, events, origin, position, problems, now)
            if not keep.all():
                index = np.flatnonzero(keep)
                events, origin, position = events.take(index), origin[index], position[index]

        partitions = np.array([r.partition for r in records], dtype=np.int64)[origin]
        observed = self.tracker.observe(events, partitions, now)
        for i, reject in observed.rejects:
            problems.setdefault(int(origin[i]), []).append(reject._replace(position=int(position[i])))
        self.normalizer.update(observed.features)
        self.recent.add(observed.features)
        emitted = observed.emitted
        transitions = self._account(emitted)  # pushed before the join may relabel them
        finished = list(emitted.finished)
        if self.join is not None:
            stamps = events.timestamp[observed.accepted].tolist()
            joined = self.join.after_observe(emitted.unlabelled, observed.keys, stamps)
            transitions += self._account(joined)
            finished += joined.finished
        c = self.counters
        c.events_consumed += len(observed.accepted)
        for rejects in problems.values():
            for reject in rejects:
                c.rejected[reject.reason] = c.rejected.get(reject.reason, 0) + 1
        return len(observed.accepted), transitions, problems, finished

    def _verdicts(self, records: Sequence[Record]) -> tuple[int, dict[int, list[Reject]], list[Finished]]:
        assert self.join is not None
        o = self.options
        problems: dict[int, list[Reject]] = {}
        transitions = 0
        finished: list[Finished] = []
        # The rows of the batch's joins go to replay in one push; a verdict for an episode joined in
        # this batch (a revision) may relabel its rows in replay, so the rows are pushed before it.
        pending, joined = Emitted(), set[tuple[str, str]]()
        for r, record in enumerate(records):
            verdicts, rejects = decode_verdicts(
                record.value, content_type(record), max_bytes=o.max_message_bytes,
                max_events=o.max_events_per_message,
            )
            if rejects:
                problems[r] = rejects
            for _, verdict in verdicts:
                key = (verdict.sandbox_id, str(verdict.episode_id))
                if key in joined:
                    transitions += self._account(pending)
                    pending, joined = Emitted(), set[tuple[str, str]]()
                emitted = self.join.add(verdict)
                joined.add(key)
                pending.merge(emitted)
                finished += emitted.finished
        transitions += self._account(pending)
        c = self.counters
        c.verdict_records += len(records)
        for rejects in problems.values():
            for reject in rejects:
                c.verdicts_rejected[reject.reason] = c.verdicts_rejected.get(reject.reason, 0) + 1
        return transitions, problems, finished

    def expire(self, now: float) -> int:
        """Close episodes idle past the tracker's timeout, and let the join drop what waited too long;
        returns the rows this pushed."""
        emitted = self.tracker.expire(now)
        rows = self._account(emitted)
        if self.join is not None:
            rows += self._account(self.join.after_observe(emitted.unlabelled, [], []))
            self.join.expire()
        return rows

    def close_all(self) -> int:
        """End every open episode (a file read to its end); returns the rows this pushed."""
        emitted = self.tracker.close_all()
        rows = self._account(emitted)
        if self.join is not None:
            rows += self._account(self.join.after_observe(emitted.unlabelled, [], []))
        return rows

    def _account(self, emitted: Emitted) -> int:
        rows = emitted.all_rows
        if rows.size:
            self.push(rows)
        self.counters.transitions += rows.size
        self.counters.episodes += len(emitted.finished)
        if self.join is None:
            self.counters.unlabelled_expired += len(emitted.unlabelled)
        else:
            self.join.count_finished(emitted.finished)
        self._finished += emitted.finished
        for f in emitted.finished:
            self.outcomes.observe(f.policy_version, f.first_response, f.label.malicious, f.logged_return)
        if self.on_finished is not None:
            for finished in emitted.finished:
                self.on_finished(finished)
        return rows.size

    def take_finished(self) -> list[Finished]:
        """The episodes finished since the last call."""
        finished, self._finished = self._finished, []
        return finished

    def _rate_limit(
        self, records: Sequence[Record], events: EventColumns, origin: np.ndarray, position: np.ndarray,
        problems: dict[int, list[Reject]], now: float,
    ) -> np.ndarray:
        """Cap each source's events; a record's events past its source's budget are rejected."""
        assert self.rate_limiter is not None
        keep = np.ones(events.size, bool)
        starts = np.flatnonzero(np.r_[True, origin[1:] != origin[:-1]])
        ends = np.append(starts[1:], len(origin))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            r_index = int(origin[s])
            source = self._source_of(records[r_index], events.sandbox_id[s])
            allowed = self.rate_limiter.allow(source, e - s, now)
            if allowed < e - s:
                keep[s + allowed : e] = False
                problems.setdefault(r_index, []).extend(
                    Reject(int(position[i]), REASON_RATE_LIMITED, "per-source event rate cap exceeded")
                    for i in range(s + allowed, e)
                )
        return keep

    def _source_of(self, record: Record, sandbox_id: str) -> str:
        key = self.options.rate_limit_key
        if key == "record_key" and record.key is not None:
            return "k:" + record.key.hex()
        if key == "header":
            value = record.header(self.options.rate_limit_header)
            if value is not None:
                return "h:" + value.hex()
        return "s:" + sandbox_id

    def drop_partitions(self, partitions: set[int]) -> int:
        return self.tracker.drop_partitions(partitions)

    def state(self) -> PipelineState:
        counters = msgspec.structs.replace(self.counters, rejected=dict(self.counters.rejected),
                                           verdicts_rejected=dict(self.counters.verdicts_rejected))
        join = self.join.state() if self.join is not None else None
        outcomes = msgspec.convert(msgspec.to_builtins(self.outcomes), PolicyOutcomes)  # a copy
        return PipelineState(self.tracker.state(), self.normalizer.state(), counters, join, outcomes)

    def load_state(self, state: PipelineState, now: float) -> None:
        self.tracker.load_state(state.tracker, now)
        self.normalizer.load_state(state.normalizer)
        self.counters = state.counters
        if self.join is not None and state.join is not None:
            self.join.load_state(state.join, now)
        self.outcomes = state.outcomes if state.outcomes is not None else PolicyOutcomes()


def encode_state(state: PipelineState) -> bytes:
    return msgspec.msgpack.encode(state)


def decode_state(data: bytes) -> PipelineState:
    """Raises msgspec.ValidationError / DecodeError for state of another shape."""
    return msgspec.msgpack.decode(data, type=PipelineState)
