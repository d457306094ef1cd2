"""Tracker properties on random episodes and actions: transition counts, one done per episode, table rewards,
and the same transitions whatever the batching (and across a state_dict round trip).

Each event encodes its episode in cpu_usage (cpu_fraction = k / 100) and its step in log_step, so a
transition's state says which episode and step it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import FEATURE_NAMES
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action, TelemetryEvent
from tests.factories import make_event

PROPS = settings(max_examples=100, deadline=None)
CPU, LOG_STEP = FEATURE_NAMES.index("cpu_fraction"), FEATURE_NAMES.index("log_step")
TABLE = RewardTable()
# Ignore most of the time, so that episodes run for a while before a response ends them.
actions_st = st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4])


@dataclass(frozen=True)
class Episode:
    index: int
    sandbox: str
    malicious: bool
    severity: float
    actions: tuple[int, ...]  # the policy's action at each step
    final: bool  # the last event says final: true
    trailing: int  # events sent after the final one (rejected)

    def events(self) -> list[TelemetryEvent]:
        n = len(self.actions) + (self.trailing if self.final else 0)
        return [
            make_event(
                episode_id=self.index,
                sandbox_id=self.sandbox,
                step=2 * i,
                is_malicious=self.malicious,
                severity=self.severity,
                cpu_usage=float(self.index),
                syscall_count=i * 7,
                final=self.final and i == len(self.actions) - 1,
            )
            for i in range(n)
        ]


@st.composite
def episode_sets(draw: st.DrawFn, shared_sandboxes: bool) -> list[Episode]:
    count = draw(st.integers(1, 5))
    sandboxes = draw(st.integers(1, 3)) if shared_sandboxes else count
    return [
        Episode(
            index=k,
            sandbox=f"sb{k % sandboxes}",
            malicious=draw(st.booleans()),
            severity=draw(st.sampled_from([0.0, 0.2, 1 / 3, 0.5, 2 / 3, 0.9, 1.0])),
            actions=tuple(draw(st.lists(actions_st, min_size=1, max_size=8))),
            final=draw(st.booleans()),
            trailing=draw(st.integers(0, 2)),
        )
        for k in range(count)
    ]


def stream_of(episodes: list[Episode], rnd: st.DataObject) -> list[TelemetryEvent]:
    """Sandboxes interleaved at random; each sandbox sends its episodes one after another, in order."""
    queues: dict[str, list[TelemetryEvent]] = {}
    for e in episodes:
        queues.setdefault(e.sandbox, []).extend(e.events())
    order = [s for s, q in queues.items() for _ in q]
    order = rnd.draw(st.permutations(order))
    positions = dict.fromkeys(queues, 0)
    out = []
    for s in order:
        out.append(queues[s][positions[s]])
        positions[s] += 1
    return out


def run(
    tracker: EpisodeTracker, batch: list[TelemetryEvent], episodes: list[Episode]
) -> tuple[list[TransitionBatch], list[str]]:
    """observe + act with each episode's own actions; returns the batches and the reject reasons."""
    observed, closing = tracker.observe(batch, now=0.0)
    chosen = [episodes[int(e.episode_id)].actions for e in observed.events]
    steps = [e.step // 2 for e in observed.events]
    # Events after an episode's response or final step: any action, they must yield nothing.
    actions = np.array(
        [a[i] if i < len(a) else 4 for a, i in zip(chosen, steps, strict=True)], dtype=np.int64
    )
    return [closing, tracker.act(observed, actions)], [r.reason for r in observed.rejects]


def decode(batch: TransitionBatch) -> list[tuple[int, int, int, float, int, bool]]:
    """(episode, step, action, reward, next step, done) of each transition."""
    episode = np.rint(batch.states[:, CPU] * 100).astype(int)
    step = np.rint(np.expm1(batch.states[:, LOG_STEP].astype(np.float64))).astype(int) // 2
    next_step = np.rint(np.expm1(batch.next_states[:, LOG_STEP].astype(np.float64))).astype(int) // 2
    return [
        (int(k), int(s), int(a), float(r), int(n), bool(d))
        for k, s, a, r, n, d in zip(
            episode, step, batch.actions, batch.rewards, next_step, batch.dones, strict=True
        )
    ]


def table(action: int, e: Episode, final: bool) -> float:
    return float(
        TABLE.rewards(np.array([action]), np.array([e.malicious]), np.array([e.severity]), np.array([final]))[
            0
        ]
    )


@PROPS
@given(episode_sets(shared_sandboxes=False), st.data())
def test_transitions_count_dones_and_rewards_follow_the_table(
    episodes: list[Episode], data: st.DataObject
) -> None:
    tracker = EpisodeTracker(counterfactual_responses=False)  # type: ignore[call-arg]
    batches, rejects = run(tracker, stream_of(episodes, data), episodes)
    batches.append(tracker.close_all())
    assert rejects == ["episode_closed"] * sum(e.trailing for e in episodes if e.final)
    assert tracker.open_episodes == 0
    got = [t for b in batches for t in decode(b)]
    returns = sorted(r for b in batches for r in b.episode_returns)
    expected_returns = []
    for e in episodes:
        responses = [i for i, a in enumerate(e.actions) if a != Action.IGNORE]
        last = responses[0] if responses else len(e.actions) - 1
        mine = sorted(t for t in got if t[0] == e.index)
        assert len(mine) == last + 1  # the steps up to and including the first response, or all
        assert [t[5] for t in mine] == [False] * last + [True]  # exactly one done, the last one
        expected = []
        for i in range(last + 1):
            a = e.actions[i]
            if i < last:
                expected.append((e.index, i, a, table(a, e, final=False), i + 1, False))
            else:  # a response, or an ignore at the final step (told, or at close_all)
                expected.append((e.index, i, a, table(a, e, final=a == Action.IGNORE), i, True))
        assert [t[:3] + t[4:] for t in mine] == [t[:3] + t[4:] for t in expected]
        np.testing.assert_allclose([t[3] for t in mine], [t[3] for t in expected], rtol=1e-6)
        expected_returns.append(sum(t[3] for t in expected))
    np.testing.assert_allclose(returns, sorted(expected_returns), rtol=1e-5, atol=1e-6)


def transitions(batches: list[TransitionBatch]) -> list[bytes]:
    return sorted(
        b.states[i].tobytes()
        + b.next_states[i].tobytes()
        + bytes([int(b.actions[i]), int(b.dones[i])])
        + np.float32(b.rewards[i]).tobytes()
        for b in batches
        for i in range(len(b))
    )


def returns(batches: list[TransitionBatch]) -> list[float]:
    return sorted(r for b in batches for r in b.episode_returns)


@PROPS
@given(episode_sets(shared_sandboxes=True), st.data())
def test_any_split_into_batches_gives_the_same_transitions(
    episodes: list[Episode], data: st.DataObject
) -> None:
    stream = stream_of(episodes, data)
    whole = EpisodeTracker(counterfactual_responses=False)  # type: ignore[call-arg]
    one_batch, one_batch_rejects = run(whole, stream, episodes)
    one_batch.append(whole.close_all())

    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    tracker = EpisodeTracker(counterfactual_responses=False)  # type: ignore[call-arg]
    split: list[TransitionBatch] = []
    split_rejects: list[str] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if data.draw(st.booleans()):  # a restart from a checkpoint at this cut changes nothing either
            restored = EpisodeTracker(counterfactual_responses=False)  # type: ignore[call-arg]
            restored.load_state_dict(tracker.state_dict(), now=0.0)
            tracker = restored
        batches, rejects = run(tracker, stream[a:b], episodes)
        split += batches
        split_rejects += rejects
    split.append(tracker.close_all())
    assert transitions(split) == transitions(one_batch)
    np.testing.assert_allclose(returns(split), returns(one_batch), rtol=1e-9, atol=1e-12)
    assert len(returns(split)) == len(episodes)
    assert sorted(split_rejects) == sorted(one_batch_rejects)
    assert tracker.open_episodes == whole.open_episodes == 0
