"""The publish gate: when a candidate snapshot may replace the one sandboxes run."""

from __future__ import annotations

from dataclasses import dataclass

from streamdqn.stream.scoring import Metrics


@dataclass(frozen=True)
class PublishGate:
    """When a candidate snapshot may replace `latest` (a data-poisoning guard).

    Evaluated on held-out recent episodes: the candidate's mean return must not be worse than the
    current latest's by more than `return_tolerance`, and it must stay within asymmetric-cost limits
    on benign false positives and missed malicious episodes.
    """

    min_episodes: int = 50
    return_tolerance: float = 0.05
    max_false_positive_rate: float = 0.2
    max_missed_rate: float = 0.5

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
