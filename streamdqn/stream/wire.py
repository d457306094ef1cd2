"""Wire format of sandbox telemetry: the event schema, and bytes to columns.

The schema is defined once, in FIELDS. Two validators are derived from it:

- the fast path, a msgspec struct (types and bounds checked in C) decoding one record per call, then
  the few checks msgspec cannot express (finite timestamps, action names) vectorized over the batch;
- the careful path, a strict pydantic model, for the records the fast path refused. It names every
  offending field of every bad event (msgspec stops at the first) and accepts what msgspec's parser
  cannot read but JSON allows (a NaN literal, a lone surrogate, integers beyond 64 bits), so that
  rejects keep their reasons and details, and the good events of a partly bad message are kept.

An accepted record decodes to the same event on either path. Bad input is data, not an exception:
every undecodable message and every invalid event comes back as a `Reject` whose reason is a short,
low-cardinality code (it becomes a metric label) and whose detail names the offending field. Nothing
here raises on input, whatever the bytes.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, NamedTuple, Protocol

import msgpack
import msgspec
import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic import Field as PydanticField


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

_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One field of the event schema: its type, bounds and default (_REQUIRED: none)."""

    name: str
    kind: str  # int, float, bool, str, id (int or str), action (0..4 or a name)
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    default: object = _REQUIRED
    optional: bool = False  # None is a valid value
    doc: str = ""


_MAX_COUNT = 2**53

FIELDS: tuple[Field, ...] = (
    Field("episode_id", "id", min_length=1, max_length=256,
          doc="the detonation; 7 and \"7\" name the same episode"),
    Field("step", "int", ge=0, le=10**9, doc="position in the episode, increasing"),
    *(Field(name, "int", ge=0, le=_MAX_COUNT) for name in COUNT_FIELDS),
    Field("cpu_usage", "float", ge=0.0, le=100.0, doc="percent"),
    Field("memory_usage", "float", ge=0.0, le=1e9, doc="MB"),
    *(Field(name, "bool") for name in FLAG_FIELDS),
    Field("is_malicious", "bool", optional=True, default=None,
          doc="the label when the sandbox knows it (with severity); else a verdict comes later"),
    Field("severity", "float", ge=0.0, le=1.0, optional=True, default=None,
          doc="0..1; given together with is_malicious or not at all"),
    Field("sandbox_id", "str", min_length=1, max_length=256, default="default"),
    Field("timestamp", "float", ge=0.0, optional=True, default=None, doc="event time, epoch seconds"),
    Field("final", "bool", default=False, doc="the episode's last step"),
    Field("action", "action", optional=True, default=None,
          doc="what the deployed policy did (0..4 or a name)"),
    Field("action_prob", "float", gt=0.0, le=1.0, optional=True, default=None,
          doc="the probability with which it chose that action"),
    Field("policy_version", "str", max_length=256, optional=True, default=None,
          doc="the snapshot version the sandbox acted with"),
    Field("reward", "float", ge=-1e6, le=1e6, optional=True, default=None,
          doc="the reward of the logged action (of ignore when none is logged), overriding the table"),
    Field("shadow", "bool", default=False,
          doc="the logged action was only recorded, not carried out: the detonation went on"),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)


# --- the fast path: msgspec -------------------------------------------------------------------


def _bounds(f: Field) -> dict[str, Any]:
    return {k: v for k, v in (("ge", f.ge), ("gt", f.gt), ("le", f.le), ("min_length", f.min_length),
                              ("max_length", f.max_length)) if v is not None}


def _msgspec_type(f: Field) -> Any:
    meta = msgspec.Meta(**_bounds(f))
    base: Any = {
        "int": int, "float": float, "bool": bool, "str": str,
        "id": int | Annotated[str, meta],
        "action": int | str,
    }[f.kind]
    if f.kind in ("int", "float", "str") and any(v is not None for v in (f.ge, f.gt, f.le, f.min_length,
                                                                       f.max_length)):
        base = Annotated[base, meta]
    return base | None if f.optional else base


WireEvent: Any = msgspec.defstruct(
    "WireEvent",
    [(f.name, _msgspec_type(f)) if f.default is _REQUIRED else (f.name, _msgspec_type(f), f.default)
     for f in FIELDS],
    frozen=True,
)
_MSGPACK = msgspec.msgpack.Decoder(WireEvent | list[WireEvent])
_JSON = msgspec.json.Decoder(WireEvent | list[WireEvent])


