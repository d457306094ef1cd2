"""Feature drift (PSI) against the normalizer's moments, and the recent-window ring."""

from __future__ import annotations

import numpy as np
import pytest

from streamdqn.stream.drift import RecentWindow, psi


def test_psi_is_near_zero_for_the_reference_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    same = rng.normal(3.0, 2.0, size=(20_000, 2))
    values = psi(same, np.array([3.0, 3.0]), np.array([2.0, 2.0]))
    assert values.shape == (2,)
    assert (values < 0.01).all()
    shifted = rng.normal(4.0, 2.0, size=(20_000, 1))  # half a standard deviation
    assert 0.1 < psi(shifted, np.array([3.0]), np.array([2.0]))[0] < 0.5
    far = rng.normal(13.0, 2.0, size=(20_000, 1))
    assert psi(far, np.array([3.0]), np.array([2.0]))[0] > 5


def test_psi_matches_a_hand_computation() -> None:
    # All values in the top bin: sum of (0.1^-4 ...) terms computed by hand.
    values = np.full((10, 1), 100.0)
    expected = 9 * (1e-4 - 0.1) * np.log(1e-4 / 0.1) + (1.0 - 0.1) * np.log(1.0 / 0.1)
    assert psi(values, np.zeros(1), np.ones(1))[0] == pytest.approx(expected)
    assert psi(np.zeros((0, 3)), np.zeros(3), np.ones(3)).tolist() == [0.0, 0.0, 0.0]


def test_the_window_keeps_the_last_rows_in_any_order_of_pushes() -> None:
    window = RecentWindow(dim=1, size=5)
    window.add(np.arange(3, dtype=np.float32)[:, None])
    assert sorted(window.recent()[:, 0].tolist()) == [0, 1, 2]
    window.add(np.arange(3, 7, dtype=np.float32)[:, None])
    assert sorted(window.recent()[:, 0].tolist()) == [2, 3, 4, 5, 6]
    window.add(np.arange(10, 20, dtype=np.float32)[:, None])
    assert sorted(window.recent()[:, 0].tolist()) == [15, 16, 17, 18, 19]
    window.add(np.zeros((0, 1), np.float32))
    assert window.filled == 5
