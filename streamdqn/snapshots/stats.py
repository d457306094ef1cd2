"""The publish gate's statistics, numpy and the standard library only (no scipy).

    regularized_incomplete_beta(x, a, b)   I_x(a, b), by its continued fraction (modified Lentz)
    beta_quantile(q, a, b)                 the inverse, by bisection (I_x is increasing in x)
    clopper_pearson_upper/lower/interval   exact binomial bounds from beta quantiles
    bootstrap_mean_bound                   BCa bound on a mean (paired: pass the differences)
    weighted_importance_sampling           a policy's value from logged (action, probability, reward)

BCa rather than the percentile bootstrap: held-out returns are skewed (a few terminated malicious
episodes carry large rewards), and BCa corrects the percentile interval for bias and skewness
(Efron 1987), which is what keeps the coverage of a one-sided bound near its nominal level on
small, skewed samples. The coverage is measured in tests/unit/test_gate_stats.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Side = Literal["lower", "upper"]
_NORMAL = NormalDist()
_TINY = 1e-300
_CF_EPSILON = 1e-15
_CF_MAX_TERMS = 100_000
_RESAMPLE_CELLS = 2_000_000  # resample indices drawn per chunk: bounds memory whatever n is


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (Abramowitz & Stegun 26.5.8), evaluated by modified Lentz.

    Converges fast for x < (a + 1) / (a + b + 2); the caller uses the symmetry otherwise.
    """

    def nonzero(v: float) -> float:
        return v if abs(v) > _TINY else _TINY

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, _CF_MAX_TERMS):
        # Even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / nonzero(1.0 + num * d)
        c = nonzero(1.0 + num / c)
        h *= d * c
        # Odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / nonzero(1.0 + num * d)
        c = nonzero(1.0 + num / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < _CF_EPSILON:
            return h
    raise ArithmeticError(f"the incomplete beta continued fraction did not converge for x={x}, a={a}, b={b}")


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b), the CDF of Beta(a, b) at x."""
    if a <= 0 or b <= 0:
        raise ValueError(f"the beta parameters must be positive, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # x^a (1-x)^b / B(a, b), in logs: the powers under- or overflow for large a, b.
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(x, a, b) / a
    return 1.0 - front * _beta_continued_fraction(1.0 - x, b, a) / b


def beta_quantile(q: float, a: float, b: float, *, tolerance: float = 1e-14) -> float:
    """The x with I_x(a, b) = q, by bisection on [0, 1]."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile's probability is in [0, 1], got {q}")
    lo, hi = 0.0, 1.0
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if regularized_incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _check_counts(successes: int, trials: int, confidence: float) -> None:
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence is in (0, 1), got {confidence}")


def clopper_pearson_upper(successes: int, trials: int, confidence: float) -> float:
    """One-sided upper bound on a binomial rate: P(rate <= bound) >= confidence. 1.0 with no trials."""
    _check_counts(successes, trials, confidence)
    if successes == trials:
        return 1.0
    return beta_quantile(confidence, successes + 1, trials - successes)


def clopper_pearson_lower(successes: int, trials: int, confidence: float) -> float:
    """One-sided lower bound on a binomial rate. 0.0 with no successes."""
    _check_counts(successes, trials, confidence)
    if successes == 0:
        return 0.0
    return beta_quantile(1.0 - confidence, successes, trials - successes + 1)