# --- the careful path: pydantic ---------------------------------------------------------------


def _action_from_name(value: object) -> object:
    if isinstance(value, str):
        name = value.strip().lower()
        if name not in ACTION_NAMES:
            raise ValueError(f"unknown action {value!r}; expected 0..4 or one of {', '.join(ACTION_NAMES)}")
        return ACTION_NAMES.index(name)
    return value


def _pydantic_type(f: Field) -> Any:
    bounds = _bounds(f)
    if f.kind == "id":
        base: Any = int | Annotated[str, PydanticField(**bounds)]
    elif f.kind == "action":
        base = Annotated[int, BeforeValidator(_action_from_name), PydanticField(ge=0, le=len(Action) - 1)]
    else:
        base = {"int": int, "float": float, "bool": bool, "str": str}[f.kind]
        if bounds:
            base = Annotated[base, PydanticField(**bounds)]
    return base | None if f.optional else base


class _EventBase(BaseModel):
    # Strict: no string-to-number coercion, no bool-as-int, no NaN or infinity, bounds on every value.
    # Unknown extra fields (e.g. `syscall_types`) are ignored.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    @model_validator(mode="after")
    def _label_complete(self) -> Any:
        if (self.is_malicious is None) != (self.severity is None):  # type: ignore[attr-defined]
            raise ValueError("is_malicious and severity come together (a label) or not at all")
        return self

    @property
    def episode_key(self) -> tuple[str, str]:
        """(sandbox_id, episode_id) as strings: 7 and "7" name the same episode."""
        return (self.sandbox_id, str(self.episode_id))  # type: ignore[attr-defined]


TelemetryEvent: Any = create_model(  # type: ignore[call-overload]
    "TelemetryEvent",
    __base__=_EventBase,
    __doc__="One step of one detonation, as a sandbox reports it (the careful path's model).",
    **{f.name: (_pydantic_type(f), ...) if f.default is _REQUIRED else (_pydantic_type(f), f.default)
       for f in FIELDS},
)
_EVENT_LIST = TypeAdapter(list[TelemetryEvent])


class Event(Protocol):
    """An event as either path decodes it (the fields of FIELDS are its attributes)."""

    episode_id: int | str
    step: int
    sandbox_id: str
    is_malicious: bool | None
    severity: float | None
    final: bool

    @property
    def episode_key(self) -> tuple[str, str]: ...


class Reject(NamedTuple):
    """A record that did not become an event, at `position` in its message (-1: all of it)."""

    position: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Decoded:
    events: list[Any] = field(default_factory=list)  # TelemetryEvent instances
    rejects: list[Reject] = field(default_factory=list)
    # Position of each event in its message, parallel to `events`.
    indices: list[int] = field(default_factory=list)


def _describe(error: Any) -> str:
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


def validate_records_safely(records: Sequence[object]) -> Decoded:
    """`validate_records`; an unexpected validator exception rejects every record instead of raising."""
    try:
        return validate_records(records)
    except Exception as exc:  # noqa: BLE001 - a validator bug must not take the stream down with it
        return Decoded(rejects=[Reject(-1, REASON_VALIDATION, f"{type(exc).__name__}: {exc}"[:500])])


def format_of(payload: bytes, content_type: str | None) -> str:
    """'json' or 'msgpack': from the content type when it says so, else from the first byte (JSON
    starts with `{`, `[` or whitespace; msgpack maps and arrays never do)."""
    if content_type:
        ct = content_type.lower()
        if "msgpack" in ct:
            return "msgpack"
        if "json" in ct:
            return "json"
    first = payload[:1]
    return "json" if first in (b"{", b"[", b" ", b"\n", b"\r", b"\t") else "msgpack"


def parse_payload(payload: bytes, content_type: str | None = None) -> list[object]:
    """Bytes to a list of records: JSON or msgpack, one object or an array of objects. Raises ValueError."""
    kind = format_of(payload, content_type)
    try:
        if kind == "json":
            value = json.loads(payload)
        else:
            value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - the parsers raise a dozen types on bad bytes; all mean "undecodable"
        raise ValueError(f"undecodable {kind}: {exc}"[:500]) from None
    return value if isinstance(value, list) else [value]


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
    payload: bytes, content_type: str | None = None, *, max_bytes: int = 1 << 20, max_events: int = 10_000
) -> Decoded:
    """Decode and validate one message on the careful path. Never raises."""
    records = parse_message(payload, content_type, max_bytes=max_bytes, max_events=max_events)
    if isinstance(records, Reject):
        return Decoded(rejects=[records])
    return validate_records_safely(records)


