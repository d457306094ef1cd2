"""Fuzzing `telemetry.decode`: whatever the bytes, it returns events and rejects, never raises, and
every record of a parsed message is accounted for exactly once."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamdqn.stream.wire import (
    REASON_DECODE,
    REASON_SHAPE,
    REASON_TOO_LARGE,
    REASON_TOO_MANY,
    REASON_VALIDATION,
    Decoded,
    EventColumns,
    columns_of,
    decode,
    decode_batch,
    raw_matrix,
)
from tests.factories import valid_event_dicts
from tests.property.examples import examples

REASONS = {REASON_DECODE, REASON_SHAPE, REASON_TOO_LARGE, REASON_TOO_MANY, REASON_VALIDATION}
MAX_BYTES = 64 * 1024
MAX_EVENTS = 50

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), _text)
# Any JSON/msgpack-shaped value, including dicts that look a lot like events.
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_text, children, max_size=4)),
    max_leaves=12,
)


@st.composite
def _mutated_events(draw: st.DrawFn) -> dict[str, object]:
    """A valid event with a few fields replaced by arbitrary values or removed."""
    event = draw(valid_event_dicts())
    for name in draw(st.lists(st.sampled_from(sorted(event)), max_size=3)):
        if draw(st.booleans()):
            event[name] = draw(_values)
        else:
            event.pop(name, None)
    return event


_records = st.one_of(_mutated_events(), valid_event_dicts(), _values)
_messages = st.one_of(_records, st.lists(_records, max_size=8))


def _encode(value: object, fmt: str) -> bytes | None:
    try:
        return json.dumps(value).encode() if fmt == "json" else msgpack.packb(value)
    except (TypeError, ValueError, OverflowError):
        return None  # not representable in that format (e.g. a 2**64 int in JSON is fine, in msgpack not)


def _check(decoded: Decoded, payload: bytes) -> None:
    assert isinstance(decoded, Decoded)
    assert all(r.reason in REASONS for r in decoded.rejects), decoded.rejects
    assert len(decoded.events) == len(decoded.indices)
    whole = [r for r in decoded.rejects if r.position < 0]
    if whole:  # the message as a whole was refused: nothing in it became an event
        assert len(decoded.rejects) == 1
        assert not decoded.events
        return
    rejected = [r.position for r in decoded.rejects]
    assert len(set(rejected)) == len(rejected)
    assert not set(rejected) & set(decoded.indices)
    covered = sorted([*rejected, *decoded.indices])
    assert covered == list(range(len(covered)))
    # What reaches featurization is finite and in range, whatever came in.
    raw = raw_matrix(decoded.events)
    assert np.isfinite(raw).all()
    assert (raw >= 0).all()
    for e in decoded.events:
        assert e.severity is None or 0.0 <= e.severity <= 1.0  # unlabelled events wait for a verdict
        assert (e.reward is None or math.isfinite(e.reward))
        assert e.action is None or 0 <= e.action <= 4


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=2048), st.sampled_from([None, "application/json", "application/msgpack", "text/plain"])
)
def test_arbitrary_bytes_never_raise(payload: bytes, content_type: str | None) -> None:
    _check(decode(payload, content_type, max_bytes=MAX_BYTES, max_events=MAX_EVENTS), payload)


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages, st.sampled_from(["json", "msgpack"]), st.booleans(), st.data())
def test_structured_and_truncated_messages_never_raise(
    message: object, fmt: str, with_content_type: bool, data: st.DataObject
) -> None:
    payload = _encode(message, fmt)
    if payload is None:
        return
    if data.draw(st.booleans()):  # truncated somewhere
        payload = payload[: data.draw(st.integers(0, max(0, len(payload) - 1)))]
    content_type = f"application/{fmt}" if with_content_type else None
    _check(decode(payload, content_type, max_bytes=MAX_BYTES, max_events=MAX_EVENTS), payload)


@settings(max_examples=examples(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.one_of(st.binary(max_size=512), _messages), st.sampled_from(["json", "msgpack"]),
                          st.booleans()), max_size=8))
def test_the_batch_fast_path_never_raises_and_accounts_for_every_record(
    records: list[tuple[object, str, bool]]
) -> None:
    values, types = [], []
    for message, fmt, with_content_type in records:
        payload = message if isinstance(message, bytes) else _encode(message, fmt)
        values.append(payload if payload is not None else b"\x00")
        types.append(f"application/{fmt}" if with_content_type else None)
    batch = decode_batch(values, types, max_bytes=MAX_BYTES, max_events=MAX_EVENTS)
    assert np.all(np.diff(batch.origin) >= 0)
    assert len(batch.origin) == batch.events.size
    for r, value in enumerate(values):  # each record: exactly what decoding it alone gives
        alone = decode(value, types[r], max_bytes=MAX_BYTES, max_events=MAX_EVENTS)
        mine = batch.origin == r
        assert batch.position[mine].tolist() == alone.indices
        assert batch.rejects.get(r, []) == alone.rejects
        assert _same(batch.events.take(np.flatnonzero(mine)), columns_of(alone.events))


def _same(a: EventColumns, b: EventColumns) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(a, b, strict=True))
