"""Episodes: order checks, running context, and the steps that wait for their rows.

An episode is the events of one (sandbox_id, episode_id) in step order. It ends at `final: true`, when
its sandbox starts another episode, or after an idle timeout (then its last step counts as the final
one). A logged response that the sandbox carried out (not `shadow`) ends what can be learned from it:
later events of that episode are consumed but yield no rows.

For a batch of events (columns, in arrival order) `observe`:
  1. gives each event its episode — the only per-event Python work, one dict lookup;
  2. rejects events of ended episodes and steps that are not after the episode's last one;
  3. featurizes the accepted events with each episode's running context (streamdqn.stream.features);
  4. adds them to their episode's waiting steps and builds the rows of every step whose targets are
     known (streamdqn.stream.rows): the label is known (inline, or a verdict given with `label()`)
     and its ignore window is complete.
A held-out episode (a stable share, for the publish gate) yields no rows: once over and labelled it
joins the gate's window. Idle episodes expire from a heap, not from a scan of every open episode.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import numpy as np

from streamdqn.stream.features import CARRY_DIM, FEATURE_DIM, featurize, new_carry
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.rows import ReplayRows, StepTable, build_rows, episode_hash
from streamdqn.stream.wire import EventColumns, Reject

REASON_DUPLICATE = "duplicate"
REASON_OUT_OF_ORDER = "out_of_order"
REASON_EPISODE_CLOSED = "episode_closed"

Key = tuple[str, str]


@dataclass(frozen=True)
class Label:
    malicious: bool
    severity: float
    source: str  # "inline" or "verdict"
    revision: int = -1  # the verdict's revision; -1 inline


@dataclass(frozen=True)
class HeldOutEpisode:
    """A finished episode that was not learned from: evaluation data for the publish gate."""

    features: np.ndarray  # float32 [T, FEATURE_DIM]
    malicious: bool
    severity: float
    action: np.ndarray | None = None  # int8 [T]: what the deployed policy logged, -1 nothing
    action_prob: np.ndarray | None = None  # float32 [T]


class Steps(NamedTuple):
    """Steps of one episode (struct of arrays) that have no row yet."""

    features: np.ndarray  # float32 [m, 30]
    final: np.ndarray  # bool [m]
    action: np.ndarray  # int8 [m]
    action_prob: np.ndarray  # float32 [m]
    reward: np.ndarray  # float64 [m]
    shadow: np.ndarray  # bool [m]

    @staticmethod
    def empty() -> Steps:
        return Steps(np.zeros((0, FEATURE_DIM), np.float32), np.zeros(0, bool), np.zeros(0, np.int8),
                     np.zeros(0, np.float32), np.zeros(0), np.zeros(0, bool))

    @property
    def size(self) -> int:
        """How many steps (len() stays the tuple's field count, as for any NamedTuple)."""
        return len(self.final)

    def take(self, index: np.ndarray) -> Steps:
        return Steps(*(c[index] for c in self))

    @staticmethod
    def concat(parts: Sequence[Steps]) -> Steps:
        parts = [p for p in parts if p.size]
        if not parts:
            return Steps.empty()
        return parts[0] if len(parts) == 1 else Steps(*(np.concatenate(c) for c in zip(*parts, strict=True)))


@dataclass
class Episode:
    key: Key
    episode_id: int | str  # as the events carried it
    partition: int
    hash: int
    holdout: bool
    carry: np.ndarray = field(default_factory=lambda: new_carry(1)[0])
    last_step: int = -1
    last_seen: float = 0.0  # monotonic time of its last accepted event (idle expiry)
    last_event_time: float = math.nan  # the events' own timestamp (the verdict join's clock)
    waiting: Steps = field(default_factory=Steps.empty)  # steps without a row yet
    kept: list[Steps] = field(default_factory=list)  # held-out episodes: every step, for the gate
    inline: Label | None = None
    verdict: Label | None = None
    censored: bool = False  # a carried-out logged response ended what can be learned
    logged_return: float = 0.0
    rows: int = 0  # rows built so far
    policy_version: str | None = None  # the version the sandbox last said it acted with
    first_response: int = -1  # the first non-ignore action logged (shadow or not), -1 none

    @property
    def label(self) -> Label | None:
        return self.verdict or self.inline

    def add(self, events: EventColumns, rows: np.ndarray, features: np.ndarray, now: float) -> None:
        """Accepted events `rows` (positions in `events`, in step order) with their features."""
        self.last_step = int(events.step[rows[-1]])
        self.last_seen = now
        stamps = events.timestamp[rows]
        if not np.isnan(stamps).all():
            self.last_event_time = float(np.nanmax(stamps))
        labelled = rows[events.malicious[rows] >= 0]
        if len(labelled):  # the wire format gives severity with every inline label
            previous = self.inline.severity if self.inline else 0.0
            severity = max(previous, float(events.severity[labelled].max()))
            self.inline = Label(bool(events.malicious[labelled[-1]]), severity, "inline")
        version = events.policy_version[int(rows[-1])]
        if version is not None:
            self.policy_version = version
        if self.first_response < 0:
            responses = rows[events.action[rows] >= 1]
            if len(responses):
                self.first_response = int(events.action[responses[0]])
        if self.censored:
            return  # consumed, but nothing more to learn from it
        block = Steps(features, events.final[rows], events.action[rows],
                      events.action_prob[rows].astype(np.float32), events.reward[rows], events.shadow[rows])
        response = np.flatnonzero((block.action >= 1) & ~block.shadow)
        if len(response):
            block = block.take(np.arange(response[0] + 1))
            self.censored = True
        if self.holdout:
            self.kept.append(block)
        else:
            self.waiting = Steps.concat([self.waiting, block])


class Finished(NamedTuple):
    """An episode over and labelled: what the metrics need of it."""

    key: Key
    label: Label
    logged_return: float  # what the sandbox's own actions earned (ignore where none was logged)
    holdout: bool
    policy_version: str | None = None
    first_response: int = -1


@dataclass
class Emitted:
    """What one call produced: rows to push, and the episodes it finished."""

    rows: list[ReplayRows] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    unlabelled: list[Episode] = field(default_factory=list)  # over, waiting for a verdict

    def merge(self, other: Emitted) -> Emitted:
        self.rows += other.rows
        self.finished += other.finished
        self.unlabelled += other.unlabelled
        return self

    @property
    def all_rows(self) -> ReplayRows:
        return ReplayRows.concat(self.rows)


class Observation(NamedTuple):
    accepted: np.ndarray  # int64: positions (in the events given) of the accepted events, in order
    features: np.ndarray  # float32 [len(accepted), 30]
    rejects: list[tuple[int, Reject]]  # (event position, reject); Reject.position is unused (-1)
    emitted: Emitted
    keys: list[Key]  # the episodes the batch had events of


class EpisodeTracker:
    def __init__(
        self,
        rewards: RewardTable | None = None,
        *,
        gamma: float = 0.99,
        n_steps: int = 1,
        idle_timeout: float = 300.0,
        reward_clip: float = 10.0,
        holdout_fraction: float = 0.0,
        holdout_keep: int = 500,
        remember_closed: int = 100_000,
    ) -> None:
        self.rewards = rewards or RewardTable()
        self.gamma = gamma
        self.n_steps = n_steps
        self.idle_timeout = idle_timeout
        self.reward_clip = reward_clip
        self.holdout_fraction = holdout_fraction
        self.holdout: deque[HeldOutEpisode] = deque(maxlen=holdout_keep)
        self._open: dict[Key, Episode] = {}
        self._current: dict[str, Key] = {}  # sandbox -> its open episode
        self._closed: OrderedDict[Key, None] = OrderedDict()
        self._remember_closed = remember_closed
        self._idle: list[tuple[float, Key]] = []  # (last_seen, key); stale entries are skipped

    @property
    def open_episodes(self) -> int:
        return len(self._open)

    def episode(self, key: Key) -> Episode | None:
        return self._open.get(key)

    # ------------------------------------------------------------------ a batch
    def observe(self, events: EventColumns, partitions: np.ndarray, now: float) -> Observation:
        n = events.size
        emitted = Emitted()
        if n == 0:
            return Observation(np.zeros(0, np.int64), np.zeros((0, FEATURE_DIM), np.float32), [], emitted, [])
        keys = list(zip(events.sandbox_id, map(str, events.episode_id), strict=True))
        slot_of: dict[Key, int] = {}
        slot = np.fromiter((slot_of.setdefault(k, len(slot_of)) for k in keys), np.int64, n)
        first = np.unique(slot, return_index=True)[1]
        episodes, closed, end = self._resolve(list(slot_of), first, events, partitions, emitted)

        last_steps = np.array([e.last_step if e is not None else -1 for e in episodes], np.int64)
        order, previous = _previous_steps(events.step, slot, last_steps)
        order_ok = events.step > previous

        positions = np.arange(n)
        live = ~closed[slot] & (positions < end[slot])
        # An accepted final step ends its episode: its later events in the batch are rejected.
        final_at = np.full(len(episodes), n)
        ends_here = np.flatnonzero(live & order_ok & events.final)
        np.minimum.at(final_at, slot[ends_here], ends_here)
        end = np.minimum(end, final_at + 1)
        live = ~closed[slot] & (positions < end[slot])
        accepted_mask = live & order_ok

        rejects: list[tuple[int, Reject]] = []
        for i in np.flatnonzero(~accepted_mask).tolist():
            sandbox, episode_id = keys[i]
            if closed[slot[i]]:
                detail = f"episode {episode_id} of {sandbox} already ended"
                rejects.append((i, Reject(-1, REASON_EPISODE_CLOSED, detail)))
            elif not live[i]:
                detail = f"episode {episode_id} of {sandbox} ended"
                rejects.append((i, Reject(-1, REASON_EPISODE_CLOSED, detail)))
            else:
                reason = REASON_DUPLICATE if events.step[i] == previous[i] else REASON_OUT_OF_ORDER
                detail = f"step: {events.step[i]} after step {previous[i]} of episode {episode_id}"
                rejects.append((i, Reject(-1, reason, detail)))

        accepted = order[accepted_mask[order]]  # grouped by episode, each in arrival (= step) order
        group = slot[accepted]
        features = self._featurize(events, accepted, group, episodes)
        ended_slots = np.zeros(len(episodes), bool)
        ended_slots[final_at < n] = True
        ended_slots[end < n] = True  # a later episode of its sandbox started in this batch
        self._add_steps(events, accepted, group, features, episodes, now)
        emitted.merge(self._emit([episodes[g] for g in np.unique(group)] if len(group) else [], set()))
        for g in np.flatnonzero(ended_slots).tolist():
            episode = episodes[g]
            if episode is not None and episode.key in self._open:
                emitted.merge(self._close(episode))
        restore = np.argsort(accepted, kind="stable")
        return Observation(accepted[restore], features[restore], rejects, emitted, list(slot_of))

    def _resolve(
        self, keys: list[Key], first: np.ndarray, events: EventColumns, partitions: np.ndarray,
        emitted: Emitted,
    ) -> tuple[list[Episode | None], np.ndarray, np.ndarray]:
        """Each key's episode (None: already ended), and where each one's accepted events end."""
        u = len(keys)
        n = events.size
        episodes: list[Episode | None] = [None] * u
        closed = np.zeros(u, bool)
        end = np.full(u, n)
        slot_of = {k: i for i, k in enumerate(keys)}
        for i, key in enumerate(keys):
            if key in self._closed:
                closed[i] = True
                continue
            episode = self._open.get(key)
            if episode is None:
                previous = self._current.get(key[0])
                if previous is not None and previous in self._open:
                    p = slot_of.get(previous)
                    if p is not None and first[p] < first[i]:
                        # It has events before this one in the batch: they count, then it ends.
                        end[p] = min(end[p], first[i])
                    else:
                        emitted.merge(self._close(self._open[previous]))
                        if p is not None:
                            closed[p] = True
                position = int(first[i])
                episode = self._open[key] = Episode(
                    key, events.episode_id[position], int(partitions[position]), episode_hash(*key),
                    holdout=self.is_holdout(key),
                )
                self._current[key[0]] = key
            episodes[i] = episode
        return episodes, closed, end

    def _featurize(
        self, events: EventColumns, accepted: np.ndarray, group: np.ndarray, episodes: list[Episode | None]
    ) -> np.ndarray:
        in_batch = set(group.tolist())
        present = [(g, e) for g, e in enumerate(episodes) if e is not None and g in in_batch]
        carry = np.zeros((len(episodes), CARRY_DIM))
        for g, episode in present:
            carry[g] = episode.carry
        steps = events.step[accepted].astype(np.float64)
        features, carry = featurize(events.raw[accepted], steps, group, carry)
        for g, episode in present:
            episode.carry = carry[g]
        return features

    def _add_steps(
        self, events: EventColumns, accepted: np.ndarray, group: np.ndarray, features: np.ndarray,
        episodes: list[Episode | None], now: float,
    ) -> None:
        if not len(accepted):
            return
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        stops = np.append(starts[1:], len(group))
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            episode = episodes[group[s]]
            assert episode is not None
            episode.add(events, accepted[s:e], features[s:e], now)
            heapq.heappush(self._idle, (now, episode.key))

    # ------------------------------------------------------------------ rows
    def _emit(self, episodes: Sequence[Episode | None], ended: set[Key]) -> Emitted:
        return emit_rows(episodes, ended, rewards=self.rewards, gamma=self.gamma, n_steps=self.n_steps,
                         reward_clip=self.reward_clip)

    def _close(self, episode: Episode) -> Emitted:
        """The episode is over: its last step counts as the final one."""
        emitted = self._emit([episode], {episode.key})
        self._forget(episode)
        self._closed[episode.key] = None
        while len(self._closed) > self._remember_closed:
            self._closed.popitem(last=False)
        if episode.label is None:
            emitted.unlabelled.append(episode)
        else:
            self._finish(episode, episode.label, emitted)
        return emitted

    def _finish(self, episode: Episode, label: Label, emitted: Emitted) -> None:
        emitted.finished.append(Finished(episode.key, label, episode.logged_return, episode.holdout,
                                         episode.policy_version, episode.first_response))
        if episode.holdout and episode.kept:
            steps = Steps.concat(episode.kept)
            self.holdout.append(HeldOutEpisode(steps.features, label.malicious, label.severity, steps.action,
                                               steps.action_prob))

    def label(self, episode: Episode, label: Label, *, over: bool) -> Emitted:
        """Give an episode (open, or over and waiting) its verdict; builds what it can now."""
        episode.verdict = label
        if not over:
            return self._emit([episode], set())
        emitted = self._emit([episode], {episode.key})
        self._finish(episode, label, emitted)
        return emitted

    def _forget(self, episode: Episode) -> None:
        self._open.pop(episode.key, None)
        if self._current.get(episode.key[0]) == episode.key:
            del self._current[episode.key[0]]

    # ------------------------------------------------------------------ time and partitions
    def expire(self, now: float) -> Emitted:
        """Close episodes idle for longer than the idle timeout."""
        emitted = Emitted()
        deadline = now - self.idle_timeout
        while self._idle and self._idle[0][0] < deadline:
            seen, key = heapq.heappop(self._idle)
            episode = self._open.get(key)
            if episode is not None and episode.last_seen == seen:
                emitted.merge(self._close(episode))
        if len(self._idle) > 4 * len(self._open) + 1024:  # stale entries of busy episodes
            self._idle = [(e.last_seen, k) for k, e in self._open.items()]
            heapq.heapify(self._idle)
        return emitted

    def close_all(self) -> Emitted:
        emitted = Emitted()
        for episode in list(self._open.values()):
            emitted.merge(self._close(episode))
        return emitted

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget open episodes read from these partitions (revoked in a rebalance); returns how many."""
        doomed = [e for e in self._open.values() if e.partition in partitions]
        for episode in doomed:
            self._forget(episode)
        return len(doomed)

    def is_holdout(self, key: Key) -> bool:
        # A stable hash: the same episode is held out before and after a restart.
        if self.holdout_fraction <= 0:
            return False
        return episode_hash(*key) % 10_000 < self.holdout_fraction * 10_000

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> TrackerState:
        return TrackerState(
            episodes=[_episode_state(e) for e in self._open.values()],
            current=[[s, *k] for s, k in self._current.items()],
            closed=[list(k) for k in self._closed],
            holdout=[_held_out_state(h) for h in self.holdout],
        )

    def load_state(self, state: TrackerState, now: float) -> None:
        self._open = {}
        for s in state.episodes:
            e = _episode_of(s, now)
            e.holdout = self.is_holdout(e.key)
            self._open[e.key] = e
        self._current = {s: (k0, k1) for s, k0, k1 in state.current}
        self._closed = OrderedDict(((k0, k1), None) for k0, k1 in state.closed)
        self.holdout.clear()
        self.holdout.extend(_held_out_of(h) for h in state.holdout)
        self._idle = [(e.last_seen, k) for k, e in self._open.items()]
        heapq.heapify(self._idle)


def emit_rows(
episodes: Sequence[Episode | None], ended: set[Key], *, rewards: RewardTable, gamma: float, n_steps: int,
reward_clip: float,
) -> Emitted:
    """Build the rows of every waiting step whose targets are known (episodes in `ended` are over); the
    steps that got their row leave the episodes' waiting lists."""
    emitted = Emitted()
    ready = [e for e in episodes
             if e is not None and not e.holdout and e.waiting.size and e.label is not None]
    if not ready:
        return emitted
    blocks = [e.waiting for e in ready]
    lengths = np.array([b.size for b in blocks])
    table_steps = Steps.concat(blocks)
    group = np.repeat(np.arange(len(ready)), lengths)
    labels = [e.label for e in ready if e.label is not None]
    malicious = np.repeat(np.array([int(lb.malicious) for lb in labels], np.int8), lengths)
    severity = np.repeat(np.array([lb.severity for lb in labels], np.float32), lengths)
    table = StepTable(table_steps.features, group, malicious, severity, table_steps.final,
                      table_steps.action, table_steps.action_prob, table_steps.reward, table_steps.shadow)
    # Over: the last step seen counts as the final one. Not for a censored episode: its last step is
    # the response, whose ignore stays unknown, and earlier windows already stop before it.
    over = np.array([e.key in ended and not e.censored for e in ready])
    built = build_rows(table, over, np.array([e.hash for e in ready], np.int64), rewards=rewards, gamma=gamma,
                       n_steps=n_steps, reward_clip=reward_clip)
    emitted.rows.append(built.rows)
    offsets = np.append(0, np.cumsum(lengths))
    for g, episode in enumerate(ready):
        lo, hi = offsets[g], offsets[g + 1]
        done = built.emitted[lo:hi]
        episode.logged_return += float(built.logged_reward[lo:hi][done].sum())
        episode.rows += int(done.sum())
        episode.waiting = episode.waiting.take(np.flatnonzero(~done))
    return emitted



def _previous_steps(
    step: np.ndarray, slot: np.ndarray, last_steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The events grouped by episode (a stable order), and for each event the largest step before it in
    its episode, its episode's last step before the batch included: a step must come after it."""
    order = np.argsort(slot, kind="stable")
    grouped = slot[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    previous = np.empty(len(step), np.int64)
    previous[order] = _grouped_previous_max(step[order], grouped, starts, last_steps)
    return order, previous


def _grouped_previous_max(
    values: np.ndarray, group: np.ndarray, starts: np.ndarray, initial: np.ndarray
) -> np.ndarray:
    """For each row, the maximum of the rows before it in its group (and of the group's initial value)."""
    out = np.empty_like(values)
    ends = np.append(starts[1:], len(values))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        chunk = np.maximum.accumulate(np.concatenate(([initial[group[s]]], values[s:e])))
        out[s:e] = chunk[:-1]
    return out


# --- checkpoint state: typed, versioned by the checkpoint format -------------------------------------


class ArrayState(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    data: bytes


def _array(a: np.ndarray) -> ArrayState:
    a = np.ascontiguousarray(a)
    return ArrayState(a.dtype.str, list(a.shape), a.tobytes())


def _numpy(s: ArrayState) -> np.ndarray:
    return np.frombuffer(s.data, dtype=np.dtype(s.dtype)).reshape(s.shape).copy()


class LabelState(msgspec.Struct, array_like=True):
    malicious: bool
    severity: float
    source: str
    revision: int


class EpisodeState(msgspec.Struct):
    sandbox_id: str
    episode_key: str
    episode_id: int | str
    partition: int
    carry: ArrayState
    last_step: int
    last_event_time: float
    waiting: list[ArrayState]  # the Steps columns in order
    kept: list[list[ArrayState]]
    inline: LabelState | None
    verdict: LabelState | None
    censored: bool
    logged_return: float
    rows: int
    policy_version: str | None = None
    first_response: int = -1


class HeldOutState(msgspec.Struct, array_like=True):
    features: ArrayState
    malicious: bool
    severity: float
    action: ArrayState | None
    action_prob: ArrayState | None


class TrackerState(msgspec.Struct):
    episodes: list[EpisodeState]
    current: list[list[str]]  # [sandbox_id, sandbox_id, episode key]
    closed: list[list[str]]
    holdout: list[HeldOutState]


def _label_state(label: Label | None) -> LabelState | None:
    if label is None:
        return None
    return LabelState(label.malicious, label.severity, label.source, label.revision)


def _label_of(s: LabelState | None) -> Label | None:
    return None if s is None else Label(s.malicious, s.severity, s.source, s.revision)


def _episode_state(e: Episode) -> EpisodeState:
    return EpisodeState(
        e.key[0], e.key[1], e.episode_id, e.partition, _array(e.carry), e.last_step, e.last_event_time,
        [_array(c) for c in e.waiting], [[_array(c) for c in s] for s in e.kept], _label_state(e.inline),
        _label_state(e.verdict), e.censored, e.logged_return, e.rows, e.policy_version, e.first_response,
    )


def _episode_of(s: EpisodeState, now: float) -> Episode:
    key = (s.sandbox_id, s.episode_key)
    return Episode(
        key, s.episode_id, s.partition, episode_hash(*key), holdout=False, carry=_numpy(s.carry),
        last_step=s.last_step, last_seen=now, last_event_time=s.last_event_time,
        waiting=Steps(*(_numpy(c) for c in s.waiting)), kept=[Steps(*(_numpy(c) for c in k)) for k in s.kept],
        inline=_label_of(s.inline), verdict=_label_of(s.verdict), censored=s.censored,
        logged_return=s.logged_return, rows=s.rows, policy_version=s.policy_version,
        first_response=s.first_response,
    )


def _held_out_state(h: HeldOutEpisode) -> HeldOutState:
    return HeldOutState(_array(h.features), h.malicious, h.severity,
                        None if h.action is None else _array(h.action),
                        None if h.action_prob is None else _array(h.action_prob))


def _held_out_of(s: HeldOutState) -> HeldOutEpisode:
    return HeldOutEpisode(_numpy(s.features), s.malicious, s.severity,
                          None if s.action is None else _numpy(s.action),
                          None if s.action_prob is None else _numpy(s.action_prob))
