"""The publish gate: when a candidate snapshot may replace the one sandboxes run.

    PublishGate.check            point estimates (the daemon's gate until it calls judge_policies)
    PublishGate.judge_policies   bounds: a paired BCa bootstrap on the return difference,
                                 Clopper-Pearson on the false-positive and missed rates, and
                                 (informational) weighted importance sampling from logged decisions

A refusal names every bound that failed, with its value, its limit and what it was computed from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from streamdqn.snapshots.stats import (
    Side,
    bootstrap_mean_bound,
    clopper_pearson_upper,
    weighted_importance_sampling,
)
from streamdqn.stream.scoring import Metrics


class LoggedDecisions(NamedTuple):
    """Decisions a deployed policy took with known probability, and what the candidate would take."""

    actions: ArrayLike
    probabilities: ArrayLike  # the deployed policy's probability of the action it took
    rewards: ArrayLike
    candidate_actions: ArrayLike


@dataclass(frozen=True)
class Bound:
    """One one-sided bound at the verdict's confidence, and whether it met its limit."""

    name: str
    estimate: float | None
    bound: float | None
    side: Side  # lower: the true value is at least `bound`; upper: at most
    limit: float | None  # None: informational, never refuses
    passed: bool
    method: str
    basis: str  # what it was computed from, for the reason line

    def describe(self) -> str:
        shown = "n/a" if self.bound is None else f"{self.bound:+.4f}"
        relation = {"lower": ">=", "upper": "<="}[self.side]
        limit = "" if self.limit is None else f" {relation if self.passed else 'fails'} {self.limit:+.4f}"
        return f"{self.name}: {self.side} bound {shown}{limit} ({self.method}, {self.basis})"


@dataclass(frozen=True)
class GateVerdict:
    """What judge_policies decided, and on what evidence."""

    passed: bool
    reason: str
    confidence: float
    episodes: int
    return_difference: Bound | None  # None when there is no current policy to compare with
    false_positive: Bound | None
    missed: Bound | None
    off_policy: Bound | None
    seed: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the manifest's `evaluation` section)."""
        return asdict(self)


@dataclass(frozen=True)
class PublishGate:
    """When a candidate snapshot may replace `stable` (a data-poisoning guard).

    Evaluated on held-out recent episodes: the candidate's mean return must not be worse than the
    current stable's by more than `return_tolerance`, and it must stay within asymmetric-cost limits
    on benign false positives and missed malicious episodes. `check` compares point estimates;
    `judge_policies` compares confidence bounds.
    """

    min_episodes: int = 50
    return_tolerance: float = 0.05
    max_false_positive_rate: float = 0.2
    max_missed_rate: float = 0.5
    resamples: int = 2000

    def check(self, candidate: Metrics, current: Metrics | None) -> tuple[bool, str]:
        """(publish?, why) for a candidate against the current latest (None: nothing published yet)."""
        fp = candidate.false_positive_rate or 0.0
        missed = candidate.missed_rate or 0.0
        if fp > self.max_false_positive_rate:
            return False, f"false-positive rate {fp:.3f} > {self.max_false_positive_rate}"
        if missed > self.max_missed_rate:
            return False, f"missed-malicious rate {missed:.3f} > {self.max_missed_rate}"
        if current is not None and candidate.mean_return < current.mean_return - self.return_tolerance:
            return False, (f"mean return {candidate.mean_return:+.3f} is worse than latest's "
                           f"{current.mean_return:+.3f} by more than {self.return_tolerance}")
        return True, "passed"

    def judge_policies(
        self,
        candidate_returns: ArrayLike,
        current_returns: ArrayLike | None,
        *,
        candidate_false_positives: int,
        benign_episodes: int,
        candidate_missed: int,
        malicious_episodes: int,
        logged: LoggedDecisions | None = None,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> GateVerdict:
        """Judge a candidate on the same held-out episodes as the current policy, by bounds.

        `candidate_returns[i]` and `current_returns[i]` are both policies' returns on episode i (the
        pairing is what makes the bound tight: episode difficulty cancels). Passes when the BCa lower
        bound of mean(candidate - current) is >= -return_tolerance, and the Clopper-Pearson upper
        bounds of the candidate's false-positive rate (of `benign_episodes`) and missed rate (of
        `malicious_episodes`) are <= their limits. With no benign (or malicious) episode the rate is
        unknown and its bound is 1.0: the gate refuses rather than guesses. Fewer than `min_episodes`
        held-out episodes refuse too. `logged` adds a weighted-importance-sampling estimate of the
        candidate's reward per decision, recorded but never refusing.
        """
        candidate = np.asarray(candidate_returns, dtype=np.float64).ravel()
        rng = np.random.default_rng(seed)
        n = len(candidate)
        bounds = [
            self._return_bound(candidate, current_returns, confidence, rng),
            _rate_bound("false-positive rate", candidate_false_positives, benign_episodes, "benign",
                        self.max_false_positive_rate, confidence),
            _rate_bound("missed rate", candidate_missed, malicious_episodes, "malicious",
                        self.max_missed_rate, confidence),
            None if logged is None else _off_policy_bound(logged, confidence, self.resamples, rng),
        ]
        failed = [b.describe() for b in bounds if b is not None and not b.passed]
        if n < self.min_episodes:
            failed.insert(0, f"only {n} held-out episodes; the gate needs {self.min_episodes}")
        reason = ("refused: " + "; ".join(failed)) if failed else (
            "passed: " + "; ".join(b.describe() for b in bounds if b is not None))
        returns, fp, missed, off_policy = bounds
        return GateVerdict(not failed, reason, confidence, n, returns, fp, missed, off_policy, seed)

    def _return_bound(self, candidate: np.ndarray, current_returns: ArrayLike | None, confidence: float,
                      rng: np.random.Generator) -> Bound | None:
        if current_returns is None:
            return None
        current = np.asarray(current_returns, dtype=np.float64).ravel()
        if current.shape != candidate.shape:
            raise ValueError(f"paired returns differ in length: {len(candidate)} candidate, {len(current)} "
                             "current; both must be on the same held-out episodes")
        diff = candidate - current
        lower = bootstrap_mean_bound(diff, confidence, "lower", resamples=self.resamples, rng=rng) \
            if len(diff) >= 2 else None
        passed = lower is not None and lower >= -self.return_tolerance
        return Bound("return difference (candidate - current)", float(diff.mean()) if len(diff) else None,
                     lower, "lower", -self.return_tolerance, passed, "paired BCa bootstrap",
                     f"{len(diff)} episodes, {self.resamples} resamples")


def _rate_bound(name: str, count: int, total: int, of: str, limit: float, confidence: float) -> Bound:
    upper = clopper_pearson_upper(count, total, confidence)
    return Bound(name, count / total if total else None, upper, "upper", limit, upper <= limit,
                 "Clopper-Pearson", f"{count} of {total} {of} episodes")


def _off_policy_bound(logged: LoggedDecisions, confidence: float, resamples: int,
                      rng: np.random.Generator) -> Bound:
    est = weighted_importance_sampling(logged.actions, logged.probabilities, logged.rewards,
                                       logged.candidate_actions, confidence=confidence, resamples=resamples,
                                       rng=rng)
    return Bound("off-policy value per decision", est.value, est.lower, "lower", None, True,
                 "weighted importance sampling, BCa bootstrap",
                 f"{est.matched} of {est.decisions} logged decisions match, "
                 f"effective sample size {est.effective_sample_size:.1f}")
