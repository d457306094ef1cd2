"""The publish gate's statistics: the incomplete beta and Clopper-Pearson against known values, the
bootstrap bound's coverage by simulation, and the gate's verdicts on episode sets whose truth is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from streamdqn.snapshots.gate import GateVerdict, LoggedDecisions, PublishGate
from streamdqn.snapshots.stats import (
    beta_quantile,
    bootstrap_mean_bound,
    bootstrap_mean_interval,
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    regularized_incomplete_beta,
    weighted_importance_sampling,
)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize(("k", "n", "p"), [(1, 1, 0.3), (3, 10, 0.25), (7, 10, 0.5), (15, 40, 0.3),
                                           (40, 50, 0.9), (2, 200, 0.004), (100, 200, 0.51)])
def test_incomplete_beta_is_the_binomial_tail(k: int, n: int, p: float) -> None:
    # I_p(k, n - k + 1) = P(Binomial(n, p) >= k): an identity, so an exact reference.
    assert regularized_incomplete_beta(p, k, n - k + 1) == pytest.approx(binomial_tail(k, n, p), rel=1e-10,
                                                                         abs=1e-14)


def test_incomplete_beta_closed_forms_and_symmetry() -> None:
    for x in (1e-6, 0.1, 0.37, 0.5, 0.93):
        assert regularized_incomplete_beta(x, 1, 1) == pytest.approx(x)
        assert regularized_incomplete_beta(x, 3.5, 1) == pytest.approx(x**3.5)
        assert regularized_incomplete_beta(x, 1, 2.25) == pytest.approx(1 - (1 - x) ** 2.25)
        assert regularized_incomplete_beta(x, 2.5, 7.1) == pytest.approx(
            1 - regularized_incomplete_beta(1 - x, 7.1, 2.5), abs=1e-13)
    for a in (0.5, 2.0, 30.0, 5000.0):
        # The error grows with lgamma(a)'s magnitude (its last bits): 4e-12 at a = 5000.
        assert regularized_incomplete_beta(0.5, a, a) == pytest.approx(0.5, abs=1e-10)
    # I_x(1/2, 1/2) = (2/pi) asin(sqrt(x)), the arcsine distribution.
    arcsine = 2 / math.pi * math.asin(math.sqrt(0.2))
    assert regularized_incomplete_beta(0.2, 0.5, 0.5) == pytest.approx(arcsine)
    assert regularized_incomplete_beta(0.0, 2, 3) == 0.0
    assert regularized_incomplete_beta(1.0, 2, 3) == 1.0
    with pytest.raises(ValueError, match="positive"):
        regularized_incomplete_beta(0.5, 0, 1)


def test_beta_quantile_inverts_the_cdf() -> None:
    for a, b in ((1, 1), (2, 9), (0.5, 0.5), (40, 3), (1, 300)):
        for q in (0.001, 0.05, 0.5, 0.975):
            x = beta_quantile(q, a, b)
            assert regularized_incomplete_beta(x, a, b) == pytest.approx(q, abs=1e-10)


# Two-sided 95 % exact (Clopper-Pearson) intervals as printed, to 4 decimals, in tables of exact
# binomial confidence limits; the scipy test below checks many more values to 1e-10.
TEXTBOOK = [
    (0, 10, 0.0, 0.3085),
    (1, 10, 0.0025, 0.4450),
    (5, 10, 0.1871, 0.8129),
    (0, 20, 0.0, 0.1684),
    (3, 20, 0.0321, 0.3789),
    (10, 100, 0.0490, 0.1762),
]


@pytest.mark.parametrize(("x", "n", "lower", "upper"), TEXTBOOK)
def test_clopper_pearson_matches_the_tables(x: int, n: int, lower: float, upper: float) -> None:
    lo, hi = clopper_pearson_interval(x, n, 0.95)
    assert (round(lo, 4), round(hi, 4)) == (lower, upper)


def test_clopper_pearson_one_sided_closed_forms() -> None:
    for n in (1, 7, 50, 1000):
        # No successes: P(X = 0) = (1 - p)^n = alpha solves it exactly (the "rule of three" for 95 %).
        assert clopper_pearson_upper(0, n, 0.95) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
        assert clopper_pearson_lower(n, n, 0.95) == pytest.approx(0.05 ** (1 / n), rel=1e-9)
        assert clopper_pearson_upper(n, n, 0.95) == 1.0
        assert clopper_pearson_lower(0, n, 0.95) == 0.0
    assert clopper_pearson_upper(0, 0, 0.95) == 1.0  # no trials: nothing is known
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_upper(5, 4, 0.95)


def test_clopper_pearson_agrees_with_scipy_where_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    for x, n in ((0, 5), (3, 17), (12, 40), (199, 200), (37, 1000)):
        for c in (0.8, 0.95, 0.99):
            assert clopper_pearson_upper(x, n, c) == pytest.approx(
                1.0 if x == n else stats.beta.ppf(c, x + 1, n - x), abs=1e-10)


def test_clopper_pearson_coverage_is_at_least_nominal() -> None:
    # Exact: for each p, sum the binomial probabilities of the x whose bound covers p.
    worst = 1.0
    n = 40
    upper = [clopper_pearson_upper(x, n, 0.95) for x in range(n + 1)]  # the bound of each outcome x
    for p in np.linspace(0.01, 0.99, 99):
        covered = sum(math.comb(n, x) * p**x * (1 - p) ** (n - x) for x in range(n + 1) if upper[x] >= p)
        worst = min(worst, covered)
    assert worst >= 0.95


# --- the bootstrap -------------------------------------------------------------------------------------

SIMULATED_DATASETS = 1000


def coverage(draw: str, n: int, seed: int) -> tuple[float, float]:
    """(one-sided lower bound, two-sided interval) coverage of the true mean 0 over simulated datasets."""
    rng = np.random.default_rng(seed)
    support = np.array([-1.0, 0.0, 0.0, 0.0, 0.5, 2.0])  # paired return differences: mostly ties
    lower_hits = interval_hits = 0
    for _ in range(SIMULATED_DATASETS):
        x = rng.exponential(1.0, n) - 1.0 if draw == "skewed" else rng.choice(support, n) - support.mean()
        lower_hits += bootstrap_mean_bound(x, 0.95, "lower", resamples=1000, rng=rng) <= 0.0
        lo, hi = bootstrap_mean_interval(x, 0.95, resamples=1000, rng=rng)
        interval_hits += lo <= 0.0 <= hi
    return lower_hits / SIMULATED_DATASETS, interval_hits / SIMULATED_DATASETS


@pytest.mark.parametrize(("draw", "n"), [("skewed", 60), ("skewed", 150), ("discrete", 100)])
def test_bootstrap_bound_covers_the_true_mean_at_the_nominal_rate(draw: str, n: int) -> None:
    one_sided, two_sided = coverage(draw, n, seed=0)
    print(f"{draw} n={n}: one-sided 95 % lower bound coverage {one_sided:.3f}, "
          f"two-sided 95 % interval {two_sided:.3f} over {SIMULATED_DATASETS} datasets")
    # At least nominal (within simulation noise), and not vacuously wide.
    assert 0.93 <= one_sided <= 0.985
    assert 0.93 <= two_sided <= 0.985


def test_bootstrap_bound_edge_cases() -> None:
    rng = np.random.default_rng(0)
    # No spread: the mean itself.
    assert bootstrap_mean_bound([0.3] * 10, 0.95, "lower", rng=rng) == pytest.approx(0.3, abs=1e-15)
    x = rng.normal(1.0, 1.0, 200)
    lower = bootstrap_mean_bound(x, 0.95, "lower", rng=np.random.default_rng(1))
    upper = bootstrap_mean_bound(x, 0.95, "upper", rng=np.random.default_rng(1))
    assert lower < x.mean() < upper
    # Close to the normal-theory bound for normal data.
    assert lower == pytest.approx(x.mean() - 1.645 * x.std(ddof=1) / math.sqrt(200), abs=0.03)
    # Reproducible from the seed.
    assert lower == bootstrap_mean_bound(x, 0.95, "lower", rng=np.random.default_rng(1))
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_mean_bound([1.0], 0.95, "lower", rng=rng)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_bound([1.0, math.nan], 0.95, "lower", rng=rng)


# --- the gate ------------------------------------------------------------------------------------------

GATE = PublishGate(min_episodes=50, return_tolerance=0.05, max_false_positive_rate=0.2, max_missed_rate=0.5,
                   resamples=1000)


def judge(candidate: np.ndarray, current: np.ndarray | None, *, seed: int = 0,
          logged: LoggedDecisions | None = None) -> GateVerdict:
    """The gate with rates well inside their limits (3 of 120 false positives, 10 of 80 missed)."""
    return GATE.judge_policies(candidate, current, candidate_false_positives=3, benign_episodes=120,
                               candidate_missed=10, malicious_episodes=80, seed=seed, logged=logged)


def held_out(seed: int, n: int = 200) -> np.ndarray:
    """The current policy's returns on n held-out episodes: mixed outcomes, skewed."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, -0.2, 0.1, 0.1, 0.3, 1.0], n) + rng.normal(0, 0.05, n)


