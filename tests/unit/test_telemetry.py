"""The wire format: strict validation, JSON and msgpack, one object or many, bad input as rejects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from streamdqn.stream.wire import (
    RAW_FIELDS,
    REASON_DECODE,
    REASON_SHAPE,
    REASON_TOO_LARGE,
    REASON_TOO_MANY,
    REASON_VALIDATION,
    Decoded,
    decode,
    raw_matrix,
    read_events_file,
    validate_records,
)
from tests.factories import event_dict, make_event, without


def decode_one(record: Any) -> Decoded:
    return decode(json.dumps(record).encode(), "application/json")


def only_reject(decoded: Decoded) -> tuple[int, str, str]:
    assert decoded.events == []
    assert len(decoded.rejects) == 1, decoded.rejects
    return decoded.rejects[0]


# --- strictness: each bad value is rejected naming its field, never coerced ------------------------

BAD_VALUES = [
    pytest.param(b'"severity": NaN', "severity", id="json-NaN"),
    pytest.param(b'"severity": "nan"', "severity", id="string-nan"),
    pytest.param(b'"memory_usage": 1e309', "memory_usage", id="1e309-is-inf"),
    pytest.param(b'"cpu_usage": "1.5"', "cpu_usage", id="string-for-float"),
    pytest.param(b'"syscall_count": true', "syscall_count", id="bool-for-count"),
    pytest.param(b'"syscall_count": 1.0', "syscall_count", id="float-for-count"),
    pytest.param(b'"bytes_sent": -1', "bytes_sent", id="negative-count"),
    pytest.param(b'"severity": 1.5', "severity", id="severity-above-1"),
    pytest.param(b'"severity": -0.1', "severity", id="severity-below-0"),
    pytest.param(b'"cpu_usage": 101', "cpu_usage", id="cpu-above-100"),
    pytest.param(b'"is_malicious": 1', "is_malicious", id="int-for-bool"),
    pytest.param(b'"action": "detonate"', "action", id="unknown-action-name"),
    pytest.param(b'"action": 7', "action", id="action-7"),
    pytest.param(b'"action": true', "action", id="bool-for-action"),
    pytest.param(b'"action": "3"', "action", id="digit-string-action"),
    pytest.param(b'"episode_id": 1.5', "episode_id", id="float-episode-id"),
    pytest.param(b'"episode_id": ""', "episode_id", id="empty-episode-id"),
    pytest.param(b'"step": -1', "step", id="negative-step"),
    pytest.param(b'"reward": Infinity', "reward", id="infinite-reward"),
]


@pytest.mark.parametrize(("fragment", "field"), BAD_VALUES)
def test_bad_value_is_rejected_naming_the_field(fragment: bytes, field: str) -> None:
    # Raw JSON text: NaN, Infinity and 1e309 are what a sender's json.dumps really produces.
    name = fragment.split(b":")[0].strip(b'"').decode()
    body = json.dumps(without(event_dict(), name))[:-1].encode() + b", " + fragment + b"}"
    index, reason, detail = only_reject(decode(body))
    assert (index, reason) == (0, REASON_VALIDATION)
    assert detail.startswith(field), detail


def test_json_nan_literal_parses_to_nan_and_is_still_rejected() -> None:
    record = json.loads(b'{"severity": NaN}')
    assert np.isnan(record["severity"])  # what the stdlib hands to validation
    _, _, detail = only_reject(validate_records([event_dict(severity=record["severity"])]))
    assert detail.startswith("severity")


def test_missing_field_is_rejected_naming_it() -> None:
    _, reason, detail = only_reject(decode_one(without(event_dict(), "cpu_usage")))
    assert reason == REASON_VALIDATION
    assert "cpu_usage" in detail
    assert "required" in detail.lower()


def test_extra_fields_are_ignored() -> None:
    decoded = decode_one(event_dict(syscall_types={"open": 3}, family="worm", comment=[1, 2]))
    assert decoded.rejects == []
    assert len(decoded.events) == 1
    assert not hasattr(decoded.events[0], "family")


@pytest.mark.parametrize(("given", "expected"), [("Quarantine", 3), ("ignore", 0), (" REVIEW ", 4), (2, 2)])
def test_action_by_name_or_number(given: object, expected: int) -> None:
    decoded = decode_one(event_dict(action=given))
    assert decoded.rejects == []
    assert decoded.events[0].action == expected


@pytest.mark.parametrize("episode_id", [7, "7", "sample-7f3a"])
def test_episode_id_int_or_str_and_7_is_the_same_episode_as_seven(episode_id: object) -> None:
    event = decode_one(event_dict(episode_id=episode_id, sandbox_id="sb")).events[0]
    assert event.episode_id == episode_id
    assert event.episode_key == ("sb", str(episode_id))


def test_int_count_accepted_for_float_field() -> None:
    # JSON has no separate int type: `"cpu_usage": 12` is a number, not a coercion.
    assert decode_one(event_dict(cpu_usage=12, severity=1)).events[0].cpu_usage == 12.0


# --- framing: one object or an array, JSON or msgpack ---------------------------------------------


def test_one_object_and_an_array_of_objects() -> None:
    single = decode(json.dumps(event_dict()).encode())
    many = decode(json.dumps([event_dict(step=0), event_dict(step=1)]).encode())
    assert len(single.events) == 1
    assert single.indices == [0]
    assert [e.step for e in many.events] == [0, 1]
    assert many.indices == [0, 1]


@pytest.mark.parametrize("content_type", ["application/msgpack", "application/x-msgpack", None])
def test_msgpack_by_content_type_or_first_byte(content_type: str | None) -> None:
    decoded = decode(msgpack.packb([event_dict(step=3), event_dict(step=4)]), content_type)
    assert decoded.rejects == []
    assert [e.step for e in decoded.events] == [3, 4]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", None])
def test_json_by_content_type_or_first_byte(content_type: str | None) -> None:
    body = b"\n  " + json.dumps(event_dict(step=5)).encode()
    assert decode(body, content_type).events[0].step == 5


def test_content_type_wins_over_first_byte() -> None:
    # JSON bytes declared msgpack are not guessed at: they fail as msgpack.
    index, reason, detail = only_reject(decode(json.dumps(event_dict()).encode(), "application/msgpack"))
    assert (index, reason) == (-1, REASON_DECODE)
    assert "msgpack" in detail


def test_msgpack_and_json_give_the_same_event() -> None:
    record = event_dict(episode_id="abc", action="contain", timestamp=1.5e9, final=True)
    assert decode(msgpack.packb(record)).events == decode(json.dumps(record).encode()).events


# --- hostile payloads come back as rejects ---------------------------------------------------------


def test_deeply_nested_json_is_a_decode_reject() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    index, reason, _ = only_reject(decode(body, max_bytes=1 << 20))
    assert (index, reason) == (-1, REASON_DECODE)


def test_deeply_nested_json_inside_an_event_is_a_decode_reject() -> None:
    body = json.dumps(event_dict())[:-1].encode() + b', "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert only_reject(decode(body))[:2] == (-1, REASON_DECODE)


def test_deeply_nested_msgpack_is_a_decode_reject() -> None:
    body = b"\x91" * 100_000 + b"\x90"  # fixarray(1) x 100k around an empty array
    assert only_reject(decode(body, "application/msgpack"))[:2] == (-1, REASON_DECODE)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"\xc1", b"\xff\xfe", b"null", b"{}garbage", b'"just a string"', b"\x81\x01\x02"],
    ids=["empty", "truncated-json", "msgpack-never-used", "bom", "null", "trailing", "string", "int-key"],
)
def test_garbage_is_a_reject_not_an_exception(body: bytes) -> None:
    decoded = decode(body)
    assert decoded.events == []
    assert decoded.rejects
    assert all(r.reason in (REASON_DECODE, REASON_SHAPE) for r in decoded.rejects)


def test_too_large_message_is_rejected_before_parsing() -> None:
    body = json.dumps([event_dict(step=i) for i in range(20)]).encode()
    index, reason, detail = only_reject(decode(body, max_bytes=len(body) - 1))
    assert (index, reason) == (-1, REASON_TOO_LARGE)
    assert str(len(body)) in detail
    assert len(decode(body, max_bytes=len(body)).events) == 20


def test_too_many_events_in_one_message() -> None:
    body = msgpack.packb([event_dict(step=i) for i in range(11)])
    assert only_reject(decode(body, max_events=10))[:2] == (-1, REASON_TOO_MANY)
    assert len(decode(body, max_events=11).events) == 11


def test_good_events_of_a_mixed_array_are_kept_with_their_indices() -> None:
    records = [
        event_dict(step=0),
        event_dict(step=1, severity="high"),
        "not an event",
        event_dict(step=3),
        without(event_dict(step=4), "step"),
        event_dict(step=5, action="quarantine"),
    ]
    decoded = decode(json.dumps(records).encode())
    assert [e.step for e in decoded.events] == [0, 3, 5]
    assert decoded.indices == [0, 3, 5]
    assert [(r.position, r.reason) for r in decoded.rejects] == [
        (1, REASON_VALIDATION),
        (2, REASON_SHAPE),
        (4, REASON_VALIDATION),
    ]
    assert decoded.rejects[0].detail.startswith("severity")
    assert decoded.rejects[2].detail.startswith("step")


# --- files -----------------------------------------------------------------------------------------


def test_read_events_file_json_array(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text(json.dumps([event_dict(step=0), event_dict(step=1, cpu_usage=-1), event_dict(step=2)]))
    decoded = read_events_file(path)
    assert [e.step for e in decoded.events] == [0, 2]
    assert decoded.indices == [0, 2]
    assert [(r.position, r.reason) for r in decoded.rejects] == [(1, REASON_VALIDATION)]


def test_read_events_file_json_lines_reports_bad_lines_by_line_index(tmp_path: Path) -> None:
    lines = [
        json.dumps(event_dict(step=0)),
        "",  # blank lines are skipped, not rejected
        "{this is not json",
        json.dumps(event_dict(step=1, syscall_count=True)),
        json.dumps(event_dict(step=2)),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    decoded = read_events_file(path)
    assert [e.step for e in decoded.events] == [0, 2]
    assert decoded.indices == [0, 4]
    assert [(r.position, r.reason) for r in decoded.rejects] == [(2, REASON_DECODE), (3, REASON_VALIDATION)]
    assert "line 3" in decoded.rejects[0].detail
    assert decoded.rejects[1].detail.startswith("syscall_count")


def test_read_events_file_deeply_nested_array_is_a_reject(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    decoded = read_events_file(path)
    assert decoded.events == []
    assert decoded.rejects[0].reason == REASON_DECODE


# --- raw matrix ------------------------------------------------------------------------------------


def test_raw_matrix_lays_out_raw_fields_in_order() -> None:
    event = make_event(registry_modification=True, code_injection_detected=True)
    row = raw_matrix([event])
    assert row.shape == (1, len(RAW_FIELDS))
    assert row.dtype == np.float64
    assert row[0].tolist() == [float(getattr(event, name)) for name in RAW_FIELDS]
    assert raw_matrix([]).shape == (0, len(RAW_FIELDS))
