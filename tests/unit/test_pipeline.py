"""IngestPipeline.process on real bytes: one validation call per batch gives exactly what decoding each
record alone gives, every record is accounted for, and the per-source rate cap rejects by position."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdqn.learning.learner import ActingPolicy
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.pipeline import REASON_RATE_LIMITED, IngestPipeline, PipelineOptions, RateLimiter
from streamdqn.stream.sources import Record
from streamdqn.stream.wire import REASON_DECODE, REASON_TOO_LARGE, REASON_VALIDATION, Action
from tests.factories import event_dict, valid_event_dicts

MSGPACK = (("content-type", b"application/msgpack"),)


def make_pipeline(rate_limiter: RateLimiter | None = None) -> tuple[IngestPipeline, list[TransitionBatch]]:
    pushed: list[TransitionBatch] = []
    policy = ActingPolicy(LearnerSettings(hidden=(8,), device="cpu", seed=0), FEATURE_DIM, len(Action))
    options = PipelineOptions(max_message_bytes=4096, max_events_per_message=20)
    normalizer = RunningNormalizer(FEATURE_DIM)
    pipeline = IngestPipeline(EpisodeTracker(), normalizer, policy, pushed.append, options, rate_limiter)
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
    assert letters[4].reason == REASON_VALIDATION and "step" in letters[4].detail
    assert outcome.next_offsets == {0: 5, 1: 4}
    assert sum(len(b) for b in pushed) == outcome.transitions > 0


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
    assert letter.record.offset == 1 and letter.detail.count(REASON_RATE_LIMITED) == 0
    assert letter.detail.startswith("[1] per-source") and "[2] per-source" in letter.detail


_broken_event = st.dictionaries(
    st.sampled_from(["step", "severity", "x"]), st.one_of(st.integers(-5, 5), st.text(max_size=3))
)
_message = st.one_of(
    valid_event_dicts(),
    st.lists(st.one_of(valid_event_dicts(), _broken_event), max_size=4),
    st.binary(max_size=40),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_message, st.sampled_from(["json", "msgpack"])), max_size=12))
def test_batch_validation_equals_decoding_each_record(messages: list[tuple[Any, str]]) -> None:
    records = [record(i, m, fmt=fmt) for i, (m, fmt) in enumerate(messages)]
    pipeline, _ = make_pipeline()
    batch_problems: dict[int, list[Any]] = {}
    each_problems: dict[int, list[Any]] = {}
    batch = pipeline._decode(records, batch_problems)
    each = pipeline._decode_each(records, each_problems)

    assert batch[1:] == each[1:]  # record and message position of every event
    assert [e.model_dump() for e in batch[0]] == [e.model_dump() for e in each[0]]
    assert batch_problems == each_problems
    accounted = {i for i in batch[1]} | set(batch_problems)
    assert accounted == {i for i, (m, _) in enumerate(messages) if m != []}
    assert np.all(np.diff(batch[1]) >= 0)  # events stay in record order
