"""The feature spec: raw telemetry rows to float32 vectors of dimension 30, and the running normalizer.

Pure and vectorized: no I/O, no torch. A feature vector has two halves:
- per-step values of the event itself (log1p of counts, cpu fraction, flags);
- running context of the episode so far (cumulative counts, "ever seen" flags, maxima, step index),
  computed only from that episode's events up to and including this one: never the label, the
  severity or the future.
Running context crosses batch boundaries through a per-episode `carry` vector (CARRY_DIM floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import numpy as np

from streamdqn.stream.wire import COUNT_FIELDS, FLAG_FIELDS, RAW_FIELDS

FEATURE_VERSION = 1
_N_COUNTS = len(COUNT_FIELDS)
_N_FLAGS = len(FLAG_FIELDS)
_CPU = _N_COUNTS
_MEM = _N_COUNTS + 1
_FLAGS = slice(_N_COUNTS + 2, _N_COUNTS + 2 + _N_FLAGS)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"log_{f}" for f in COUNT_FIELDS),
    "cpu_fraction",
    "log_memory_mb",
    *FLAG_FIELDS,
    *(f"log_cumulative_{f}" for f in COUNT_FIELDS),
    *(f"ever_{f}" for f in FLAG_FIELDS),
    "flagged_step_fraction",
    "max_cpu_fraction",
    "mean_cpu_fraction",
    "log_max_memory_mb",
    "log_step",
    "log_steps_seen",
    "delta_log_syscall_count",
    "delta_log_memory_mb",
)
FEATURE_DIM = len(FEATURE_NAMES)
assert FEATURE_DIM == 30, FEATURE_DIM

# Carry layout: cumulative raw counts, ever-flags, flagged steps, max cpu, sum cpu, max log memory,
# steps seen, previous log syscalls, previous log memory.
_C_CUM = slice(0, _N_COUNTS)
_C_EVER = slice(_N_COUNTS, _N_COUNTS + _N_FLAGS)
_C_FLAGGED = _N_COUNTS + _N_FLAGS
_C_MAXCPU, _C_SUMCPU, _C_MAXMEM, _C_SEEN, _C_PREVSYS, _C_PREVMEM = range(_C_FLAGGED + 1, _C_FLAGGED + 7)
CARRY_DIM = _C_PREVMEM + 1
_SUM_CARRY = [*range(_C_CUM.start, _C_CUM.stop), _C_FLAGGED, _C_SEEN, _C_SUMCPU]
_MAX_CARRY = [*range(_C_EVER.start, _C_EVER.stop), _C_MAXCPU, _C_MAXMEM]


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector means; written into every snapshot manifest."""

    version: int = FEATURE_VERSION
    names: tuple[str, ...] = FEATURE_NAMES

    @property
    def dim(self) -> int:
        return len(self.names)


def new_carry(groups: int = 1) -> np.ndarray:
    """Running context of episodes that have seen no events yet."""
    return np.zeros((groups, CARRY_DIM), dtype=np.float64)


def _group_starts(group: np.ndarray) -> np.ndarray:
    starts = np.ones(len(group), dtype=bool)
    starts[1:] = group[1:] != group[:-1]
    return np.flatnonzero(starts)


def _grouped_accumulate(
    op: np.ufunc, x: np.ndarray, group: np.ndarray, starts: np.ndarray, init: np.ndarray
) -> np.ndarray:
    """Running `op` (np.add or np.maximum) of x within each group, starting from the group's carry.

    Evaluated left to right per group (init op x1 op x2 ...), so an episode's values depend only on its
    own rows and carry: bit-identical whatever else shares the batch and wherever the batch was cut.
    (A global cumsum minus each group's offset was not: next to an episode with huge byte counts, a
    small episode's cumulative counts cancelled to 0.) Episodes longer than sqrt(N) get one accumulate
    each; the others advance together one position at a time: at most 2*sqrt(N) numpy calls.
    """
    ends = np.append(starts[1:], len(x))
    lengths = ends - starts
    out = np.empty_like(x)
    long = lengths > max(1, math.isqrt(len(x)))
    for s, e in zip(starts[long], ends[long], strict=True):
        out[s:e] = op.accumulate(np.concatenate([init[group[s]][None], x[s:e]]), axis=0)[1:]
    short_starts, short_lengths = starts[~long], lengths[~long]
    if len(short_starts):
        out[short_starts] = op(init[group[short_starts]], x[short_starts])
        for k in range(1, int(short_lengths.max())):
            rows = short_starts[short_lengths > k] + k
            out[rows] = op(out[rows - 1], x[rows])
    return out


