"""IngestPipeline.process on real bytes: every record is accounted for, and the per-source rate cap
rejects by position. (That the batch equals decoding each record alone is in test_decoder_fuzz, and
that the whole stage equals a per-record reference in test_ingest_equivalence.)"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import msgpack

from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.pipeline import REASON_RATE_LIMITED, IngestPipeline, PipelineOptions, RateLimiter
from streamdqn.stream.rows import ReplayRows
from streamdqn.stream.sources import Record
from streamdqn.stream.wire import REASON_DECODE, REASON_TOO_LARGE, REASON_VALIDATION
from tests.factories import event_dict

MSGPACK = (("content-type", b"application/msgpack"),)


def make_pipeline(rate_limiter: RateLimiter | None = None) -> tuple[IngestPipeline, list[ReplayRows]]:
    pushed: list[ReplayRows] = []
    options = PipelineOptions(max_message_bytes=4096, max_events_per_message=20)
    pipeline = IngestPipeline(EpisodeTracker(), RunningNormalizer(FEATURE_DIM), pushed.append, options,
                              rate_limiter)
    return pipeline, pushed


def record(offset: int, payload: Any, *, fmt: str = "json", key: bytes | None = None) -> Record:
    if isinstance(payload, bytes):
        return Record("t", offset % 2, offset, payload, key)
    if fmt == "json":
        return Record("t", offset % 2, offset, json.dumps(payload).encode(), key)
    return Record("t", offset % 2, offset, msgpack.packb(payload), key, MSGPACK)


def test_a_mixed_batch_is_accounted_for_record_by_record() -> None:
    good = [event_dict(episode_id=1, step=s) for s in range(3)]
    records = [
        record(0, good[0]),
        record(1, [good[1], event_dict(episode_id=1, step=9, severity=2.0), good[2]], fmt="msgpack"),
        record(2, b"{not json"),
        record(3, b"[" + b" " * 5000 + b"]"),
        record(4, {"episode_id": 2}),
    ]
    pipeline, pushed = make_pipeline()
    outcome = pipeline.process(records, now=0.0)

    assert outcome.events == 3
    assert outcome.rejected == Counter({REASON_VALIDATION: 2, REASON_DECODE: 1, REASON_TOO_LARGE: 1})
    letters = {letter.record.offset: letter for letter in outcome.dead_letters}
    assert sorted(letters) == [1, 2, 3, 4]
    assert letters[1].record.value == records[1].value  # the original bytes
    assert letters[1].detail.startswith("[1] severity")  # the position inside its message, the field
    assert letters[4].reason == REASON_VALIDATION
    assert "step" in letters[4].detail
    assert outcome.next_offsets == {("t", 0): 5, ("t", 1): 4}
    assert sum(b.size for b in pushed) == outcome.transitions == 2  # steps 0, 1 (step 2 waits for step 3)


def test_the_rate_cap_rejects_a_sources_excess_by_position() -> None:
    limiter = RateLimiter(rate=0.0, burst=3)
    events = [event_dict(episode_id=1, step=s, sandbox_id="a") for s in range(5)]
    records = [record(0, events[:2], key=b"host-1"), record(1, events[2:], key=b"host-1"),
               record(2, event_dict(episode_id=7, sandbox_id="b"), key=b"host-2")]
    pipeline, _ = make_pipeline(limiter)
    outcome = pipeline.process(records, now=0.0)

    assert outcome.events == 4  # host-1: 3 of 5, host-2: 1
    assert outcome.rejected == Counter({REASON_RATE_LIMITED: 2})
    (letter,) = outcome.dead_letters
    assert letter.record.offset == 1
    assert letter.detail.count(REASON_RATE_LIMITED) == 0
    assert letter.detail.startswith("[1] per-source")
    assert "[2] per-source" in letter.detail
