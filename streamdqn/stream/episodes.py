"""Episodes to RL transitions: the reward table and the per-episode tracker. Plain numpy.

An episode is the events of one (sandbox_id, episode_id) in step order. It ends at `final: true`,
when its sandbox starts another episode, or after an idle timeout. `ignore` continues it; contain,
terminate, quarantine and review end it, and the rest of its events yield no transitions.

Flow for a batch of validated events:
    observed = tracker.observe(events, now)      # order checks, features, rejects
    actions  = <logged actions, else the behaviour policy over observed.features>
    batch    = tracker.act(observed, actions)     # transitions + finished episodes
"""

from __future__ import annotations

import zlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from streamdqn.stream.features import CARRY_DIM, FEATURE_DIM, featurize, new_carry
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action, Reject, TelemetryEvent, raw_matrix

REASON_DUPLICATE = "duplicate"
REASON_OUT_OF_ORDER = "out_of_order"
REASON_EPISODE_CLOSED = "episode_closed"


@dataclass
class _Pending:
    """An `ignore` transition waiting for its episode's next state."""

    state: np.ndarray
    action: int
    malicious: bool
    severity: float
    reward_override: float | None


@dataclass
class _Episode:
    key: tuple[str, str]
    partition: int
    carry: np.ndarray = field(default_factory=lambda: new_carry(1)[0])
    last_step: int = -1
    last_seen: float = 0.0
    responded: bool = False
    # Ended in the batch being observed (a final event, or its sandbox moved on): `act` closes it.
    final_seen: bool = False
    pending: _Pending | None = None
    episode_return: float = 0.0
    malicious: bool = False
    severity: float = 0.0
    holdout: bool = False
    rows: list[np.ndarray] = field(default_factory=list)  # feature rows, kept for held-out episodes only
    complete: bool = True  # False for a held-out episode restored from a checkpoint without its rows


@dataclass(frozen=True)
class HeldOutEpisode:
    """A finished episode that was not learned from: evaluation data for the publish gate."""

    features: np.ndarray  # float32 [T, FEATURE_DIM]
    malicious: bool
    severity: float


@dataclass(frozen=True)
class Observed:
    """Events accepted by `observe`, with their features; `act` turns them into transitions."""

    events: list[TelemetryEvent]
    features: np.ndarray  # float32 [M, FEATURE_DIM], rows grouped by episode, in step order
    group: np.ndarray  # [M] index into `episodes`
    episodes: list[_Episode]
    logged_actions: np.ndarray  # int64 [M], -1 where the event carries no logged action
    rejects: list[Reject]  # indices refer to positions in the `events` argument of observe()
    accepted: np.ndarray  # [M] positions in the `events` argument of observe()