def featurize(
    raw: np.ndarray, step: np.ndarray, group: np.ndarray, carry: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors for a batch of events and the updated carries.

    raw: [N, len(RAW_FIELDS)] float64 in RAW_FIELDS order; step: [N] step indices;
    group: [N] episode index 0..G-1, non-decreasing, each episode's rows in step order;
    carry: [G, CARRY_DIM] running context before this batch. Returns float32 [N, 30], carry [G, CARRY_DIM].
    """
    n = len(raw)
    if raw.shape != (n, len(RAW_FIELDS)) or step.shape != (n,) or group.shape != (n,):
        raise ValueError(f"featurize: shapes raw={raw.shape} step={step.shape} group={group.shape}")
    out = np.empty((n, FEATURE_DIM), dtype=np.float32)
    carry_out = carry.copy()
    if n == 0:
        return out, carry_out
    starts = _group_starts(group)
    counts = raw[:, :_N_COUNTS]
    log_counts = np.log1p(counts)
    cpu = raw[:, _CPU] / 100.0
    log_mem = np.log1p(raw[:, _MEM])
    flags = raw[:, _FLAGS]

    # Running sums [counts, any flag, 1, cpu] and maxima [flags, cpu, log memory], each in one pass.
    summed = np.column_stack([counts, flags.max(axis=1), np.ones(n), cpu])
    sums = _grouped_accumulate(np.add, summed, group, starts, carry[:, _SUM_CARRY])
    maxed = np.column_stack([flags, cpu, log_mem])
    maxima = _grouped_accumulate(np.maximum, maxed, group, starts, carry[:, _MAX_CARRY])
    cum, flagged, seen, sum_cpu = sums[:, :_N_COUNTS], sums[:, -3], sums[:, -2], sums[:, -1]
    ever, max_cpu, max_mem = maxima[:, :_N_FLAGS], maxima[:, -2], maxima[:, -1]

    prev_sys = np.empty(n)
    prev_sys[1:] = log_counts[:-1, 0]
    prev_mem = np.empty(n)
    prev_mem[1:] = log_mem[:-1]
    first = group[starts]
    has_prev = carry[first, _C_SEEN] > 0
    prev_sys[starts] = np.where(has_prev, carry[first, _C_PREVSYS], log_counts[starts, 0])
    prev_mem[starts] = np.where(has_prev, carry[first, _C_PREVMEM], log_mem[starts])

    out[:, :_N_COUNTS] = log_counts
    out[:, _CPU] = cpu
    out[:, _MEM] = log_mem
    out[:, _FLAGS] = flags
    k = _N_COUNTS + 2 + _N_FLAGS
    out[:, k : k + _N_COUNTS] = np.log1p(cum)
    k += _N_COUNTS
    out[:, k : k + _N_FLAGS] = ever
    k += _N_FLAGS
    out[:, k] = flagged / seen
    out[:, k + 1] = max_cpu
    out[:, k + 2] = sum_cpu / seen
    out[:, k + 3] = max_mem
    out[:, k + 4] = np.log1p(step)
    out[:, k + 5] = np.log1p(seen)
    out[:, k + 6] = log_counts[:, 0] - prev_sys
    out[:, k + 7] = log_mem - prev_mem

    last = np.append(starts[1:], n) - 1
    g = group[last]
    carry_out[g, _C_CUM] = cum[last]
    carry_out[g, _C_EVER] = ever[last]
    carry_out[g, _C_FLAGGED] = flagged[last]
    carry_out[g, _C_MAXCPU] = max_cpu[last]
    carry_out[g, _C_SUMCPU] = sum_cpu[last]
    carry_out[g, _C_MAXMEM] = max_mem[last]
    carry_out[g, _C_SEEN] = seen[last]
    carry_out[g, _C_PREVSYS] = log_counts[last, 0]
    carry_out[g, _C_PREVMEM] = log_mem[last]
    return out, carry_out


def featurize_episode(raw: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Feature vectors of one whole episode's events, in step order."""
    features, _ = featurize(raw, step, np.zeros(len(raw), dtype=np.int64), new_carry(1))
    return features


class RunningNormalizer:
    """Running mean and variance of feature vectors (Chan et al.'s parallel update, float64).

    Its statistics are saved in checkpoints and baked into every exported ONNX graph.
    """

    def __init__(self, dim: int = FEATURE_DIM, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.dim = dim
        self.clip = clip
        self.eps = eps
        self.count = 0.0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"normalizer expects [N, {self.dim}], got {batch.shape}")
        if len(batch) == 0:
            return
        if not np.isfinite(batch).all():
            raise ValueError("normalizer refuses non-finite features")
        n = float(len(batch))
        mean_b = batch.mean(axis=0)
        m2_b = ((batch - mean_b) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count > 1 else np.ones(self.dim)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var + self.eps)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.clip((x - self.mean) / self.std, -self.clip, self.clip).astype(np.float32)
        return out

    def state(self) -> NormalizerState:
        return NormalizerState(self.count, self.mean.tolist(), self.m2.tolist(), self.clip)

    def load_state(self, state: NormalizerState) -> None:
        if len(state.mean) != self.dim or len(state.m2) != self.dim:
            raise ValueError(f"normalizer state has dim {len(state.mean)}, expected {self.dim}")
        self.count = state.count
        self.mean = np.asarray(state.mean, dtype=np.float64)
        self.m2 = np.asarray(state.m2, dtype=np.float64)
        self.clip = state.clip


class NormalizerState(msgspec.Struct, forbid_unknown_fields=True):
    """A RunningNormalizer's statistics (Chan et al.'s count, mean and sum of squared deviations)."""

    count: float
    mean: list[float]
    m2: list[float]
    clip: float