def test_an_identical_candidate_passes_and_the_verdict_is_json() -> None:
    current = held_out(0)
    verdict = judge(current.copy(), current, seed=3)
    assert verdict.passed, verdict.reason
    assert verdict.reason.startswith("passed: ")
    assert verdict.return_difference is not None
    assert verdict.return_difference.bound == 0.0
    assert verdict.false_positive is not None
    assert verdict.false_positive.estimate == pytest.approx(3 / 120)
    assert verdict.false_positive.bound == pytest.approx(clopper_pearson_upper(3, 120, 0.95))
    as_json = json.loads(json.dumps(verdict.as_dict(), allow_nan=False))
    assert as_json["return_difference"]["method"] == "paired BCa bootstrap"
    assert as_json["passed"] is True


def test_worse_only_by_noise_passes_and_truly_worse_is_refused() -> None:
    seeds = range(40)
    noisy_passes = truly_worse_refusals = 0
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        current = held_out(seed)
        # In truth no worse: the same returns plus zero-mean per-episode noise.
        noisy = current + rng.normal(0.0, 0.2, len(current))
        noisy_passes += judge(noisy, current, seed=seed).passed
        # In truth worse by 0.2 a episode, 4x the tolerance.
        worse = current - 0.2 + rng.normal(0.0, 0.2, len(current))
        verdict = judge(worse, current, seed=seed)
        truly_worse_refusals += not verdict.passed
        if not verdict.passed:
            assert "return difference" in verdict.reason
            assert "false-positive" not in verdict.reason
    assert noisy_passes >= 36, noisy_passes  # a 95 % one-sided bound: ~2 of 40 refused by chance
    assert truly_worse_refusals == len(seeds)


