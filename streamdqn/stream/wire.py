"""Wire format of sandbox telemetry: the event model and `decode(bytes) -> (events, rejects)`.

Bad input is data, not an exception: every undecodable message and every invalid event comes back
as a `Reject` whose reason is a short, low-cardinality code (it becomes a metric label) and whose
detail names the offending field. Nothing here raises on input, whatever the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import msgpack
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError


class Action(IntEnum):
    IGNORE = 0
    CONTAIN = 1
    TERMINATE = 2
    QUARANTINE = 3
    REVIEW = 4


ACTION_NAMES: tuple[str, ...] = tuple(a.name.lower() for a in Action)

# Numeric fields in the order `raw_matrix` lays them out; features.py builds on this order.
COUNT_FIELDS: tuple[str, ...] = (
    "syscall_count",
    "file_read_count",
    "file_write_count",
    "network_connections",
    "bytes_sent",
    "bytes_received",
    "child_processes",
)
FLAG_FIELDS: tuple[str, ...] = (
    "registry_modification",
    "privilege_escalation_attempt",
    "code_injection_detected",
)
RAW_FIELDS: tuple[str, ...] = (*COUNT_FIELDS, "cpu_usage", "memory_usage", *FLAG_FIELDS)

# Reject reasons (metric label values). Keep this set small and stable.
REASON_TOO_LARGE = "too_large"
REASON_DECODE = "decode_error"
REASON_SHAPE = "not_an_event"
REASON_TOO_MANY = "too_many_events"
REASON_VALIDATION = "validation_error"


def _action_from_name(value: object) -> object:
    if isinstance(value, str):
        name = value.strip().lower()
        if name not in ACTION_NAMES:
            raise ValueError(f"unknown action {value!r}; expected 0..4 or one of {', '.join(ACTION_NAMES)}")
        return ACTION_NAMES.index(name)
    return value


Count = Annotated[int, Field(ge=0, le=2**53)]
Flag = bool
ActionField = Annotated[int, BeforeValidator(_action_from_name), Field(ge=0, le=len(Action) - 1)]


class TelemetryEvent(BaseModel):
    """One step of one detonation, as a sandbox reports it.

    Strict: no string-to-number coercion, no bool-as-int, no NaN or infinity, bounds on every value.
    Unknown extra fields (e.g. `syscall_types`) are ignored.
    """

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    episode_id: int | Annotated[str, Field(min_length=1, max_length=256)]
    step: Annotated[int, Field(ge=0, le=10**9)]
    is_malicious: bool
    severity: Annotated[float, Field(ge=0.0, le=1.0)]
    syscall_count: Count
    file_read_count: Count
    file_write_count: Count
    network_connections: Count
    bytes_sent: Count
    bytes_received: Count
    child_processes: Count
    cpu_usage: Annotated[float, Field(ge=0.0, le=100.0)]
    memory_usage: Annotated[float, Field(ge=0.0, le=1e9)]
    registry_modification: Flag
    privilege_escalation_attempt: Flag
    code_injection_detected: Flag
    sandbox_id: Annotated[str, Field(min_length=1, max_length=256)] = "default"
    timestamp: Annotated[float, Field(ge=0.0)] | None = None
    final: bool = False
    action: ActionField | None = None
    action_prob: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    policy_version: Annotated[str, Field(max_length=256)] | None = None
    reward: Annotated[float, Field(ge=-1e6, le=1e6)] | None = None

    @property
    def episode_key(self) -> tuple[str, str]:
        """(sandbox_id, episode_id) as strings: 7 and "7" name the same episode."""
        return (self.sandbox_id, str(self.episode_id))


_EVENT_LIST = TypeAdapter(list[TelemetryEvent])


class Reject(NamedTuple):
    """A record that did not become an event. `index` is its position in the message (-1: all of it)."""

    index: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Decoded:
    events: list[TelemetryEvent] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    # Position of each event in its message, parallel to `events`.
    indices: list[int] = field(default_factory=list)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"][1:]) or "event"
    return f"{where}: {error['msg']}"


def validate_records(records: Sequence[object]) -> Decoded:
    """Validate already-parsed records; each bad one becomes a Reject naming its fields."""
    try:
        events = _EVENT_LIST.validate_python(records)
        return Decoded(events=events, indices=list(range(len(records))))
    except ValidationError as exc:
        problems: dict[int, list[str]] = {}
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            index = loc[0] if loc and isinstance(loc[0], int) else -1
            problems.setdefault(index, []).append(_describe(error))
    if -1 in problems:  # the container itself was wrong; cannot happen for a list, kept for safety
        return Decoded(rejects=[Reject(-1, REASON_SHAPE, "; ".join(problems[-1]))])
    good = [i for i in range(len(records)) if i not in problems]
    events = _EVENT_LIST.validate_python([records[i] for i in good])
    rejects = []
    for index in sorted(problems):
        record = records[index]
        reason = REASON_SHAPE if not isinstance(record, dict) else REASON_VALIDATION
        rejects.append(Reject(index, reason, "; ".join(problems[index])[:1000]))
    return Decoded(events=events, rejects=rejects, indices=good)


def parse_payload(payload: bytes, content_type: str | None = None) -> list[object]:
    """Bytes to a list of records: JSON or msgpack, one object or an array of objects.

    The format comes from `content_type` when it says json or msgpack, else from the first byte
    (JSON starts with `{`, `[` or whitespace; msgpack maps and arrays never do). Raises ValueError.
    """
    kind = _format_of(payload, content_type)
    try:
        if kind == "json":
            value = json.loads(payload)
        else:
            value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except Exception as exc:
        raise ValueError(f"undecodable {kind}: {exc}"[:500]) from None
    return value if isinstance(value, list) else [value]


def _format_of(payload: bytes, content_type: str | None) -> str:
    if content_type:
        ct = content_type.lower()
        if "msgpack" in ct:
            return "msgpack"
        if "json" in ct:
            return "json"
    first = payload[:1]
    return "json" if first in (b"{", b"[", b" ", b"\n", b"\r", b"\t") else "msgpack"


def parse_message(
    payload: bytes, content_type: str | None = None, *, max_bytes: int = 1 << 20, max_events: int = 10_000
) -> list[object] | Reject:
    """The records of one message, or the Reject of the whole message (too large, undecodable, too
    many events). Never raises."""
    if len(payload) > max_bytes:
        return Reject(-1, REASON_TOO_LARGE, f"message of {len(payload)} bytes > {max_bytes}")
    try:
        records = parse_payload(payload, content_type)
    except ValueError as exc:
        return Reject(-1, REASON_DECODE, str(exc))
    if len(records) > max_events:
        return Reject(-1, REASON_TOO_MANY, f"{len(records)} events in one message > {max_events}")
    return records


def decode(
    payload: bytes,
    content_type: str | None = None,
    *,
    max_bytes: int = 1 << 20,
    max_events: int = 10_000,
) -> Decoded:
    """Decode and validate one message. Never raises: bad input comes back as rejects."""
    records = parse_message(payload, content_type, max_bytes=max_bytes, max_events=max_events)
    if isinstance(records, Reject):
        return Decoded(rejects=[records])
    return validate_records_safely(records)


def validate_records_safely(records: Sequence[object]) -> Decoded:
    """`validate_records`; an unexpected validator exception rejects every record instead of raising."""
    try:
        return validate_records(records)
    except Exception as exc:  # a validator bug must not take the stream down with it
        return Decoded(rejects=[Reject(-1, REASON_VALIDATION, f"{type(exc).__name__}: {exc}"[:500])])


def read_events_file(path: Path) -> Decoded:
    """Read a telemetry file: a JSON array (the original format) or JSON Lines.

    Reject indices are record positions (line numbers minus one for JSON Lines).
    """
    data = Path(path).read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data)
        except (ValueError, RecursionError) as exc:
            return Decoded(rejects=[Reject(-1, REASON_DECODE, f"{path}: not a JSON array: {exc}"[:500])])
        return validate_records(records)
    lines = data.splitlines()
    parsed: list[object] = []
    line_of: list[int] = []
    rejects: list[Reject] = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
            line_of.append(number)
        except (ValueError, RecursionError) as exc:
            rejects.append(Reject(number, REASON_DECODE, f"line {number + 1}: {exc}"[:500]))
    result = validate_records(parsed)
    rejects += [r._replace(index=line_of[r.index]) for r in result.rejects]
    rejects.sort()
    return Decoded(events=result.events, rejects=rejects, indices=[line_of[i] for i in result.indices])


def raw_matrix(events: Iterable[TelemetryEvent]) -> np.ndarray:
    """The numeric fields of events as a float64 matrix [N, len(RAW_FIELDS)] in RAW_FIELDS order."""
    rows = [
        (
            e.syscall_count,
            e.file_read_count,
            e.file_write_count,
            e.network_connections,
            e.bytes_sent,
            e.bytes_received,
            e.child_processes,
            e.cpu_usage,
            e.memory_usage,
            e.registry_modification,
            e.privilege_escalation_attempt,
            e.code_injection_detected,
        )
        for e in events
    ]
    return np.array(rows, dtype=np.float64).reshape(-1, len(RAW_FIELDS))
