"""Feature drift: how far recent traffic has moved from the statistics the policy normalizes with.

A window of the most recent feature vectors is compared, per feature, with the running normalizer's
mean and standard deviation (what every snapshot bakes in): each recent value is standardized with
them and binned at the deciles of a standard normal, and the population stability index

    PSI = sum over bins of (recent share - expected share) * ln(recent share / expected share)

is computed against the expected 10 % per bin. The usual reading: below 0.1 stable, 0.1-0.25 moving,
above 0.25 shifted. The reference is a normal with the normalizer's moments, so a feature that was
never normal (a flag, a count that is mostly 0) has a PSI above 0 even without drift: alert on its
change over time, or on features whose baseline is low, not on one absolute value for every feature.
"""

from __future__ import annotations

import statistics

import numpy as np

BINS = 10
# Interior bin edges: the deciles of a standard normal.
_EDGES = np.array([statistics.NormalDist().inv_cdf(q / BINS) for q in range(1, BINS)])
_FLOOR = 1e-4  # an empty bin's share, so that the logarithm stays finite


class RecentWindow:
    """The last `size` feature vectors seen (a ring)."""

    def __init__(self, dim: int, size: int = 5000) -> None:
        self.values = np.zeros((size, dim), np.float32)
        self.size = size
        self.filled = 0
        self._next = 0

    def add(self, features: np.ndarray) -> None:
        n = len(features)
        if n == 0:
            return
        if n >= self.size:
            self.values[:] = features[-self.size:]
            self._next, self.filled = 0, self.size
            return
        end = self._next + n
        if end <= self.size:
            self.values[self._next:end] = features
        else:
            first = self.size - self._next
            self.values[self._next:] = features[:first]
            self.values[: n - first] = features[first:]
        self._next = end % self.size
        self.filled = min(self.size, self.filled + n)

    def recent(self) -> np.ndarray:
        return self.values[: self.filled]


def psi(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """PSI of each column of `values` [N, D] against a normal with `mean`, `std` [D] (0 when N is 0)."""
    if len(values) == 0:
        return np.zeros(values.shape[1])
    z = (values - mean) / np.where(std > 0, std, 1.0)
    bins = np.searchsorted(_EDGES, z, side="right")  # 0..BINS-1 per value
    counts = np.stack([(bins == b).sum(axis=0) for b in range(BINS)], axis=0).astype(np.float64)
    recent = np.maximum(counts / len(values), _FLOOR)
    expected = 1.0 / BINS
    result: np.ndarray = ((recent - expected) * np.log(recent / expected)).sum(axis=0)
    return result
