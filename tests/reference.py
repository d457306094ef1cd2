"""A plain reference implementation of the ingest stage, record by record and event by event.

It is written independently of streamdqn.stream (which is columnar and vectorized) from the semantics
the README states, so that property tests can prove the fast path equal to it: the event model is a
hand-written strict pydantic model, each record is parsed with json/msgpack alone, episodes are
tracked with one dict lookup and a few ifs per event, and rows are built step by step with explicit
loops. Only the feature function (whose own properties are tested in test_features_props) and the
reward table are shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgpack
import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from streamdqn.stream.features import featurize_episode
from streamdqn.stream.rewards import RewardTable

ACTIONS = ("ignore", "contain", "terminate", "quarantine", "review")


def _action(value: object) -> object:
    if isinstance(value, str):
        name = value.strip().lower()
        if name not in ACTIONS:
            raise ValueError(f"unknown action {value!r}; expected 0..4 or one of {', '.join(ACTIONS)}")
        return ACTIONS.index(name)
    return value


Count = Annotated[int, Field(ge=0, le=2**53)]
Id = Annotated[str, Field(min_length=1, max_length=256)]


class RefEvent(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    episode_id: int | Id
    step: Annotated[int, Field(ge=0, le=10**9)]
    syscall_count: Count
    file_read_count: Count
    file_write_count: Count
    network_connections: Count
    bytes_sent: Count
    bytes_received: Count
    child_processes: Count
    cpu_usage: Annotated[float, Field(ge=0.0, le=100.0)]
    memory_usage: Annotated[float, Field(ge=0.0, le=1e9)]
    registry_modification: bool
    privilege_escalation_attempt: bool
    code_injection_detected: bool
    is_malicious: bool | None = None
    severity: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    sandbox_id: Id = "default"
    timestamp: Annotated[float, Field(ge=0.0)] | None = None
    final: bool = False
    action: Annotated[int, BeforeValidator(_action), Field(ge=0, le=4)] | None = None
    action_prob: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    policy_version: Annotated[str, Field(max_length=256)] | None = None
    reward: Annotated[float, Field(ge=-1e6, le=1e6)] | None = None
    shadow: bool = False

    @model_validator(mode="after")
    def _label(self) -> RefEvent:
        if (self.is_malicious is None) != (self.severity is None):
            raise ValueError("is_malicious and severity come together (a label) or not at all")
        return self


_ONE = TypeAdapter(RefEvent)
RAW = ("syscall_count", "file_read_count", "file_write_count", "network_connections", "bytes_sent",
       "bytes_received", "child_processes", "cpu_usage", "memory_usage", "registry_modification",
       "privilege_escalation_attempt", "code_injection_detected")


def reference_decode(payload: bytes, content_type: str | None, max_bytes: int, max_events: int
                     ) -> tuple[list[tuple[int, RefEvent]], list[tuple[int, str, str]]]:
    """(position, event) for each valid event of one message, and (position, reason, detail) rejects."""
    if len(payload) > max_bytes:
        return [], [(-1, "too_large", "")]
    ct = (content_type or "").lower()
    is_json = "json" in ct if ("json" in ct or "msgpack" in ct) else payload[:1] in (b"{", b"[", b" ", b"\n",
                                                                                      b"\r", b"\t")
    if "msgpack" in ct:
        is_json = False
    try:
        value = json.loads(payload) if is_json else msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - the reference counts any decoder failure as a decode error
        return [], [(-1, "decode_error", "")]
    records = value if isinstance(value, list) else [value]
    if len(records) > max_events:
        return [], [(-1, "too_many_events", "")]
    events, rejects = [], []
    for i, record in enumerate(records):
        try:
            events.append((i, _ONE.validate_python(record)))
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) if e["loc"] else "event" for e in exc.errors()})
            reason = "validation_error" if isinstance(record, dict) else "not_an_event"
            rejects.append((i, reason, ",".join(fields)))
    return events, rejects


@dataclass
class _Episode:
    steps: list[tuple[np.ndarray, RefEvent]] = field(default_factory=list)  # raw row, event
    last_step: int = -1
    ended: bool = False
    censored: bool = False
    label: tuple[bool, float] | None = None


class ReferenceTracker:
    """Episodes event by event, with the README's rules; rows built once each episode is over."""

    def __init__(self, rewards: RewardTable, gamma: float, n_steps: int, reward_clip: float) -> None:
        self.rewards = rewards
        self.gamma = gamma
        self.n_steps = n_steps
        self.reward_clip = reward_clip
        self.open: dict[tuple[str, str], _Episode] = {}
        self.current: dict[str, tuple[str, str]] = {}
        self.closed: set[tuple[str, str]] = set()
        self.done: list[tuple[tuple[str, str], _Episode]] = []

    def observe(self, event: RefEvent) -> str | None:
        """None when accepted, else the reject reason."""
        key = (event.sandbox_id, str(event.episode_id))
        if key in self.closed:
            return "episode_closed"
        episode = self.open.get(key)
        if episode is None:
            previous = self.current.get(event.sandbox_id)
            if previous is not None and previous in self.open:
                self._close(previous)
            episode = self.open[key] = _Episode()
            self.current[event.sandbox_id] = key
        if event.step <= episode.last_step:
            return "duplicate" if event.step == episode.last_step else "out_of_order"
        episode.last_step = event.step
        if event.is_malicious is not None:
            severity = max(episode.label[1] if episode.label else 0.0, event.severity or 0.0)
            episode.label = (event.is_malicious, severity)
        if not episode.censored:
            episode.steps.append((np.array([float(getattr(event, f)) for f in RAW]), event))
            if event.action is not None and event.action >= 1 and not event.shadow:
                episode.censored = True
        if event.final:
            self._close(key)
        return None

    def close_all(self) -> None:
        for key in list(self.open):
            self._close(key)

    def _close(self, key: tuple[str, str]) -> None:
        episode = self.open.pop(key)
        if self.current.get(key[0]) == key:
            del self.current[key[0]]
        self.closed.add(key)
        self.done.append((key, episode))

    def rows(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every closed labelled episode's rows, in step order."""
        out = {}
        for key, episode in self.done:
            if episode.label is None or not episode.steps:
                continue
            out[key] = self._episode_rows(episode)
        return out

    def _episode_rows(self, episode: _Episode) -> list[dict[str, Any]]:
        malicious, severity = episode.label  # type: ignore[misc]
        raw = np.array([s[0] for s in episode.steps])
        steps = np.array([s[1].step for s in episode.steps], dtype=np.float64)
        features = featurize_episode(raw, steps)
        events = [s[1] for s in episode.steps]
        t = len(events)

        def reward(j: int, action: int) -> float:
            e = events[j]
            logged = e.action if e.action is not None else 0
            if e.reward is not None and logged == action:
                return float(np.clip(e.reward, -self.reward_clip, self.reward_clip))
            # An episode's last step seen counts as its final one, unless a carried-out response ended it.
            final = e.final or (j == t - 1 and not episode.censored)
            return float(self.rewards.rewards(np.array([action]), np.array([malicious]), np.array([severity]),
                                              np.array([final]))[0])

        def ignore_known(j: int) -> bool:
            e = events[j]
            censoring = e.action is not None and e.action >= 1 and not e.shadow
            return not censoring or e.final

        rows = []
        for i in range(t):
            row: dict[str, Any] = {"state": features[i], "rewards": [reward(i, a) for a in range(5)],
                                   "known": [True] * 5, "next": features[i], "horizon": 0,
                                   "logged_action": -1 if events[i].action is None else events[i].action}
            if not ignore_known(i):
                row["known"][0] = False
                row["rewards"][0] = reward(i, 0)  # the table's value, masked
                rows.append(row)
                continue
            total = 0.0
            for k in range(self.n_steps):
                j = i + k
                if k > 0 and not ignore_known(j):
                    row["horizon"], row["next"] = k, features[j]
                    break
                total += self.gamma**k * reward(j, 0)
                if events[j].final or (j == t - 1 and not episode.censored):
                    break
            else:
                row["horizon"], row["next"] = self.n_steps, features[i + self.n_steps]
            row["rewards"][0] = total
            rows.append(row)
        return rows
