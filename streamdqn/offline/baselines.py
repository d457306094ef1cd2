"""Baseline policies for the offline evaluation: always ignore, review at step 0, random, the label-aware
oracle, and a per-step multinomial logistic-regression classifier with a tuned threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamdqn.offline.dataset import EpisodeData
from streamdqn.stream.features import FEATURE_NAMES
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, Policy, replay
from streamdqn.stream.wire import Action

CLASS_NAMES: tuple[str, ...] = ("benign", "malicious_low", "malicious_mid", "malicious_high")
# A severity standing for each malicious class (the middle of its third), to ask the reward table
# which response it rewards most.
_CLASS_SEVERITY = (1 / 6, 1 / 2, 5 / 6)
_FIRST_STEP_SEEN = float(np.log1p(1.0))  # the `log_steps_seen` feature on an episode's first row
_STEPS_SEEN = FEATURE_NAMES.index("log_steps_seen")


def always_ignore(features: np.ndarray) -> np.ndarray:
    """Never respond."""
    return np.zeros(len(features), dtype=np.int64)


def review_at_step0(features: np.ndarray) -> np.ndarray:
    """Send every episode to review on its first row (the row whose steps-seen count is 1)."""
    first = np.abs(features[:, _STEPS_SEEN] - _FIRST_STEP_SEEN) < 1e-4
    return np.where(first, int(Action.REVIEW), int(Action.IGNORE)).astype(np.int64)


def random_policy(seed: int) -> Policy:
    """Uniform over the five actions at every row; the same rows give the same actions for a seed."""

    def decide(features: np.ndarray) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, len(Action), size=len(features), dtype=np.int64)

    return decide


def oracle_policy(episodes: Sequence[EpisodeData], rewards: RewardTable) -> Policy:
    """The label-aware upper bound: ignore benign episodes, respond to malicious ones on their first row
    with `rewards.best_action`. It knows only these episodes: call it on their concatenated rows."""
    batch = EpisodeBatch.of(episodes)
    best = np.array([rewards.best_action(e.malicious, e.severity) for e in episodes], dtype=np.int64)
    actions = np.where(batch.position == 0, best[batch.group], int(Action.IGNORE)).astype(np.int64)

    def decide(features: np.ndarray) -> np.ndarray:
        if len(features) != len(actions):
            raise ValueError(f"the oracle knows {len(actions)} rows of its episodes, got {len(features)}")
        return actions

    return decide


def severity_class(malicious: np.ndarray, severity: np.ndarray) -> np.ndarray:
    """Class index per CLASS_NAMES: 0 benign, 1 + severity third for malicious."""
    third = np.clip((np.asarray(severity, dtype=np.float64) * 3).astype(np.int64), 0, 2)
    return np.where(np.asarray(malicious, dtype=bool), 1 + third, 0)


@dataclass(frozen=True)
class LogisticBaseline:
    """A per-step multinomial logistic regression over CLASS_NAMES, used as a policy.

    It responds at the first row where P(malicious) = 1 - P(benign) exceeds `threshold`, with the
    action the reward table prefers for the most probable malicious class.
    """

    mean: np.ndarray  # [30] standardization of the raw features
    std: np.ndarray  # [30]
    weights: np.ndarray  # [31, 4]; the last row is the bias
    threshold: float
    class_actions: np.ndarray  # int64 [4]: the response for each class (benign: ignore)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """P(class | row), float64 [N, 4]."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return _softmax(z @ self.weights[:-1] + self.weights[-1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        p = self.probabilities(features)
        return _threshold_actions(p, self.class_actions, self.threshold)