def test_rate_bounds_refuse_what_point_estimates_would_let_through() -> None:
    current = held_out(1)
    # 2 of 12 benign is 0.167, under the 0.2 limit, but its 95 % upper bound is 0.44.
    verdict = GATE.judge_policies(current, current, candidate_false_positives=2, benign_episodes=12,
                                  candidate_missed=10, malicious_episodes=188)
    assert not verdict.passed
    assert "false-positive rate: upper bound +0.4" in verdict.reason
    assert "missed" not in verdict.reason
    verdict = GATE.judge_policies(current, current, candidate_false_positives=0, benign_episodes=100,
                                  candidate_missed=45, malicious_episodes=100)
    assert not verdict.passed
    assert "missed rate" in verdict.reason
    # No benign episode at all: the rate is unknown, and unknown is not safe.
    verdict = GATE.judge_policies(current, current, candidate_false_positives=0, benign_episodes=0,
                                  candidate_missed=10, malicious_episodes=200)
    assert not verdict.passed
    assert "0 of 0 benign" in verdict.reason


def test_first_publish_has_no_return_comparison_and_too_few_episodes_refuse() -> None:
    verdict = judge(held_out(2), None)
    assert verdict.passed
    assert verdict.return_difference is None
    small = judge(held_out(2, n=20), None)
    assert not small.passed
    assert "only 20 held-out episodes" in small.reason
    with pytest.raises(ValueError, match="same held-out episodes"):
        judge(held_out(2), held_out(3, n=150))


def test_weighted_importance_sampling_recovers_a_known_value() -> None:
    rng = np.random.default_rng(7)
    n, actions = 4000, 5
    # Logging policy: action 0 with probability 0.6, the others 0.1 each.
    probs = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    logged = rng.choice(actions, n, p=probs)
    mean_reward = np.array([0.0, 0.2, 0.9, 0.4, 0.1])
    rewards = rng.binomial(1, mean_reward[logged]).astype(float)
    candidate = np.full(n, 2)  # always action 2: its true value is 0.9
    est = weighted_importance_sampling(logged, probs[logged], rewards, candidate, confidence=0.95, rng=rng)
    assert est.value == pytest.approx(0.9, abs=0.05)
    assert est.lower is not None
    assert est.value is not None
    assert est.lower < est.value
    assert est.lower > 0.8
    assert est.matched == int(np.sum(logged == 2))
    assert est.effective_sample_size == pytest.approx(est.matched)  # equal weights
    never = weighted_importance_sampling(logged, probs[logged], rewards, np.full(n, 9), confidence=0.95,
                                         rng=rng)
    assert never.value is None
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        weighted_importance_sampling([0], [0.0], [1.0], [0], confidence=0.95, rng=rng)
    # In the gate: recorded, never refusing.
    current = held_out(4)
    verdict = judge(current, current, logged=LoggedDecisions(logged, probs[logged], rewards, candidate))
    assert verdict.passed
    assert verdict.off_policy is not None
    assert verdict.off_policy.estimate == pytest.approx(est.value)
    assert verdict.off_policy.limit is None
