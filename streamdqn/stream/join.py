"""Labels that arrive later: verdicts joined to their episodes.

In production sandboxes the verdict (signatures, antivirus, an analyst) comes after the detonation,
often much later, and may be revised. An episode without an inline label keeps its steps (featurized
as they arrived) until its verdict is here; then its rows are built with the verdict's rewards. A
verdict that arrives before its telemetry waits for it.

    verdict for an episode that ...      what happens
    is open or over and waiting          its label now: rows are built (and the episode finishes if over)
    has not been seen yet                 the verdict waits (a newer revision replaces an older one)
    was already joined                    a newer revision relabels its rows still in replay;
                                          what was evicted already is counted
    is labelled inline                    the verdict wins; a disagreement is counted

Both sides wait at most `wait_seconds`, measured on the records' own timestamps where present (else
on their arrival), and at most `max_pending` of each are kept: the oldest expire first. An episode
never labelled expires unlearned and a verdict that never finds its episode is orphaned; both are
counted, never silently dropped.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streamdqn.stream.episodes import (
    Emitted,
    Episode,
    EpisodeState,
    EpisodeTracker,
    Finished,
    Key,
    Label,
    _episode_of,
    _episode_state,
)
from streamdqn.stream.wire import REASON_SHAPE, REASON_VALIDATION, Reject, parse_message

_Id = Annotated[str, Field(min_length=1, max_length=256)]


class Verdict(BaseModel):
    """One verdict, as a verdict service sends it (keyed by sandbox_id on the verdicts topic)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    sandbox_id: _Id
    episode_id: int | _Id
    is_malicious: bool
    severity: Annotated[float, Field(ge=0.0, le=1.0)]
    revision: Annotated[int, Field(ge=0)] = 0
    source: Annotated[str, Field(max_length=256)] | None = None
    timestamp: Annotated[float, Field(ge=0.0)] | None = None

    @property
    def key(self) -> Key:
        return (self.sandbox_id, str(self.episode_id))


_VERDICTS = TypeAdapter(list[Verdict])


def decode_verdicts(
    payload: bytes, content_type: str | None, *, max_bytes: int, max_events: int
) -> tuple[list[tuple[int, Verdict]], list[Reject]]:
    """(position, verdict) for each valid verdict of one message, and the rejects (as for telemetry)."""
    records = parse_message(payload, content_type, max_bytes=max_bytes, max_events=max_events)
    if isinstance(records, Reject):
        return [], [records]
    try:
        return list(enumerate(_VERDICTS.validate_python(records))), []
    except ValidationError as exc:
        problems: dict[int, list[str]] = {}
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            index = loc[0] if loc and isinstance(loc[0], int) else -1
            where = ".".join(str(p) for p in loc[1:]) or "verdict"
            problems.setdefault(index, []).append(f"{where}: {error['msg']}")
    good = [i for i in range(len(records)) if i not in problems]
    verdicts = _VERDICTS.validate_python([records[i] for i in good])
    rejects = [Reject(i, REASON_VALIDATION if isinstance(records[i], dict) else REASON_SHAPE,
                      "; ".join(problems[i])[:1000]) for i in sorted(problems)]
    return list(zip(good, verdicts, strict=True)), rejects


Relabel = Callable[[int, bool, float], int]
"""relabel(episode hash, malicious, severity) -> rows relabelled in replay."""


@dataclass
class JoinCounters:
    verdicts_consumed: int = 0
    labelled_inline: int = 0
    labelled_by_verdict: int = 0
    unlabelled_expired: int = 0
    orphaned: int = 0
    revised_before_join: int = 0
    revised_after_join: int = 0
    stale_revisions: int = 0  # an older or equal revision arriving after a newer one: ignored
    relabelled_rows: int = 0
    relabel_evicted: int = 0  # revisions after the join whose rows were no longer in replay
    disagreements: int = 0  # inline label and verdict differ
    delays: list[float] = field(default_factory=list)  # verdict time - episode's last event, since taken


@dataclass
class _Waiting:
    """A verdict waiting for its episode."""

    verdict: Verdict
    deadline: float
    by_event_time: bool


@dataclass
class _Over:
    """An episode over, waiting for its verdict."""

    episode: Episode
    deadline: float
    by_event_time: bool


