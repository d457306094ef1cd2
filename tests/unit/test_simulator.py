"""The telemetry simulator: wire format, episode structure, stream order, realism and file output."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamdqn.offline.simulator import (
    BENIGN_KINDS,
    MALWARE_FAMILIES,
    format_for_path,
    simulate,
    write_events,
)

Event = dict[str, object]

COUNT_FIELDS = (
    "syscall_count",
    "file_read_count",
    "file_write_count",
    "network_connections",
    "bytes_sent",
    "bytes_received",
    "child_processes",
)
FLAG_FIELDS = ("registry_modification", "privilege_escalation_attempt", "code_injection_detected")
ACTIVITY_FIELDS = (*COUNT_FIELDS, "cpu_usage", "memory_usage")
ALL_FIELDS = {
    "sandbox_id",
    "episode_id",
    "step",
    "timestamp",
    "final",
    "is_malicious",
    "severity",
    *ACTIVITY_FIELDS,
    *FLAG_FIELDS,
    "family",
    "syscall_types",
}
# The signal each family is known by, which should grow as its attack gets going.
KEY_SIGNAL = {
    "ransomware": "file_write_count",
    "dropper": "bytes_received",
    "infostealer": "bytes_sent",
    "cryptominer": "cpu_usage",
    "worm": "network_connections",
    "rootkit": "privilege_escalation_attempt",
    "adware": "registry_modification",
}


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return list(simulate(1_000, seed=20260101))


@pytest.fixture(scope="module")
def episodes(events: list[Event]) -> dict[int, list[Event]]:
    by_episode: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        by_episode[int(event["episode_id"])].append(event)  # type: ignore[call-overload]
    return dict(by_episode)


def first(episode: list[Event]) -> Event:
    return episode[0]


def number(event: Event, field: str) -> float:
    value = event[field]
    assert isinstance(value, int | float)
    return float(value)


def best_threshold_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the best rule `value > t` or `value <= t` (either direction) for one feature."""
    order = np.argsort(values, kind="stable")
    sorted_values, sorted_labels = values[order], labels[order]
    # Only cut between distinct values: equal values must land on the same side.
    cut = np.r_[sorted_values[1:] != sorted_values[:-1], True]
    positives_below = np.cumsum(sorted_labels)[cut]
    negatives_below = np.cumsum(1 - sorted_labels)[cut]
    positives, negatives = sorted_labels.sum(), len(labels) - sorted_labels.sum()
    above_is_positive = (negatives_below + positives - positives_below) / len(labels)
    below_is_positive = (positives_below + negatives - negatives_below) / len(labels)
    majority = max(positives, negatives) / len(labels)
    return float(max(above_is_positive.max(), below_is_positive.max(), majority))


def test_same_seed_gives_identical_output() -> None:
    assert list(simulate(60, seed=7)) == list(simulate(60, seed=7))


def test_different_seeds_give_different_output() -> None:
    assert list(simulate(60, seed=7)) != list(simulate(60, seed=8))


def test_every_event_has_the_wire_fields_with_valid_types_and_ranges(events: list[Event]) -> None:
    for event in events:
        assert set(event) == ALL_FIELDS
        assert isinstance(event["sandbox_id"], str)
        assert event["sandbox_id"].startswith("sbx-")
        for field in ("episode_id", "step", *COUNT_FIELDS):
            assert type(event[field]) is int, field
            assert event[field] >= 0, field  # type: ignore[operator]
        for field in ("final", "is_malicious", *FLAG_FIELDS):
            assert type(event[field]) is bool, field
        for field in ("timestamp", "severity", "cpu_usage", "memory_usage"):
            value = event[field]
            assert type(value) is float and math.isfinite(value), field
            assert round(value, 3) == value, field
        assert 0.0 <= number(event, "severity") <= 1.0
        assert 0.0 <= number(event, "cpu_usage") <= 100.0
        assert number(event, "memory_usage") >= 0.0
        assert event["family"] in BENIGN_KINDS + MALWARE_FAMILIES
        syscalls = event["syscall_types"]
        assert isinstance(syscalls, list)
        assert 1 <= len(syscalls) <= 3
        assert all(isinstance(name, str) and name.startswith("Nt") for name in syscalls)


def test_episodes_have_consecutive_steps_and_one_final_on_the_last(
    episodes: dict[int, list[Event]],
) -> None:
    assert sorted(episodes) == list(range(1_000))
    for episode in episodes.values():
        assert [e["step"] for e in episode] == list(range(len(episode)))
        assert [e["final"] for e in episode] == [False] * (len(episode) - 1) + [True]
        assert 8 <= len(episode) <= 30
        for field in ("sandbox_id", "is_malicious", "severity", "family"):
            assert len({str(e[field]) for e in episode}) == 1, field


