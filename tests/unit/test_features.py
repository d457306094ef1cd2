"""The feature spec: values of each feature on hand-made episodes, carries, and the running normalizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamdqn.stream.features import (
    CARRY_DIM,
    FEATURE_DIM,
    FEATURE_NAMES,
    FeatureSpec,
    RunningNormalizer,
    featurize,
    featurize_episode,
    new_carry,
)
from streamdqn.stream.wire import raw_matrix
from tests.factories import make_event

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def episode_raw(*overrides: dict[str, object]) -> np.ndarray:
    return raw_matrix([make_event(step=i, **o) for i, o in enumerate(overrides)])


def test_spec_names_and_dimension() -> None:
    assert FEATURE_DIM == 30 == len(set(FEATURE_NAMES))
    assert FeatureSpec().dim == FEATURE_DIM
    assert FEATURE_NAMES[:3] == ("log_syscall_count", "log_file_read_count", "log_file_write_count")


def test_feature_values_of_a_hand_made_episode() -> None:
    raw = episode_raw(
        {"syscall_count": 9, "bytes_sent": 0, "cpu_usage": 50.0, "memory_usage": 99.0},
        {
            "syscall_count": 99,
            "bytes_sent": 10,
            "cpu_usage": 10.0,
            "memory_usage": 9.0,
            "privilege_escalation_attempt": True,
        },
        {"syscall_count": 0, "bytes_sent": 0, "cpu_usage": 30.0, "memory_usage": 0.0},
    )
    x = featurize_episode(raw, np.array([0.0, 1.0, 2.0]))
    assert x.shape == (3, FEATURE_DIM)
    assert x.dtype == np.float32
    expect = {
        "log_syscall_count": [math.log(10), math.log(100), 0.0],
        "cpu_fraction": [0.5, 0.1, 0.3],
        "log_memory_mb": [math.log(100), math.log(10), 0.0],
        "privilege_escalation_attempt": [0, 1, 0],
        "log_cumulative_syscall_count": [math.log(10), math.log(109), math.log(109)],
        "log_cumulative_bytes_sent": [0.0, math.log(11), math.log(11)],
        "ever_privilege_escalation_attempt": [0, 1, 1],
        "ever_registry_modification": [0, 0, 0],
        "flagged_step_fraction": [0, 1 / 2, 1 / 3],
        "max_cpu_fraction": [0.5, 0.5, 0.5],
        "mean_cpu_fraction": [0.5, 0.3, 0.3],
        "log_max_memory_mb": [math.log(100)] * 3,
        "log_step": [0.0, math.log(2), math.log(3)],
        "log_steps_seen": [math.log(2), math.log(3), math.log(4)],
        "delta_log_syscall_count": [0.0, math.log(100) - math.log(10), -math.log(100)],
        "delta_log_memory_mb": [0.0, math.log(10) - math.log(100), -math.log(10)],
    }
    for name, values in expect.items():
        np.testing.assert_allclose(x[:, F[name]], values, rtol=1e-6, atol=1e-7, err_msg=name)


def test_carry_continues_an_episode_across_batches() -> None:
    raw = episode_raw(*({"syscall_count": 10 * i, "cpu_usage": 5.0 * i} for i in range(6)))
    step = np.arange(6.0)
    whole = featurize_episode(raw, step)
    first, carry = featurize(raw[:4], step[:4], np.zeros(4, np.int64), new_carry(1))
    second, carry_after = featurize(raw[4:], step[4:], np.zeros(2, np.int64), carry)
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    assert carry.shape == (1, CARRY_DIM)
    _, carry_whole = featurize(raw, step, np.zeros(6, np.int64), new_carry(1))
    np.testing.assert_array_equal(carry_after, carry_whole)


def test_empty_batch_keeps_the_carries() -> None:
    carry = np.arange(2 * CARRY_DIM, dtype=np.float64).reshape(2, CARRY_DIM)
    out, carry_out = featurize(np.zeros((0, 12)), np.zeros(0), np.zeros(0, np.int64), carry)
    assert out.shape == (0, FEATURE_DIM)
    np.testing.assert_array_equal(carry_out, carry)
    assert carry_out is not carry


def test_episodes_of_one_batch_do_not_see_each_other() -> None:
    # Regression: a global cumsum minus each group's start made a small episode's cumulative
    # bytes cancel to 0 next to an episode with huge counts in the same batch.
    huge = episode_raw(*({"bytes_sent": 2**53} for _ in range(3)))
    small = episode_raw({"bytes_sent": 1, "cpu_usage": 0.001}, {"bytes_sent": 1, "cpu_usage": 0.003})
    alone = featurize_episode(small, np.arange(2.0))
    both, _ = featurize(
        np.vstack([huge, small]),
        np.r_[np.arange(3.0), np.arange(2.0)],
        np.array([0, 0, 0, 1, 1]),
        new_carry(2),
    )
    np.testing.assert_array_equal(both[3:], alone)
    np.testing.assert_allclose(
        alone[:, F["log_cumulative_bytes_sent"]], [math.log(2), math.log(3)], rtol=1e-6
    )


def test_shape_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="shapes"):
        featurize(np.zeros((2, 11)), np.zeros(2), np.zeros(2, np.int64), new_carry(1))


def test_normalizer_matches_numpy_over_many_batches() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, FEATURE_DIM)) * np.arange(1, FEATURE_DIM + 1)
    norm = RunningNormalizer()
    for chunk in np.array_split(data, [1, 7, 300, 301, 999]):
        norm.update(chunk)
    norm.update(np.zeros((0, FEATURE_DIM)))
    assert norm.count == 1000
    np.testing.assert_allclose(norm.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(norm.var, data.var(axis=0), rtol=1e-9)
    z = norm.normalize(data)
    assert z.dtype == np.float32
    assert np.abs(z).max() <= norm.clip
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)


def test_normalizer_clips_and_refuses_non_finite_and_round_trips() -> None:
    norm = RunningNormalizer(dim=2, clip=3.0)
    np.testing.assert_array_equal(norm.var, [1.0, 1.0])  # no statistics yet: identity scale
    norm.update(np.array([[0.0, 1.0], [2.0, 3.0]]))
    assert norm.normalize(np.array([[1e6, -1e6]])).tolist() == [[3.0, -3.0]]
    with pytest.raises(ValueError, match="non-finite"):
        norm.update(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="expects"):
        norm.update(np.zeros((1, 3)))
    other = RunningNormalizer(dim=2)
    other.load_state(norm.state())
    assert (other.count, other.clip) == (2.0, 3.0)
    np.testing.assert_array_equal(other.mean, norm.mean)
    np.testing.assert_array_equal(other.std, norm.std)
    with pytest.raises(ValueError, match="dim"):
        RunningNormalizer(dim=3).load_state(norm.state())