def _threshold_actions(p: np.ndarray, class_actions: np.ndarray, threshold: float) -> np.ndarray:
    matched = class_actions[1 + p[:, 1:].argmax(axis=1)]
    return np.where(1.0 - p[:, 0] > threshold, matched, int(Action.IGNORE)).astype(np.int64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e: np.ndarray = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def fit_logistic_baseline(
    episodes: Sequence[EpisodeData],
    rewards: RewardTable,
    seed: int,
    *,
    l2: float = 1e-3,
    max_rows: int = 200_000,
    threshold_grid: int = 101,
) -> LogisticBaseline:
    """Fit the per-step classifier on every row of `episodes` (labelled with its episode's class) and
    tune its threshold on the same episodes: the grid point (quantiles of P(malicious)) of the best
    mean return. `seed` picks the rows when there are more than `max_rows`."""
    batch = EpisodeBatch.of(episodes)
    labels = severity_class(batch.malicious, batch.severity)[batch.group]
    x = batch.features.astype(np.float64)
    rows = np.arange(batch.rows)
    if batch.rows > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(batch.rows, size=max_rows, replace=False))
    mean = x[rows].mean(axis=0)
    std = x[rows].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features carry no information; keep them at 0
    weights = _fit_softmax_regression((x[rows] - mean) / std, labels[rows], len(CLASS_NAMES), l2)
    class_actions = np.array(
        [int(Action.IGNORE), *(rewards.best_action(True, s) for s in _CLASS_SEVERITY)], dtype=np.int64
    )
    untuned = LogisticBaseline(mean, std, weights, 1.0, class_actions)
    probabilities = untuned.probabilities(batch.features)
    threshold = _tune_threshold(probabilities, class_actions, batch, rewards, threshold_grid)
    return LogisticBaseline(mean, std, weights, threshold, class_actions)


def _tune_threshold(
    p: np.ndarray, class_actions: np.ndarray, batch: EpisodeBatch, rewards: RewardTable, grid: int
) -> float:
    # Candidates: quantiles of P(malicious) over the rows, plus 1.0 (never respond). Ties go to the
    # lowest threshold, so the choice is deterministic.
    candidates = np.unique(np.append(np.quantile(1.0 - p[:, 0], np.linspace(0.0, 1.0, grid)), 1.0))
    scores = [
        replay(_threshold_actions(p, class_actions, t), batch, rewards).returns.mean() for t in candidates
    ]
    return float(candidates[int(np.argmax(scores))])


_BIAS_L2 = 1e-6  # a touch on the biases keeps the Hessian positive definite when a class is absent


def _fit_softmax_regression(
    x: np.ndarray, y: np.ndarray, classes: int, l2: float, *, max_iter: int = 50, tol: float = 1e-7
) -> np.ndarray:
    """Weights [d+1, classes] (bias last) minimizing mean cross-entropy + l2/2·|W|², by damped Newton.

    Newton on this strictly convex objective converges in a few dozen steps, deterministically; the
    backtracking line search keeps early steps on (nearly) separable data from overshooting.
    """
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(classes)[y]
    reg = np.full((d + 1, 1), l2)
    reg[-1] = _BIAS_L2

    def objective(w: np.ndarray) -> float:
        z = xb @ w
        top = z.max(axis=1)
        log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        return float((log_norm - z[np.arange(n), y]).mean() + 0.5 * (reg * w**2).sum())

    w = np.zeros((d + 1, classes))
    value = objective(w)
    for _ in range(max_iter):
        p = _softmax(xb @ w)
        grad = xb.T @ (p - onehot) / n + reg * w
        if np.abs(grad).max() < tol:
            break
        hessian = np.empty((d + 1, classes, d + 1, classes))
        for a in range(classes):
            for b in range(a, classes):
                coef = p[:, a] * (float(a == b) - p[:, b])
                block = (xb * coef[:, None]).T @ xb / n
                hessian[:, a, :, b] = block
                hessian[:, b, :, a] = block
        h = hessian.reshape((d + 1) * classes, -1) + np.diag(np.repeat(reg[:, 0], classes))
        step = np.linalg.solve(h, grad.ravel()).reshape(d + 1, classes)
        slope = float(grad.ravel() @ step.ravel())
        t = 1.0
        while True:
            candidate = w - t * step
            new_value = objective(candidate)
            if new_value <= value - 1e-4 * t * slope or t < 1e-8:
                break
            t /= 2
        w, value = candidate, new_value
    return w
