"""The ingest stage: raw records -> decode -> validate -> rate cap -> episodes -> features -> actions
-> transitions -> replay. Synchronous and vectorized per batch; the daemon calls it between fetches.

Every record ends up accounted for: its valid events are consumed, its invalid ones are rejected
by reason, and a record with any rejection is returned as a dead letter carrying its original bytes.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamdqn.learning.learner import ActingPolicy
from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import RunningNormalizer
from streamdqn.stream.sources import DeadLetter, Record
from streamdqn.stream.wire import Reject, TelemetryEvent, decode, parse_message, validate_records_safely

REASON_RATE_LIMITED = "rate_limited"


@dataclass
class Counters:
    """Cumulative counts, saved in checkpoints so that each event is counted once across restarts."""

    events_consumed: int = 0
    records: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dead_lettered: int = 0
    transitions: int = 0
    episodes: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"events_consumed": self.events_consumed, "records": self.records,
                "rejected": dict(self.rejected), "dead_lettered": self.dead_lettered,
                "transitions": self.transitions, "episodes": self.episodes}

    @staticmethod
    def from_state(state: dict[str, Any]) -> Counters:
        return Counters(state["events_consumed"], state["records"], Counter(state["rejected"]),
                        state["dead_lettered"], state["transitions"], state["episodes"])


@dataclass(frozen=True)
class BatchOutcome:
    events: int
    transitions: int
    rejected: Counter[str]
    dead_letters: list[DeadLetter]
    next_offsets: dict[int, int]  # partition -> offset after the last record of this batch
    episode_returns: list[float]
    episode_malicious: list[bool]


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


def _content_type(record: Record) -> str | None:
    ct = record.header("content-type")
    return ct.decode("latin-1") if ct else None


@dataclass(frozen=True)
class PipelineOptions:
    max_message_bytes: int = 1 << 20
    max_events_per_message: int = 10_000
    rate_limit_key: str = "record_key"  # record_key | header | sandbox_id
    rate_limit_header: str = "x-sandbox-host"


class IngestPipeline:
    def __init__(
        self,
        tracker: EpisodeTracker,
        normalizer: RunningNormalizer,
        policy: ActingPolicy,
        push: Callable[[TransitionBatch], None],
        options: PipelineOptions,
        rate_limiter: RateLimiter | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.tracker = tracker
        self.normalizer = normalizer
        self.policy = policy
        self.push = push
        self.options = options
        self.rate_limiter = rate_limiter
        self.counters = counters or Counters()
        self._returns: list[float] = []  # of episodes finished since the last take_returns()

    def _source_of(self, record: Record, event: TelemetryEvent) -> str:
        key = self.options.rate_limit_key
        if key == "record_key" and record.key is not None:
            return "k:" + record.key.hex()
        if key == "header":
            value = record.header(self.options.rate_limit_header)
            if value is not None:
                return "h:" + value.hex()
        return "s:" + event.sandbox_id

    def process(self, records: Sequence[Record], now: float | None = None) -> BatchOutcome:
        now = time.monotonic() if now is None else now
        rejected: Counter[str] = Counter()
        problems: dict[int, list[Reject]] = {}  # record position -> its rejects
        next_offsets: dict[int, int] = {}
        for record in records:
            next_offsets[record.partition] = max(next_offsets.get(record.partition, 0), record.offset + 1)
        events, origin, positions = self._decode(records, problems)
        if self.rate_limiter is not None and events:
            events, origin = self._rate_limit(records, events, origin, positions, problems, now)

        partitions = [records[i].partition for i in origin]
        observed, closing = self.tracker.observe(events, now, partitions)
        for reject in observed.rejects:
            problems.setdefault(origin[reject.index], []).append(reject)

        self.normalizer.update(observed.features)
        n = self.normalizer
        self.policy.set_normalization(n.mean, n.std, n.clip)
        actions = self.policy.act(observed.features)
        batch = self.tracker.act(observed, actions)
        expired = self.tracker.expire(now)
        transitions = 0
        returns: list[float] = []
        malicious: list[bool] = []
        for b in (closing, batch, expired):
            self.push(b)
            transitions += len(b)
            returns += b.episode_returns
            malicious += b.episode_malicious
        self.policy.acting_steps += transitions

        letters = []
        for r_index, rejects in sorted(problems.items()):
            for reject in rejects:
                rejected[reject.reason] += 1
            detail = "; ".join(f"[{r.index}] {r.detail}" if r.index >= 0 else r.detail for r in rejects)
            letters.append(DeadLetter(records[r_index], rejects[0].reason, detail[:2000]))

        self._returns += returns
        c = self.counters
        c.events_consumed += len(observed.events)
        c.records += len(records)
        c.rejected.update(rejected)
        c.transitions += transitions
        c.episodes += len(returns)
        return BatchOutcome(
            len(observed.events), transitions, rejected, letters, next_offsets, returns, malicious
        )

    def _decode(
        self, records: Sequence[Record], problems: dict[int, list[Reject]]
    ) -> tuple[list[TelemetryEvent], list[int], list[int]]:
        """Parse each record, validate the whole batch in one call (pydantic's loop, not ours).

        Returns the valid events in record order with, for each, its record's position in `records`
        and its own position in that record's message; rejects go to `problems`."""
        o = self.options
        parsed: list[object] = []
        owner: list[int] = []  # record position of each parsed object
        position: list[int] = []  # its position within its message
        for r_index, record in enumerate(records):
            message = parse_message(record.value, _content_type(record),
                                    max_bytes=o.max_message_bytes, max_events=o.max_events_per_message)
            if isinstance(message, Reject):
                problems[r_index] = [message]
                continue
            parsed.extend(message)
            owner.extend([r_index] * len(message))
            position.extend(range(len(message)))
        decoded = validate_records_safely(parsed)
        if decoded.rejects and decoded.rejects[0].index < 0:
            return self._decode_each(records, problems)  # an unexpected validator failure: isolate it
        for reject in decoded.rejects:
            problems.setdefault(owner[reject.index], []).append(reject._replace(index=position[reject.index]))
        return decoded.events, [owner[i] for i in decoded.indices], [position[i] for i in decoded.indices]

    def _decode_each(
        self, records: Sequence[Record], problems: dict[int, list[Reject]]
    ) -> tuple[list[TelemetryEvent], list[int], list[int]]:
        """One decode() per record: the slow path, so a record that breaks the validator fails alone."""
        o = self.options
        events: list[TelemetryEvent] = []
        origin: list[int] = []
        positions: list[int] = []
        problems.clear()
        for r_index, record in enumerate(records):
            decoded = decode(record.value, _content_type(record),
                             max_bytes=o.max_message_bytes, max_events=o.max_events_per_message)
            if decoded.rejects:
                problems[r_index] = list(decoded.rejects)
            events.extend(decoded.events)
            origin.extend([r_index] * len(decoded.events))
            positions.extend(decoded.indices)
        return events, origin, positions

    def _rate_limit(
        self,
        records: Sequence[Record],
        events: list[TelemetryEvent],
        origin: list[int],
        positions: list[int],
        problems: dict[int, list[Reject]],
        now: float,
    ) -> tuple[list[TelemetryEvent], list[int]]:
        """Cap each source's events; a record's events past its source's budget are rejected."""
        assert self.rate_limiter is not None
        kept: list[int] = []
        # A record's events are contiguous: one budget check per record.
        for r_index, group in itertools.groupby(range(len(events)), key=origin.__getitem__):
            rows = list(group)
            source = self._source_of(records[r_index], events[rows[0]])
            allowed = self.rate_limiter.allow(source, len(rows), now)
            kept += rows[:allowed]
            if allowed < len(rows):
                problems.setdefault(r_index, []).extend(
                    Reject(positions[i], REASON_RATE_LIMITED, "per-source event rate cap exceeded")
                    for i in rows[allowed:]
                )
        if len(kept) == len(events):
            return events, origin
        return [events[i] for i in kept], [origin[i] for i in kept]

    def expire(self, now: float) -> int:
        """Close episodes idle past the tracker's timeout; returns the transitions this pushed."""
        expired = self.tracker.expire(now)
        self.push(expired)
        self.counters.transitions += len(expired)
        self.counters.episodes += len(expired.episode_returns)
        self._returns += expired.episode_returns
        return len(expired)

    def take_returns(self) -> list[float]:
        """The returns of the episodes finished since the last call."""
        returns, self._returns = self._returns, []
        return returns

    def drop_partitions(self, partitions: set[int]) -> int:
        return self.tracker.drop_partitions(partitions)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "normalizer": self.normalizer.state_dict(),
            "counters": self.counters.state_dict(),
            "acting_steps": self.policy.acting_steps,
        }

    def load_state_dict(self, state: dict[str, Any], now: float) -> None:
        self.tracker.load_state_dict(state["tracker"], now)
        self.normalizer.load_state_dict(state["normalizer"])
        self.counters = Counters.from_state(state["counters"])
        self.policy.acting_steps = int(state["acting_steps"])