def test_stream_is_in_timestamp_order_and_each_sandbox_in_step_order(
    events: list[Event], episodes: dict[int, list[Event]]
) -> None:
    timestamps = [number(e, "timestamp") for e in events]
    assert timestamps == sorted(timestamps)
    assert timestamps[0] > 1_767_225_600.0

    by_sandbox: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_sandbox[str(event["sandbox_id"])].append(event)
    assert len(by_sandbox) == 8
    for sandbox_events in by_sandbox.values():
        stamps = [number(e, "timestamp") for e in sandbox_events]
        assert all(later > earlier for earlier, later in itertools.pairwise(stamps))
        # One episode at a time: an episode's events are contiguous within its sandbox.
        ids = [e["episode_id"] for e in sandbox_events]
        runs = [ids[0]] + [b for a, b in itertools.pairwise(ids) if a != b]
        assert len(runs) == len(set(runs))

    for episode in episodes.values():
        gaps = np.diff([number(e, "timestamp") for e in episode])
        assert np.all(gaps >= 1.0 - 1e-3)
        assert np.all(gaps <= 5.0 + 1e-3)


def test_the_stream_interleaves_sandboxes(events: list[Event]) -> None:
    head = events[:200]
    switches = sum(a["sandbox_id"] != b["sandbox_id"] for a, b in itertools.pairwise(head))
    assert switches > 100


def test_malicious_fraction_is_near_the_requested_one(episodes: dict[int, list[Event]]) -> None:
    share = sum(first(e)["is_malicious"] is True for e in episodes.values()) / len(episodes)
    assert abs(share - 0.5) < 0.06  # about 4 standard deviations of a binomial share


@pytest.mark.parametrize("fraction", [0.0, 0.2, 1.0])
def test_other_malicious_fractions(fraction: float) -> None:
    labels = [
        e["is_malicious"] is True
        for e in simulate(600, seed=3, malicious_fraction=fraction)
        if e["step"] == 0
    ]
    assert abs(sum(labels) / len(labels) - fraction) < 0.07


def test_severity_is_zero_for_benign_and_spans_all_thirds_for_malware(
    episodes: dict[int, list[Event]],
) -> None:
    severities: dict[str, list[float]] = defaultdict(list)
    for episode in episodes.values():
        event = first(episode)
        if event["is_malicious"]:
            assert event["family"] in MALWARE_FAMILIES
            assert 0.0 < number(event, "severity") <= 1.0
        else:
            assert event["family"] in BENIGN_KINDS
            assert event["severity"] == 0.0
        severities[str(event["family"])].append(number(event, "severity"))

    assert set(MALWARE_FAMILIES) <= set(severities)
    malicious = np.concatenate([severities[f] for f in MALWARE_FAMILIES])
    thirds = np.histogram(malicious, bins=[0.0, 1 / 3, 2 / 3, 1.0 + 1e-9])[0]
    assert np.all(thirds >= 0.1 * len(malicious)), thirds
    assert min(severities["ransomware"]) >= 0.75
    assert min(severities["rootkit"]) >= 0.8
    assert max(severities["cryptominer"]) <= 0.35
    assert max(severities["adware"]) <= 0.3
    assert 0.4 <= np.mean(severities["dropper"]) <= 0.7


def test_every_benign_kind_is_present(episodes: dict[int, list[Event]]) -> None:
    kinds = {first(e)["family"] for e in episodes.values() if not first(e)["is_malicious"]}
    assert kinds == set(BENIGN_KINDS)
    assert len(BENIGN_KINDS) >= 5
    assert len(MALWARE_FAMILIES) >= 6


@pytest.mark.parametrize("family", sorted(KEY_SIGNAL))
def test_malicious_activity_ramps_up_over_the_episode(episodes: dict[int, list[Event]], family: str) -> None:
    field = KEY_SIGNAL[family]
    early: list[float] = []
    late: list[float] = []
    for episode in episodes.values():
        if first(episode)["family"] == family:
            third = len(episode) // 3
            early += [number(e, field) for e in episode[:third]]
            late += [number(e, field) for e in episode[-third:]]
    assert late
    assert np.mean(late) > 1.2 * np.mean(early)


