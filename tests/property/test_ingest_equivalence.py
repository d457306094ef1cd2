"""The columnar ingest stage equals the plain per-record, per-event reference (tests/reference.py) on
mixed good, bad and hostile batches in JSON and msgpack: the same events consumed, the same rejects
(record, position, reason and the fields named) and the same replay rows, however the stream is cut
into poll batches."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import RunningNormalizer
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.rows import ReplayRows, episode_hash
from streamdqn.stream.sources import Record
from tests.factories import activity
from tests.property.examples import examples
from tests.reference import ReferenceTracker, reference_decode

MAX_BYTES, MAX_EVENTS = 4096, 6
GAMMA = 0.9


@st.composite
def episode_events(draw: st.DrawFn, sandbox: str, episode_id: object) -> list[dict[str, Any]]:
    """The events of one episode: steps mostly increasing with the odd duplicate or step back."""
    label = draw(st.one_of(st.none(), st.tuples(st.booleans(), st.floats(0, 1, allow_nan=False))))
    steps = draw(st.lists(st.integers(0, 12), min_size=1, max_size=8))
    events = []
    for i, step in enumerate(steps):
        event = {"sandbox_id": sandbox, "episode_id": episode_id, "step": step, **draw(activity())}
        if label is not None and draw(st.booleans()):
            event["is_malicious"], event["severity"] = label
        if i == len(steps) - 1 and draw(st.booleans()):
            event["final"] = True
        if draw(st.integers(0, 5)) == 0:
            names = st.sampled_from(["ignore", " Review", "CONTAIN"])
            event["action"] = draw(st.one_of(st.integers(0, 4), names))
            event["action_prob"] = draw(st.floats(0.01, 1.0))
            event["shadow"] = draw(st.booleans())
        if draw(st.integers(0, 6)) == 0:
            event["reward"] = draw(st.floats(-50, 50, allow_nan=False))
        if draw(st.booleans()):
            event["timestamp"] = draw(st.floats(0, 2e9, allow_nan=False))
        events.append(event)
    return events


def _broken(event: dict[str, Any], how: int) -> Any:
    bad = dict(event)
    if how == 0:
        bad["severity"], bad["is_malicious"] = 3.0, True
    elif how == 1:
        bad["step"] = "seven"
    elif how == 2:
        del bad["cpu_usage"]
    elif how == 3:
        bad["action"] = "detonate"
    elif how == 4:
        bad["is_malicious"] = True  # half a label
        bad.pop("severity", None)
    elif how == 5:
        bad["timestamp"] = float("inf")
    elif how == 6:
        bad["file_read_count"] = -1
    else:
        return 17  # not an object
    return bad


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Record], list[int]]:
    """Records (one or a few events each, some broken, some hostile bytes) and where batches are cut."""
    sandboxes = draw(st.integers(1, 3))
    events: list[dict[str, Any]] = []
    for s in range(sandboxes):
        for e in range(draw(st.integers(1, 3))):
            episode_id = draw(st.sampled_from([e, str(e), f"ep-{e}", 2**70 + e]))
            events += draw(episode_events(f"sbx-{s}", episode_id))
    # Interleave the sandboxes' events, keeping each sandbox's own order (as one Kafka partition would).
    by_sandbox: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_sandbox[event["sandbox_id"]].append(event)
    order = draw(st.permutations([s for s, evs in by_sandbox.items() for _ in evs]))
    cursor = dict.fromkeys(by_sandbox, 0)
    ordered = []
    for s in order:
        ordered.append(by_sandbox[s][cursor[s]])
        cursor[s] += 1

    records: list[Record] = []
    i = 0
    while i < len(ordered):
        size = draw(st.integers(1, 3))
        chunk: list[Any] = ordered[i : i + size]
        i += size
        if draw(st.integers(0, 7)) == 0:
            chunk[0] = _broken(chunk[0], draw(st.integers(0, 7)))
        fmt = draw(st.sampled_from(["json", "msgpack"]))
        value: Any = chunk[0] if len(chunk) == 1 and draw(st.booleans()) else chunk
        if fmt == "msgpack" and any(isinstance(e, dict) and isinstance(e.get("episode_id"), int)
                                                 and e["episode_id"] >= 2**64 for e in chunk):
            fmt = "json"  # msgpack has no integers that large; JSON does
        payload = json.dumps(value).encode() if fmt == "json" else msgpack.packb(value)
        hostile = draw(st.integers(0, 12))
        if hostile == 0:
            payload = payload[: len(payload) // 2]  # truncated
        elif hostile == 1 and fmt == "json":
            payload = payload.replace(b'"cpu_usage": ', b'"cpu_usage": NaN, "x": ', 1)
        elif hostile == 2:
            payload = b"[" * 3000 + b"]" * 3000 if fmt == "json" else b"\x91" * 3000 + b"\xc0"
        elif hostile == 3:
            payload = b"x" * (MAX_BYTES + 1)
        headers = (("content-type", f"application/{fmt}".encode()),) if draw(st.booleans()) else ()
        records.append(Record("t", 0, len(records), payload, None, headers))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(records))), max_size=4, unique=True)))
    return records, cuts


def _fields(detail: str) -> set[str]:
    return {m.group(1).split(".")[0] for m in re.finditer(r"(?:^|; )(?:\[\d+\] )?([\w.]+):", detail)}


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.sampled_from([1, 3]))
def test_the_columnar_stage_equals_the_per_record_reference(stream: tuple[list[Record], list[int]],
                                                            n_steps: int) -> None:
    records, cuts = stream
    rewards = RewardTable()
    pushed: list[ReplayRows] = []
    tracker = EpisodeTracker(rewards, gamma=GAMMA, n_steps=n_steps, reward_clip=10.0)
    pipeline = IngestPipeline(tracker, RunningNormalizer(), pushed.append,
                              PipelineOptions(max_message_bytes=MAX_BYTES, max_events_per_message=MAX_EVENTS))
    got_rejects: dict[int, list[tuple[int, str, set[str]]]] = {}
    lettered: set[int] = set()
    consumed = 0
    for lo, hi in zip([0, *cuts], [*cuts, len(records)], strict=True):
        outcome = pipeline.process(records[lo:hi], now=0.0)
        consumed += outcome.events
        lettered |= {letter.record.offset for letter in outcome.dead_letters}
        for r, rejects in outcome.rejects.items():
            found = sorted((x.position, x.reason, _fields(x.detail)) for x in rejects)
            got_rejects[records[lo + r].offset] = found
    pipeline.close_all()

    reference = ReferenceTracker(rewards, GAMMA, n_steps, 10.0)
    expected_letters: dict[int, list[tuple[int, str, str]]] = {}
    expected_consumed = 0
    for record in records:
        ct = record.header("content-type")
        events, rejects = reference_decode(record.value, ct.decode() if ct else None, MAX_BYTES, MAX_EVENTS)
        for position, event in events:
            reason = reference.observe(event)
            if reason is None:
                expected_consumed += 1
            else:
                rejects.append((position, reason, ""))
        if rejects:
            expected_letters[record.offset] = sorted(rejects)
    reference.close_all()

    assert consumed == expected_consumed
    assert lettered == set(got_rejects) == set(expected_letters)
    for offset, expected in expected_letters.items():
        got = got_rejects[offset]
        assert [(p, r) for p, r, _ in got] == [(p, r) for p, r, _ in expected], (got, expected)
        for (_, reason, named), (_, _, fields) in zip(got, expected, strict=True):
            if reason == "validation_error":  # every field the reference finds wrong is named
                assert set(fields.split(",")) <= named, (fields, named)

    got_rows = _rows_by_episode(pushed)
    want_rows = {episode_hash(*key): rows for key, rows in reference.rows().items()}
    assert set(got_rows) == set(want_rows)
    for h, want in want_rows.items():
        got = got_rows[h]
        assert got.size == len(want)
        np.testing.assert_allclose(got.states, np.array([r["state"] for r in want]), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got.known, np.array([r["known"] for r in want]))
        np.testing.assert_array_equal(got.horizon, np.array([r["horizon"] for r in want]))
        np.testing.assert_array_equal(got.logged_action, np.array([r["logged_action"] for r in want]))
        values = np.array([r["rewards"] for r in want])
        np.testing.assert_allclose(np.where(got.known, got.rewards, 0), np.where(got.known, values, 0),
                                   rtol=1e-5, atol=1e-5)
        bootstrapping = got.horizon > 0
        np.testing.assert_allclose(got.next_states[bootstrapping],
                                   np.array([r["next"] for r in want])[bootstrapping], rtol=1e-6, atol=1e-6)


def _rows_by_episode(pushed: list[ReplayRows]) -> dict[int, ReplayRows]:
    rows = ReplayRows.concat(pushed)
    out = {}
    for h in np.unique(rows.episode):
        index = np.flatnonzero(rows.episode == h)
        out[int(h)] = ReplayRows(*(c[index] for c in rows))
    return out