def clopper_pearson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The two-sided exact interval of the textbooks: each side at (1 + confidence) / 2."""
    one_sided = (1.0 + confidence) / 2.0
    return (clopper_pearson_lower(successes, trials, one_sided),
            clopper_pearson_upper(successes, trials, one_sided))


def _resampled_means(values: NDArray[np.float64], resamples: int,
                     rng: np.random.Generator) -> NDArray[np.float64]:
    n = len(values)
    out = np.empty(resamples)
    chunk = max(1, _RESAMPLE_CELLS // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def bca_quantile(estimate: float, boot: NDArray[np.float64], jackknife: NDArray[np.float64],
                 level: float) -> float:
    """The BCa bootstrap quantile at `level`, given the bootstrap replicates and leave-one-out values.

    z0 (bias) from the share of replicates below the estimate, the acceleration from the jackknife's
    skewness; level' = Phi(z0 + (z0 + z) / (1 - a (z0 + z))) with z = Phi^-1(level).
    """
    b = len(boot)
    below = (np.count_nonzero(boot < estimate) + 0.5 * np.count_nonzero(boot == estimate)) / b
    z0 = _NORMAL.inv_cdf(min(max(below, 0.5 / b), 1.0 - 0.5 / b))
    spread = jackknife.mean() - jackknife
    denominator = 6.0 * float(np.sum(spread**2)) ** 1.5
    accel = float(np.sum(spread**3)) / denominator if denominator > 0 else 0.0
    z = _NORMAL.inv_cdf(level)
    shifted = z0 + (z0 + z) / (1.0 - accel * (z0 + z))
    return float(np.quantile(boot, _NORMAL.cdf(shifted)))


def _bootstrap_setup(values: ArrayLike, confidence: float) -> NDArray[np.float64]:
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) < 2:
        raise ValueError(f"a bootstrap needs at least 2 values, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the values must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence is in (0, 1), got {confidence}")
    return x


def bootstrap_mean_bound(values: ArrayLike, confidence: float, side: Side, *, resamples: int = 2000,
                         rng: np.random.Generator) -> float:
    """One-sided BCa bound on the mean of `values`: P(mean >= lower) ~ confidence (or <= upper).

    For a paired comparison pass the per-episode differences: resampling them resamples episodes.
    """
    return bootstrap_mean_interval(values, confidence, resamples=resamples, rng=rng,
                                   levels=((1.0 - confidence) if side == "lower" else confidence,))[0]


def bootstrap_mean_interval(values: ArrayLike, confidence: float, *, resamples: int = 2000,
                            rng: np.random.Generator,
                            levels: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """BCa quantiles of the mean at `levels` (default: the two-sided interval at `confidence`)."""
    x = _bootstrap_setup(values, confidence)
    wanted = levels if levels is not None else ((1.0 - confidence) / 2, (1.0 + confidence) / 2)
    estimate = float(x.mean())
    if np.ptp(x) == 0.0:  # every value the same: every resample too
        return tuple(estimate for _ in wanted)
    boot = _resampled_means(x, resamples, rng)
    jackknife = (x.sum() - x) / (len(x) - 1)
    return tuple(bca_quantile(estimate, boot, jackknife, level) for level in wanted)


@dataclass(frozen=True)
class OffPolicyEstimate:
    """Weighted importance sampling: a policy's mean reward per decision, from another policy's log."""

    value: float | None  # None when the policy never agrees with a logged action
    lower: float | None  # one-sided BCa lower bound at the confidence asked for
    matched: int  # logged decisions where the evaluated policy takes the logged action
    decisions: int
    effective_sample_size: float


def weighted_importance_sampling(
    logged_actions: ArrayLike, logged_probabilities: ArrayLike, rewards: ArrayLike, policy_actions: ArrayLike,
    *, confidence: float, resamples: int = 2000, rng: np.random.Generator,
) -> OffPolicyEstimate:
    """V = sum(w r) / sum(w), w = 1[policy action = logged action] / logged probability.

    A deterministic evaluated policy; the logging policy's probability of the action it took must be in
    (0, 1]. Self-normalized, so biased but bounded by the observed rewards, and far less variable than
    plain importance sampling when some logged probabilities are small.
    """
    actions = np.asarray(logged_actions).ravel()
    p = np.asarray(logged_probabilities, dtype=np.float64).ravel()
    r = np.asarray(rewards, dtype=np.float64).ravel()
    chosen = np.asarray(policy_actions).ravel()
    if not len(actions) == len(p) == len(r) == len(chosen):
        raise ValueError("logged actions, probabilities, rewards and policy actions differ in length")
    if not np.all((p > 0) & (p <= 1)) or not np.all(np.isfinite(r)):
        raise ValueError("logged probabilities must be in (0, 1] and rewards finite")
    w = (actions == chosen) / p
    total = float(w.sum())
    matched = int(np.count_nonzero(w))
    if matched == 0:
        return OffPolicyEstimate(None, None, 0, len(w), 0.0)
    value = float((w * r).sum() / total)
    ess = total**2 / float((w**2).sum())
    if matched < 2:
        return OffPolicyEstimate(value, None, matched, len(w), ess)
    boot = _resampled_ratio(w, w * r, resamples, rng)
    # Leave-one-out values of the ratio, for the acceleration (a decision with w = 0 leaves it as is).
    jackknife = np.where(w > 0, ((w * r).sum() - w * r) / np.maximum(total - w, _TINY), value)
    jackknife = np.where(total - w > 0, jackknife, value)
    if len(boot) == 0:  # every resample missed every matched decision (a tiny log)
        return OffPolicyEstimate(value, None, matched, len(w), ess)
    lower = bca_quantile(value, boot, jackknife, 1.0 - confidence) if np.ptp(boot) > 0 else value
    return OffPolicyEstimate(value, lower, matched, len(w), ess)


def _resampled_ratio(w: NDArray[np.float64], wr: NDArray[np.float64], resamples: int,
                     rng: np.random.Generator) -> NDArray[np.float64]:
    n = len(w)
    out = np.empty(resamples)
    chunk = max(1, _RESAMPLE_CELLS // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        weights = w[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:stop] = wr[idx].sum(axis=1) / weights
    return out[np.isfinite(out)]
