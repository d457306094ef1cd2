"""Feature properties: batch cuts and neighbours change nothing, no future leakage, no labels, always finite.

Equalities are exact: each episode's running context is accumulated in the same order whatever the
batching, so online features equal the offline ones bit for bit.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import FEATURE_DIM, featurize, featurize_episode, new_carry
from streamdqn.stream.wire import TelemetryEvent, columns_of, raw_matrix
from tests.factories import activity, make_event, severity

PROPS = settings(max_examples=100, deadline=None)


@st.composite
def episodes(draw: st.DrawFn, max_size: int = 12) -> list[dict[str, Any]]:
    """One episode's events as field dicts, steps strictly increasing with gaps."""
    acts = draw(st.lists(activity(), min_size=1, max_size=max_size))
    gaps = draw(st.lists(st.integers(1, 5), min_size=len(acts), max_size=len(acts)))
    first = draw(st.integers(0, 3))
    return [{**a, "step": first + sum(gaps[:i])} for i, a in enumerate(acts)]


def as_arrays(episode: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    events = [make_event(**e) for e in episode]
    return raw_matrix(events), np.array([e.step for e in events], dtype=np.float64)


def cut_points(draw: st.DrawFn, n: int) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, n), max_size=5)))


@PROPS
@given(episodes(), st.data())
def test_one_batch_equals_any_split_into_batches_with_carries(
    episode: list[dict[str, Any]], data: st.DataObject
) -> None:
    raw, step = as_arrays(episode)
    whole, whole_carry = featurize(raw, step, np.zeros(len(raw), np.int64), new_carry(1))
    bounds = [0, *cut_points(data.draw, len(raw)), len(raw)]
    carry, parts = new_carry(1), []
    for a, b in itertools.pairwise(bounds):
        part, carry = featurize(raw[a:b], step[a:b], np.zeros(b - a, np.int64), carry)
        parts.append(part)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(carry, whole_carry)


@PROPS
@given(st.lists(episodes(max_size=6), min_size=2, max_size=4))
def test_episodes_grouped_in_one_batch_equal_each_alone(batch: list[list[dict[str, Any]]]) -> None:
    arrays = [as_arrays(e) for e in batch]
    raw = np.vstack([r for r, _ in arrays])
    step = np.concatenate([s for _, s in arrays])
    group = np.repeat(np.arange(len(arrays)), [len(s) for _, s in arrays])
    together, _ = featurize(raw, step, group, new_carry(len(arrays)))
    offset = 0
    for r, s in arrays:
        np.testing.assert_array_equal(together[offset : offset + len(s)], featurize_episode(r, s))
        offset += len(s)


@PROPS
@given(st.lists(episodes(max_size=6), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_interleaved_episodes_observed_by_the_tracker_equal_each_alone(
    batch: list[list[dict[str, Any]]], rnd: Any
) -> None:
    # Different sandboxes, events shuffled across episodes but each episode's own order kept.
    queues = [[make_event(**e, episode_id=k, sandbox_id=f"sb{k}") for e in ep] for k, ep in enumerate(batch)]
    order = [k for k, q in enumerate(queues) for _ in q]
    rnd.shuffle(order)
    positions = [0] * len(queues)
    stream: list[TelemetryEvent] = []
    for k in order:
        stream.append(queues[k][positions[k]])
        positions[k] += 1
    observed = EpisodeTracker().observe(columns_of(stream), np.zeros(len(stream), np.int64), now=0.0)
    assert observed.rejects == []
    assert observed.accepted.tolist() == list(range(len(stream)))
    for k, queue in enumerate(queues):
        mine = [i for i, e in enumerate(stream) if e.sandbox_id == f"sb{k}"]
        assert [stream[i] for i in mine] == queue
        raw, step = raw_matrix(queue), np.array([e.step for e in queue], dtype=np.float64)
        np.testing.assert_array_equal(observed.features[mine], featurize_episode(raw, step))


@PROPS
@given(episodes(), episodes())
def test_features_of_a_step_do_not_change_when_later_events_arrive(
    episode: list[dict[str, Any]], later: list[dict[str, Any]]
) -> None:
    raw, step = as_arrays(episode)
    more_raw, more_step = as_arrays(later)
    longer_raw = np.vstack([raw, more_raw])
    longer_step = np.concatenate([step, more_step + step[-1] + 1])
    np.testing.assert_array_equal(
        featurize_episode(longer_raw, longer_step)[: len(raw)], featurize_episode(raw, step)
    )


@PROPS
@given(episodes(), st.data())
def test_labels_severity_and_logged_fields_never_affect_features(
    episode: list[dict[str, Any]], data: st.DataObject
) -> None:
    def events(labelled: bool) -> list[TelemetryEvent]:
        out = []
        for e in episode:
            extra: dict[str, Any] = {}
            if labelled:
                extra = {
                    "is_malicious": data.draw(st.booleans()),
                    "severity": data.draw(severity),
                    "action": data.draw(st.integers(0, 4)),
                    "reward": data.draw(st.floats(-5, 5)),
                    "timestamp": data.draw(st.floats(0, 2e9)),
                }
            out.append(make_event(**e, **extra))
        return out

    def features(evs: list[TelemetryEvent]) -> np.ndarray:
        observed = EpisodeTracker().observe(columns_of(evs), np.zeros(len(evs), np.int64), now=0.0)
        return observed.features

    np.testing.assert_array_equal(features(events(True)), features(events(False)))


@PROPS
@given(st.lists(episodes(max_size=8), min_size=1, max_size=3))
def test_features_are_finite_float32_for_any_valid_events(batch: list[list[dict[str, Any]]]) -> None:
    for episode in batch:
        raw, step = as_arrays(episode)
        x = featurize_episode(raw, step)
        assert x.shape == (len(raw), FEATURE_DIM)
        assert x.dtype == np.float32
        assert np.isfinite(x).all()
