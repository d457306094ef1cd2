"""Test data: a valid wire dict, a TelemetryEvent, hypothesis strategies, and a small real snapshot."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from streamdqn.learning.model import QNetwork
from streamdqn.snapshots.export import Provenance, publish_snapshot
from streamdqn.snapshots.manifest import FeatureSpecInfo, Normalizer, PolicyInfo
from streamdqn.snapshots.store import Snapshot, SnapshotStore
from streamdqn.stream.wire import COUNT_FIELDS, FLAG_FIELDS, TelemetryEvent

MAX_COUNT = 2**53


def event_dict(**overrides: Any) -> dict[str, Any]:
    """A valid event as a sandbox sends it (JSON-able); keyword arguments replace or add fields."""
    event: dict[str, Any] = {
        "episode_id": 1,
        "step": 0,
        "is_malicious": True,
        "severity": 0.5,
        "syscall_count": 120,
        "file_read_count": 4,
        "file_write_count": 2,
        "network_connections": 1,
        "bytes_sent": 512,
        "bytes_received": 2048,
        "child_processes": 0,
        "cpu_usage": 12.5,
        "memory_usage": 64.0,
        "registry_modification": False,
        "privilege_escalation_attempt": False,
        "code_injection_detected": False,
    }
    event.update(overrides)
    return event


def make_event(**overrides: Any) -> TelemetryEvent:
    return TelemetryEvent.model_validate(event_dict(**overrides))


def without(event: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != name}


# --- hypothesis strategies ------------------------------------------------------------------------

counts = st.one_of(st.integers(0, 1_000), st.integers(0, MAX_COUNT))
cpu = st.floats(0.0, 100.0, allow_nan=False)
memory = st.floats(0.0, 1e9, allow_nan=False)
severity = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def activity(draw: st.DrawFn) -> dict[str, Any]:
    """The numeric and flag fields of one valid event (what features see), extremes included."""
    out: dict[str, Any] = {name: draw(counts) for name in COUNT_FIELDS}
    out["cpu_usage"] = draw(cpu)
    out["memory_usage"] = draw(memory)
    out.update({name: draw(st.booleans()) for name in FLAG_FIELDS})
    return out


@st.composite
def valid_event_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Any valid event as a wire dict, optional fields sometimes present."""
    event = event_dict(
        episode_id=draw(st.one_of(st.integers(0, 2**63), st.text(min_size=1, max_size=8))),
        step=draw(st.integers(0, 10**9)),
        is_malicious=draw(st.booleans()),
        severity=draw(severity),
        **draw(activity()),
    )
    if draw(st.booleans()):
        event["sandbox_id"] = draw(st.text(min_size=1, max_size=8))
    if draw(st.booleans()):
        event["final"] = draw(st.booleans())
    if draw(st.booleans()):
        event["action"] = draw(
            st.one_of(st.integers(0, 4), st.sampled_from(["ignore", "Quarantine", "REVIEW"]))
        )
    return event


def publish_small(store: SnapshotStore, seed: int, **kwargs: Any) -> Snapshot:
    """A real export of a small QNetwork; different seeds give different model bytes."""
    torch.manual_seed(seed)
    q = QNetwork(30, 5, (32, 32))
    return publish_snapshot(store, q, np.zeros((4, 30), np.float32), Provenance(updates=seed), **kwargs)


def policy_info(**overrides: Any) -> PolicyInfo:
    """A valid manifest description of a policy (what the store adds comes on top)."""
    fields: dict[str, Any] = {
        "updates": 0, "events_learned": 0, "transitions_learned": 0,
        "feature_spec": FeatureSpecInfo(1, [f"f{i}" for i in range(30)]), "action_names": ["ignore"],
        "reward_table": {}, "normalizer": Normalizer(0.0, [0.0] * 30, [1.0] * 30, 10.0), "learner": {},
        "device": "cpu",
    }
    fields.update(overrides)
    return PolicyInfo(**fields)