class VerdictJoin:
    def __init__(
        self, tracker: EpisodeTracker, relabel: Relabel, *, wait_seconds: float = 86_400.0,
        max_pending: int = 100_000, remember_joined: int = 100_000,
    ) -> None:
        self.tracker = tracker
        self.relabel = relabel
        self.wait_seconds = wait_seconds
        self.max_pending = max_pending
        self.remember_joined = remember_joined
        self.counters = JoinCounters()
        self._verdicts: OrderedDict[Key, _Waiting] = OrderedDict()
        self._over: OrderedDict[Key, _Over] = OrderedDict()
        self._joined: OrderedDict[Key, tuple[int, bool, float, int]] = OrderedDict()  # revision, label, hash
        self.event_clock = -math.inf  # the largest record timestamp seen

    @property
    def pending_episodes(self) -> int:
        return len(self._over)

    @property
    def waiting_verdicts(self) -> int:
        return len(self._verdicts)

    # ------------------------------------------------------------------ the telemetry side
    def after_observe(self, unlabelled: Sequence[Episode], keys: Sequence[Key],
                      timestamps: Sequence[float]) -> Emitted:
        """After a telemetry batch (whose rows are pushed already: a verdict may relabel them): label the
        batch's episodes that have a waiting verdict, and keep those that ended unlabelled."""
        self._advance(timestamps)
        out = Emitted()
        for key in keys:
            waiting = self._verdicts.get(key)
            episode = self.tracker.episode(key)
            if waiting is not None and episode is not None:
                del self._verdicts[key]
                out.merge(self._apply(episode, waiting.verdict, over=False))
        for episode in unlabelled:
            waiting = self._verdicts.pop(episode.key, None)
            if waiting is not None:
                out.merge(self._apply(episode, waiting.verdict, over=True))
            else:
                self._keep_over(episode)
        return out

    def count_finished(self, finished: Sequence[Finished]) -> None:
        for f in finished:
            if f.label.source == "verdict":
                self.counters.labelled_by_verdict += 1
            else:
                self.counters.labelled_inline += 1

    # ------------------------------------------------------------------ the verdicts side
    def add(self, verdict: Verdict, now: float | None = None) -> Emitted:
        self.counters.verdicts_consumed += 1
        if verdict.timestamp is not None:
            self.event_clock = max(self.event_clock, verdict.timestamp)
        key = verdict.key
        joined = self._joined.get(key)
        if joined is not None:
            return self._revise_after_join(key, joined, verdict)
        episode = self.tracker.episode(key)
        if episode is not None:
            return self._apply(episode, verdict, over=False)
        over = self._over.pop(key, None)
        if over is not None:
            return self._apply(over.episode, verdict, over=True)
        waiting = self._verdicts.get(key)
        if waiting is not None:
            if verdict.revision <= waiting.verdict.revision:
                self.counters.stale_revisions += 1
                return Emitted()
            self.counters.revised_before_join += 1
            del self._verdicts[key]
        by_event_time = verdict.timestamp is not None
        start = verdict.timestamp if verdict.timestamp is not None else (now or time.time())
        self._verdicts[key] = _Waiting(verdict, start + self.wait_seconds, by_event_time)
        while len(self._verdicts) > self.max_pending:
            self._verdicts.popitem(last=False)
            self.counters.orphaned += 1
        return Emitted()

    def _apply(self, episode: Episode, verdict: Verdict, *, over: bool) -> Emitted:
        label = Label(verdict.is_malicious, verdict.severity, "verdict", verdict.revision)
        inline = episode.inline
        if inline is not None and (inline.malicious, inline.severity) != (label.malicious, label.severity):
            self.counters.disagreements += 1
            if episode.rows:  # rows built with the inline label are in replay: the verdict wins
                self.counters.relabelled_rows += self.relabel(episode.hash, label.malicious, label.severity)
        emitted = self.tracker.label(episode, label, over=over)
        if verdict.timestamp is not None and not math.isnan(episode.last_event_time):
            self.counters.delays.append(verdict.timestamp - episode.last_event_time)
        self._remember(episode.key, verdict, episode.hash)
        return emitted

    def _revise_after_join(self, key: Key, joined: tuple[int, bool, float, int], verdict: Verdict) -> Emitted:
        revision, malicious, severity, hash_ = joined
        if verdict.revision <= revision:
            self.counters.stale_revisions += 1
            return Emitted()
        self.counters.revised_after_join += 1
        episode = self.tracker.episode(key)
        if episode is not None:  # still open: what is still waiting gets the new label too
            episode.verdict = Label(verdict.is_malicious, verdict.severity, "verdict", verdict.revision)
        if (verdict.is_malicious, verdict.severity) != (malicious, severity):
            moved = self.relabel(hash_, verdict.is_malicious, verdict.severity)
            self.counters.relabelled_rows += moved
            if moved == 0:
                self.counters.relabel_evicted += 1
        self._remember(key, verdict, hash_)
        return Emitted()

    def _remember(self, key: Key, verdict: Verdict, hash_: int) -> None:
        self._joined[key] = (verdict.revision, verdict.is_malicious, verdict.severity, hash_)
        self._joined.move_to_end(key)
        while len(self._joined) > self.remember_joined:
            self._joined.popitem(last=False)

    def _keep_over(self, episode: Episode) -> None:
        by_event_time = not math.isnan(episode.last_event_time)
        start = episode.last_event_time if by_event_time else time.time()
        self._over[episode.key] = _Over(episode, start + self.wait_seconds, by_event_time)
        while len(self._over) > self.max_pending:
            self._over.popitem(last=False)
            self.counters.unlabelled_expired += 1

    # ------------------------------------------------------------------ time
    def _advance(self, timestamps: Sequence[float]) -> None:
        finite = [t for t in timestamps if t == t]
        if finite:
            self.event_clock = max(self.event_clock, max(finite))

    def expire(self, wall: float | None = None) -> None:
        """Drop what waited longer than wait_seconds (counted)."""
        wall = time.time() if wall is None else wall
        for store, counter in ((self._over, "unlabelled_expired"), (self._verdicts, "orphaned")):
            for key in [k for k, item in store.items()
                        if (self.event_clock if item.by_event_time else wall) > item.deadline]:
                del store[key]
                setattr(self.counters, counter, getattr(self.counters, counter) + 1)

    def take_delays(self) -> list[float]:
        delays, self.counters.delays = self.counters.delays, []
        return delays

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> JoinState:
        c = self.counters
        return JoinState(
            verdicts=[WaitingState(w.verdict.model_dump(), w.deadline, w.by_event_time)
                      for w in self._verdicts.values()],
            over=[OverState(_episode_state(o.episode), o.deadline, o.by_event_time)
                  for o in self._over.values()],
            joined=[[k[0], k[1], *v] for k, v in self._joined.items()],
            event_clock=self.event_clock if math.isfinite(self.event_clock) else None,
            counters={k: v for k, v in c.__dict__.items() if k != "delays"},
        )

    def load_state(self, state: JoinState, now: float) -> None:
        self._verdicts = OrderedDict()
        for w in state.verdicts:
            verdict = Verdict.model_validate(w.verdict)
            self._verdicts[verdict.key] = _Waiting(verdict, w.deadline, w.by_event_time)
        self._over = OrderedDict()
        for o in state.over:
            episode = _episode_of(o.episode, now)
            episode.holdout = self.tracker.is_holdout(episode.key)
            self._over[episode.key] = _Over(episode, o.deadline, o.by_event_time)
        self._joined = OrderedDict(((s, e), (int(r), bool(m), float(v), int(h)))
                                   for s, e, r, m, v, h in state.joined)
        self.event_clock = state.event_clock if state.event_clock is not None else -math.inf
        self.counters = JoinCounters(**state.counters)


class WaitingState(msgspec.Struct):
    verdict: dict[str, Any]
    deadline: float
    by_event_time: bool


class OverState(msgspec.Struct):
    episode: EpisodeState
    deadline: float
    by_event_time: bool


class JoinState(msgspec.Struct):
    verdicts: list[WaitingState]
    over: list[OverState]
    joined: list[list[Any]]  # [sandbox_id, episode key, revision, malicious, severity, hash]
    event_clock: float | None
    counters: dict[str, Any]