# --- columns --------------------------------------------------------------------------------------


class EventColumns(NamedTuple):
    """Events as columns, in arrival order (what the rest of the stream stage works on)."""

    raw: np.ndarray  # float64 [N, 12] in RAW_FIELDS order
    step: np.ndarray  # int64 [N]
    final: np.ndarray  # bool [N]
    malicious: np.ndarray  # int8 [N]: 1, 0, or -1 when the event carries no label
    severity: np.ndarray  # float64 [N]: NaN when absent
    action: np.ndarray  # int8 [N]: -1 when no action is logged
    action_prob: np.ndarray  # float64 [N]: NaN when absent
    reward: np.ndarray  # float64 [N]: NaN when absent
    shadow: np.ndarray  # bool [N]
    timestamp: np.ndarray  # float64 [N]: NaN when absent
    sandbox_id: list[str]
    episode_id: list[int | str]
    policy_version: list[str | None]

    @property
    def size(self) -> int:
        """How many events (len() stays the tuple's field count, as for any NamedTuple)."""
        return len(self.step)

    def take(self, index: np.ndarray) -> EventColumns:
        index = np.asarray(index, dtype=np.int64)
        arrays = [c[index] for c in self[:10]]
        lists = [[c[i] for i in index.tolist()] for c in self[10:]]
        return EventColumns(*arrays, *lists)

    @staticmethod
    def concat(parts: Sequence[EventColumns]) -> EventColumns:
        if len(parts) == 1:
            return parts[0]
        arrays = [np.concatenate([p[i] for p in parts]) for i in range(10)]
        lists = [list(chain.from_iterable(p[i] for p in parts)) for i in range(10, 13)]
        return EventColumns(*arrays, *lists)  # type: ignore[arg-type]


_RAW = operator.attrgetter(*RAW_FIELDS)
_SCALARS = operator.attrgetter("step", "final", "is_malicious", "severity", "action", "action_prob",
                               "reward", "shadow", "timestamp")
_NAMES = operator.attrgetter("sandbox_id", "episode_id", "policy_version")
_ACTION_INDEX = {name: i for i, name in enumerate(ACTION_NAMES)}


def columns_of(events: Sequence[Any]) -> EventColumns:
    """Columns of events of either path (the fast path's structs or the careful path's models)."""
    n = len(events)
    if n == 0:
        return _EMPTY
    raw = np.fromiter(chain.from_iterable(map(_RAW, events)), dtype=np.float64, count=n * len(RAW_FIELDS))
    step, final, mal, sev, action, prob, reward, shadow, ts = zip(*map(_SCALARS, events), strict=True)
    sandbox, episode, version = zip(*map(_NAMES, events), strict=True)
    return EventColumns(
        raw=raw.reshape(n, len(RAW_FIELDS)),
        step=np.array(step, dtype=np.int64),
        final=np.array(final, dtype=bool),
        malicious=np.nan_to_num(np.array(mal, dtype=np.float64), nan=-1.0).astype(np.int8),
        severity=np.array(sev, dtype=np.float64),
        action=_action_column(action),
        action_prob=np.array(prob, dtype=np.float64),
        reward=np.array(reward, dtype=np.float64),
        shadow=np.array(shadow, dtype=bool),
        timestamp=np.array(ts, dtype=np.float64),
        sandbox_id=list(sandbox),
        episode_id=list(episode),
        policy_version=list(version),
    )


def _action_column(actions: tuple[Any, ...]) -> np.ndarray:
    """Logged actions as int8, -1 for none; a name or number outside the actions becomes 127 (invalid)."""
    if all(a is None for a in actions):
        return np.full(len(actions), -1, dtype=np.int8)
    out = np.empty(len(actions), dtype=np.int8)
    for i, a in enumerate(actions):
        if a is None:
            out[i] = -1
        elif isinstance(a, str):
            out[i] = _ACTION_INDEX.get(a.strip().lower(), 127)
        else:
            out[i] = a if 0 <= a < len(Action) else 127
    return out