def test_some_malware_sleeps_through_its_first_steps(episodes: dict[int, list[Event]]) -> None:
    benign_start = [e for ep in episodes.values() if not first(ep)["is_malicious"] for e in ep[:3]]
    ceiling = {f: np.quantile([number(e, f) for e in benign_start], 0.9) for f in ACTIVITY_FIELDS}

    def looks_benign(event: Event) -> bool:
        no_flags = not any(event[f] for f in FLAG_FIELDS)
        return no_flags and all(number(event, f) <= ceiling[f] for f in ACTIVITY_FIELDS)

    malicious = [ep for ep in episodes.values() if first(ep)["is_malicious"]]
    sleepers = [ep for ep in malicious if all(looks_benign(e) for e in ep[:3])]
    assert len(sleepers) >= 0.05 * len(malicious)
    # ... and yet they do act later on: their late steps are busier than their first ones.
    busier = [
        ep
        for ep in sleepers
        if any(any(e[f] for f in FLAG_FIELDS) or not looks_benign(e) for e in ep[len(ep) // 2 :])
    ]
    assert len(busier) >= 0.5 * len(sleepers)


def test_no_single_feature_separates_the_classes_at_step_zero(episodes: dict[int, list[Event]]) -> None:
    starts = [first(e) for e in episodes.values()]
    labels = np.array([e["is_malicious"] for e in starts], dtype=float)
    for field in (*ACTIVITY_FIELDS, *FLAG_FIELDS):
        values = np.array([number(e, field) for e in starts])
        benign, malicious = values[labels == 0], values[labels == 1]
        assert malicious.min() <= benign.max() and benign.min() <= malicious.max(), field
        assert best_threshold_accuracy(values, labels) < 0.75, field


def test_an_episode_does_not_depend_on_the_sandbox_count() -> None:
    def content(sandboxes: int) -> dict[int, list[tuple[object, ...]]]:
        episodes: dict[int, list[tuple[object, ...]]] = defaultdict(list)
        for event in simulate(30, seed=5, sandboxes=sandboxes):
            kept = tuple(v for k, v in event.items() if k not in ("timestamp", "sandbox_id"))
            episodes[int(event["episode_id"])].append(kept)  # type: ignore[call-overload]
        return dict(episodes)

    one, many = content(1), content(8)
    assert one == many
    assert len({e["sandbox_id"] for e in simulate(30, seed=5, sandboxes=3)}) == 3


def test_simulate_streams_lazily() -> None:
    stream = simulate(10_000_000, seed=1)
    assert next(stream)["step"] == 0


def test_zero_episodes_give_no_events() -> None:
    assert list(simulate(0, seed=1)) == []


def test_family_weights_choose_the_mix() -> None:
    starts = [e for e in simulate(200, seed=2, family_weights={"ransomware": 1.0}) if e["step"] == 0]
    assert {e["family"] for e in starts if e["is_malicious"]} == {"ransomware"}
    kinds = {e["family"] for e in simulate(100, seed=2, kind_weights={"browser": 1}) if not e["is_malicious"]}
    assert kinds == {"browser"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"episodes": -1}, "episodes"),
        ({"seed": -3}, "seed"),
        ({"sandboxes": 0}, "sandboxes"),
        ({"malicious_fraction": -0.1}, "malicious_fraction"),
        ({"malicious_fraction": 1.5}, "malicious_fraction"),
        ({"malicious_fraction": math.nan}, "malicious_fraction"),
        ({"start_time": math.inf}, "start_time"),
        ({"family_weights": {"ransomware": 1.0, "bogus": 1.0}}, "bogus"),
        ({"family_weights": {"ransomware": -1.0}}, "family_weights"),
        ({"family_weights": {"ransomware": 0.0}}, "at least one"),
        ({"kind_weights": {"browser": math.inf}}, "kind_weights"),
    ],
)
def test_bad_arguments_raise_at_call_time(arguments: dict[str, object], message: str) -> None:
    call: dict[str, object] = {"episodes": 10, "seed": 0, **arguments}
    with pytest.raises(ValueError, match=message):
        simulate(**call)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_write_events_round_trips(tmp_path: Path, fmt: str) -> None:
    events = list(simulate(40, seed=9))
    path = tmp_path / f"events.{fmt}"
    assert write_events(path, iter(events), fmt=fmt) == len(events)  # type: ignore[arg-type]
    text = path.read_text(encoding="utf-8")
    loaded = [json.loads(line) for line in text.splitlines()] if fmt == "jsonl" else json.loads(text)
    assert loaded == events
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_write_events_of_nothing_is_valid(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "empty"
    assert write_events(path, [], fmt=fmt) == 0  # type: ignore[arg-type]
    text = path.read_text(encoding="utf-8")
    assert (text == "") if fmt == "jsonl" else (json.loads(text) == [])


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("old\n", encoding="utf-8")

    def broken() -> Iterator[Event]:
        yield from simulate(2, seed=1)
        yield {"cpu_usage": math.nan}

    with pytest.raises(ValueError, match="JSON"):
        write_events(path, broken())
    assert path.read_text(encoding="utf-8") == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_write_events_rejects_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        write_events(tmp_path / "x", [], fmt="csv")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.json", "json"), ("a.JSON", "json"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a", "jsonl")],
)
def test_format_for_path(name: str, fmt: str) -> None:
    assert format_for_path(Path(name)) == fmt