@dataclass
class TransitionBatch:
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_states: np.ndarray
    dones: np.ndarray
    episode_returns: list[float] = field(default_factory=list)
    episode_malicious: list[bool] = field(default_factory=list)

    @staticmethod
    def empty() -> TransitionBatch:
        return TransitionBatch(
            np.zeros((0, FEATURE_DIM), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
            np.zeros((0, FEATURE_DIM), np.float32),
            np.zeros(0, bool),
        )

    def __len__(self) -> int:
        return len(self.actions)


class _Collector:
    def __init__(self) -> None:
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.next_states: list[np.ndarray] = []
        self.dones: list[np.ndarray] = []
        self.returns: list[float] = []
        self.malicious: list[bool] = []

    def add(self, s: np.ndarray, a: np.ndarray, r: np.ndarray, s2: np.ndarray, d: np.ndarray) -> None:
        if len(a):
            self.states.append(s)
            self.actions.append(a)
            self.rewards.append(r)
            self.next_states.append(s2)
            self.dones.append(d)

    def batch(self) -> TransitionBatch:
        if not self.actions:
            out = TransitionBatch.empty()
        else:
            out = TransitionBatch(
                np.concatenate(self.states).astype(np.float32, copy=False),
                np.concatenate(self.actions).astype(np.int64, copy=False),
                np.concatenate(self.rewards).astype(np.float32, copy=False),
                np.concatenate(self.next_states).astype(np.float32, copy=False),
                np.concatenate(self.dones).astype(bool, copy=False),
            )
        out.episode_returns = self.returns
        out.episode_malicious = self.malicious
        return out


class EpisodeTracker:
    """Open episodes across many sandboxes, and the transitions their events yield."""

    def __init__(
        self,
        rewards: RewardTable | None = None,
        *,
        idle_timeout: float = 300.0,
        reward_clip: float = 10.0,
        remember_closed: int = 100_000,
        counterfactual_responses: bool = True,
        holdout_fraction: float = 0.0,
        holdout_keep: int = 500,
    ) -> None:
        self.rewards = rewards or RewardTable()
        self.counterfactual_responses = counterfactual_responses
        self.holdout_fraction = holdout_fraction
        # The most recent held-out episodes, never pushed to replay (see `_is_holdout`).
        self.holdout: deque[HeldOutEpisode] = deque(maxlen=holdout_keep)
        self.idle_timeout = idle_timeout
        self.reward_clip = reward_clip
        self._open: dict[tuple[str, str], _Episode] = {}
        self._current: dict[str, tuple[str, str]] = {}  # sandbox -> its open episode
        self._closed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember_closed = remember_closed

    @property
    def open_episodes(self) -> int:
        return len(self._open)

    def observe(
        self, events: Sequence[TelemetryEvent], now: float, partitions: Sequence[int] | None = None
    ) -> tuple[Observed, TransitionBatch]:
        """Check order, featurize accepted events; also returns episodes this batch closed."""
        closing = _Collector()
        rejects: list[Reject] = []
        accepted: list[int] = []
        episodes: list[_Episode] = []
        slot: dict[tuple[str, str], int] = {}
        group_of: list[int] = []
        for i, event in enumerate(events):
            key = event.episode_key
            if key in self._closed:
                rejects.append(Reject(i, REASON_EPISODE_CLOSED,
                                      f"episode {key[1]} of {key[0]} already ended"))
                continue
            episode = self._open.get(key)
            if episode is not None and episode.final_seen:
                # Ended earlier in this batch (`act` closes it): the same as arriving in a later batch.
                rejects.append(Reject(i, REASON_EPISODE_CLOSED, f"episode {key[1]} of {key[0]} ended"))
                continue
            if episode is None:
                previous = self._current.get(event.sandbox_id)
                if previous is not None and previous in slot:
                    # It has events in this batch that `act` has yet to turn into transitions: mark it
                    # ended so that `act` closes it after them, its last step counting as the final one.
                    self._open[previous].final_seen = True
                elif previous is not None and previous in self._open:
                    self._close(self._open[previous], closing)
                partition = partitions[i] if partitions is not None else -1
                episode = self._open[key] = _Episode(key=key, partition=partition,
                                                     holdout=self._is_holdout(key))
                self._current[event.sandbox_id] = key
            if event.step <= episode.last_step:
                reason = REASON_DUPLICATE if event.step == episode.last_step else REASON_OUT_OF_ORDER
                rejects.append(
                    Reject(i, reason,
                           f"step: {event.step} after step {episode.last_step} of episode {key[1]}")
                )
                continue
            episode.last_step = event.step
            episode.last_seen = now
            episode.malicious = event.is_malicious
            episode.severity = max(episode.severity, event.severity)
            if key not in slot:
                slot[key] = len(episodes)
                episodes.append(episode)
            accepted.append(i)
            group_of.append(slot[key])
            if event.final:
                episode.final_seen = True

        group = np.asarray(group_of, dtype=np.int64)
        order = np.argsort(group, kind="stable")
        accepted_arr = np.asarray(accepted, dtype=np.int64)[order]
        group = group[order]
        kept = [events[i] for i in accepted_arr]
        carry = np.stack([e.carry for e in episodes]) if episodes else np.zeros((0, CARRY_DIM))
        features, carry = featurize(
            raw_matrix(kept), np.array([e.step for e in kept], dtype=np.float64), group, carry
        )
        for g, episode in enumerate(episodes):
            episode.carry = carry[g]
        logged = np.array([-1 if e.action is None else e.action for e in kept], dtype=np.int64)
        observed = Observed(kept, features, group, episodes, logged, rejects, accepted_arr)
        return observed, closing.batch()

    def act(self, observed: Observed, actions: np.ndarray) -> TransitionBatch:
        """Transitions for the observed events given the action taken at each (logged or chosen)."""
        out = _Collector()
        events, feats, group = observed.events, observed.features, observed.group
        n = len(events)
        if n == 0:
            return out.batch()
        actions = np.where(observed.logged_actions >= 0, observed.logged_actions, actions).astype(np.int64)
        malicious = np.array([e.is_malicious for e in events])
        severity = np.array([e.severity for e in events])
        final = np.array([e.final for e in events])
        rewards = self.rewards.rewards(actions, malicious, severity, final)
        overrides = np.array([np.nan if e.reward is None else e.reward for e in events])
        has_override = ~np.isnan(overrides)
        rewards = np.where(has_override, np.clip(overrides, -self.reward_clip, self.reward_clip), rewards)

        responded_before = np.array([ep.responded for ep in observed.episodes])[group]
        held_out = np.array([ep.holdout for ep in observed.episodes])[group]
        for g in np.flatnonzero([ep.holdout for ep in observed.episodes]):
            observed.episodes[g].rows.append(feats[group == g])
        # Held-out episodes are recorded for evaluation and never learned from.
        responded_before |= held_out
        responds = actions != Action.IGNORE
        # A response ends the episode: rows after the first one in the same episode yield nothing.
        prior = np.cumsum(responds) - responds
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        prior_in_group = prior - prior[starts][np.searchsorted(starts, np.arange(n), side="right") - 1]
        alive = ~responded_before & (prior_in_group == 0)
        done = responds | final
        same_next = np.r_[group[1:] == group[:-1], False]

        # The first row of each episode resolves the transition left pending by an earlier batch.
        for g, episode in enumerate(observed.episodes):
            first = starts[g]
            if episode.pending is not None and alive[first]:
                p = episode.pending
                r = self._reward_of(p, final=False)
                out.add(p.state[None], np.array([p.action]), np.array([r]), feats[first][None],
                        np.array([False]))
                episode.episode_return += r
                episode.pending = None

        complete = alive & (done | same_next)
        idx = np.flatnonzero(complete)
        nxt = np.where(done[idx], idx, np.minimum(idx + 1, n - 1))
        out.add(feats[idx], actions[idx], rewards[idx], feats[nxt], done[idx])
        if self.counterfactual_responses:
            self._add_counterfactuals(out, feats, actions, malicious, severity, np.flatnonzero(alive))
        np.add.at(_returns := np.zeros(len(observed.episodes)), group[idx], rewards[idx])

        last_rows = np.append(starts[1:], n) - 1
        for g, episode in enumerate(observed.episodes):
            episode.episode_return += float(_returns[g])
            last = last_rows[g]
            if alive[last] and not done[last]:
                e = events[last]
                episode.pending = _Pending(
                    feats[last].copy(), int(actions[last]), e.is_malicious, e.severity, e.reward
                )
            if (alive[starts[g] : last + 1] & responds[starts[g] : last + 1]).any():
                episode.responded = True
            if episode.final_seen or episode.responded:  # noqa: SIM102
                if episode.final_seen:
                    self._close(episode, out)
                # A responded episode stays open (its later events are consumed but ignored) until final.
        return out.batch()

    def _add_counterfactuals(
        self, out: _Collector, feats: np.ndarray, actions: np.ndarray, malicious: np.ndarray,
        severity: np.ndarray, rows: np.ndarray,
    ) -> None:
        # Telemetry is exogenous: what a sample does before the response does not depend on the
        # policy, so the reward of every response at every visited step is known from the table.
        # Adding those terminal transitions teaches Q(s, response) at every state the behaviour
        # policy reached, not only where exploration happened to respond.
        for response in range(1, len(Action)):
            r = rows[actions[rows] != response]
            if len(r) == 0:
                continue
            chosen = np.full(len(r), response, dtype=np.int64)
            reward = self.rewards.rewards(chosen, malicious[r], severity[r], np.zeros(len(r), bool))
            out.add(feats[r], chosen, reward, feats[r], np.ones(len(r), bool))

    def expire(self, now: float) -> TransitionBatch:
        """Close episodes idle for longer than the idle timeout (their last step counts as final)."""
        out = _Collector()
        for episode in [e for e in self._open.values() if now - e.last_seen > self.idle_timeout]:
            self._close(episode, out)
        return out.batch()

    def close_all(self) -> TransitionBatch:
        out = _Collector()
        for episode in list(self._open.values()):
            self._close(episode, out)
        return out.batch()

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget open episodes read from these partitions (revoked in a rebalance); returns how many."""
        doomed = [e for e in self._open.values() if e.partition in partitions]
        for episode in doomed:
            self._forget(episode)
        return len(doomed)

    def _is_holdout(self, key: tuple[str, str]) -> bool:
        # A stable hash: the same episode is held out before and after a restart.
        return zlib.crc32(f"{key[0]}\0{key[1]}".encode()) % 10_000 < self.holdout_fraction * 10_000

    def _reward_of(self, p: _Pending, *, final: bool) -> float:
        if p.reward_override is not None:
            return float(np.clip(p.reward_override, -self.reward_clip, self.reward_clip))
        r = self.rewards.rewards(np.array([p.action]), np.array([p.malicious]), np.array([p.severity]),
                                 np.array([final]))
        return float(r[0])

    def _close(self, episode: _Episode, out: _Collector) -> None:
        if episode.pending is not None:
            # The episode ended without telling us: its last observed step was the final one.
            p = episode.pending
            r = self._reward_of(p, final=True)
            out.add(p.state[None], np.array([p.action]), np.array([r]), p.state[None], np.array([True]))
            episode.episode_return += r
            episode.pending = None
        if episode.holdout:
            if episode.complete and episode.rows:
                self.holdout.append(HeldOutEpisode(np.concatenate(episode.rows), episode.malicious,
                                                   episode.severity))
        else:
            out.returns.append(episode.episode_return)
            out.malicious.append(episode.malicious)
        self._forget(episode)
        self._closed[episode.key] = None
        while len(self._closed) > self._remember_closed:
            self._closed.popitem(last=False)

    def _forget(self, episode: _Episode) -> None:
        self._open.pop(episode.key, None)
        sandbox = episode.key[0]
        if self._current.get(sandbox) == episode.key:
            del self._current[sandbox]

    def state_dict(self) -> dict[str, object]:
        """Open episodes as plain lists and numbers (checkpointable with weights_only loading)."""
        episodes = []
        for e in self._open.values():
            pending = None
            if e.pending is not None:
                p = e.pending
                pending = [p.state.tolist(), p.action, p.malicious, p.severity, p.reward_override]
            episodes.append(
                [list(e.key), e.partition, e.carry.tolist(), e.last_step, e.responded, e.final_seen,
                 pending, e.episode_return, e.malicious, e.severity]
            )
        # The publish gate's evaluation window: without it a restarted daemon would publish ungated
        # until enough held-out episodes finished again.
        holdout = [[torch.from_numpy(h.features), h.malicious, h.severity] for h in self.holdout]
        return {"episodes": episodes, "current": [[k, list(v)] for k, v in self._current.items()],
                "closed": [list(k) for k in self._closed], "holdout": holdout}

    def load_state_dict(self, state: dict[str, object], now: float) -> None:
        self._open.clear()
        for (key, partition, carry, last_step, responded, final_seen, pending, ret, mal,
             sev) in state["episodes"]:  # type: ignore[attr-defined]
            k = (key[0], key[1])
            holdout = self._is_holdout(k)
            e = _Episode(key=k, partition=partition, carry=np.asarray(carry, dtype=np.float64),
                         last_step=last_step, last_seen=now, responded=responded, final_seen=final_seen,
                         episode_return=ret, malicious=mal, severity=sev, holdout=holdout,
                         complete=not holdout)
            if pending is not None:
                e.pending = _Pending(np.asarray(pending[0], dtype=np.float32), pending[1], pending[2],
                                     pending[3], pending[4])
            self._open[e.key] = e
        self._current = {k: (v[0], v[1]) for k, v in state["current"]}  # type: ignore[attr-defined]
        self._closed = OrderedDict(((k[0], k[1]), None) for k in state["closed"])  # type: ignore[attr-defined]
        self.holdout.clear()
        for features, malicious, severity in state.get("holdout", []):  # type: ignore[attr-defined]
            self.holdout.append(HeldOutEpisode(np.asarray(features, dtype=np.float32), malicious, severity))