_EMPTY = EventColumns(np.zeros((0, len(RAW_FIELDS))), np.zeros(0, np.int64), np.zeros(0, bool),
                      np.zeros(0, np.int8), np.zeros(0), np.zeros(0, np.int8), np.zeros(0), np.zeros(0),
                      np.zeros(0, bool), np.zeros(0), [], [], [])


# --- a poll batch --------------------------------------------------------------------------------


class DecodedBatch(NamedTuple):
    """The events of a batch of records as columns, with where each came from, and every reject."""

    events: EventColumns
    origin: np.ndarray  # int64 [N]: the record's position in the batch; non-decreasing
    position: np.ndarray  # int64 [N]: the event's position in its record's message
    rejects: dict[int, list[Reject]]  # record position -> its rejects (positions within its message)


def decode_batch(
    values: Sequence[bytes], content_types: Sequence[str | None], *, max_bytes: int = 1 << 20,
    max_events: int = 10_000,
) -> DecodedBatch:
    """Decode and validate a poll batch: the fast path for each record, the careful path for those it
    refuses. Never raises."""
    structs: list[Any] = []
    origin: list[int] = []
    position: list[int] = []
    careful: list[int] = []
    rejects: dict[int, list[Reject]] = {}
    for r, (value, content_type) in enumerate(zip(values, content_types, strict=True)):
        if len(value) > max_bytes:
            rejects[r] = [Reject(-1, REASON_TOO_LARGE, f"message of {len(value)} bytes > {max_bytes}")]
            continue
        decoder = _JSON if format_of(value, content_type) == "json" else _MSGPACK
        try:
            decoded = decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            careful.append(r)
            continue
        if isinstance(decoded, list):
            if len(decoded) > max_events:
                detail = f"{len(decoded)} events in one message > {max_events}"
                rejects[r] = [Reject(-1, REASON_TOO_MANY, detail)]
                continue
            structs.extend(decoded)
            origin.extend([r] * len(decoded))
            position.extend(range(len(decoded)))
        else:
            structs.append(decoded)
            origin.append(r)
            position.append(0)
    columns = columns_of(structs)
    origin_a = np.array(origin, dtype=np.int64)
    position_a = np.array(position, dtype=np.int64)
    # What msgspec cannot check: infinite timestamps, unknown action names or numbers, half a label.
    half_label = (columns.malicious >= 0) != ~np.isnan(columns.severity)
    invalid = (columns.action == 127) | np.isinf(columns.timestamp) | half_label
    if invalid.any():
        careful.extend(np.unique(origin_a[invalid]).tolist())
        keep = ~np.isin(origin_a, origin_a[invalid])
        columns, origin_a, position_a = columns.take(np.flatnonzero(keep)), origin_a[keep], position_a[keep]
    if not careful:
        return DecodedBatch(columns, origin_a, position_a, rejects)
    parts, origins, positions = [columns], [origin_a], [position_a]
    for r in sorted(careful):
        decoded = decode(values[r], content_types[r], max_bytes=max_bytes, max_events=max_events)
        if decoded.rejects:
            rejects[r] = list(decoded.rejects)
        if decoded.events:
            parts.append(columns_of(decoded.events))
            origins.append(np.full(len(decoded.events), r, dtype=np.int64))
            positions.append(np.array(decoded.indices, dtype=np.int64))
    origin_a = np.concatenate(origins)
    order = np.argsort(origin_a, kind="stable")
    events = EventColumns.concat(parts).take(order)
    position_a = np.concatenate(positions)[order]
    return DecodedBatch(events, origin_a[order], position_a, dict(sorted(rejects.items())))


# --- files ----------------------------------------------------------------------------------------


def read_events_file(path: Path) -> Decoded:
    """Read a telemetry file: a JSON array (the original format) or JSON Lines (careful path).

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
    rejects += [r._replace(position=line_of[r.position]) for r in result.rejects]
    rejects.sort()
    return Decoded(events=result.events, rejects=rejects, indices=[line_of[i] for i in result.indices])


def raw_matrix(events: Iterable[Any]) -> np.ndarray:
    """The numeric fields of events as a float64 matrix [N, len(RAW_FIELDS)] in RAW_FIELDS order."""
    rows = [_RAW(e) for e in events]
    return np.array(rows, dtype=np.float64).reshape(-1, len(RAW_FIELDS))
