"""What deployed policies did: outcomes of labelled episodes per `policy_version`.

An episode's outcome comes from the first response its events logged (a shadow decision counts: it is
what the policy decided) and its label:

    detected         malicious, contained / terminated / quarantined
    review           sent to review (malicious or benign)
    missed           malicious, no response
    false_positive   benign, contained / terminated / quarantined
    benign_let_run   benign, no response

With the return of what the sandbox did, per version, these are the evidence the rollout judges a
canary by (streamdqn.daemon.rollout) and what `streamdqn_policy_episodes_total{version,outcome}` shows.
Episodes without a policy_version are not counted here.
"""

from __future__ import annotations

import msgspec

from streamdqn.stream.wire import Action

OUTCOMES = ("detected", "review", "missed", "false_positive", "benign_let_run")


def outcome_of(first_response: int, malicious: bool) -> str:
    """first_response: the first logged non-ignore action (-1: none)."""
    if first_response == Action.REVIEW:
        return "review"
    if first_response >= 1:
        return "detected" if malicious else "false_positive"
    return "missed" if malicious else "benign_let_run"


class VersionOutcomes(msgspec.Struct):
    """One version's labelled episodes: outcome counts and the sums for a mean return and its spread."""

    counts: dict[str, int] = msgspec.field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    returns_sum: float = 0.0
    returns_sq: float = 0.0
    # Reviews are not split by label in the counts; the false-positive rate's denominator needs the
    # benign ones.
    benign_reviews: int = 0

    @property
    def episodes(self) -> int:
        return sum(self.counts.values())

    @property
    def benign(self) -> int:
        return self.counts["false_positive"] + self.counts["benign_let_run"] + self.benign_reviews

    def mean_return(self) -> float | None:
        n = self.episodes
        return self.returns_sum / n if n else None

    def return_variance(self) -> float | None:
        n = self.episodes
        if n < 2:
            return None
        mean = self.returns_sum / n
        return max(0.0, (self.returns_sq - n * mean * mean) / (n - 1))


class PolicyOutcomes(msgspec.Struct):
    """Outcomes of every deployed version seen (checkpointed with the pipeline's state)."""

    versions: dict[str, VersionOutcomes] = msgspec.field(default_factory=dict)

    def observe(
        self, version: str | None, first_response: int, malicious: bool, logged_return: float
    ) -> None:
        if version is None:
            return
        stats = self.versions.setdefault(version, VersionOutcomes())
        stats.counts[outcome_of(first_response, malicious)] += 1
        if first_response == Action.REVIEW and not malicious:
            stats.benign_reviews += 1
        stats.returns_sum += logged_return
        stats.returns_sq += logged_return * logged_return

    def of(self, version: int | str | None) -> VersionOutcomes:
        """A version's outcomes (empty when none was seen)."""
        if version is None:
            return VersionOutcomes()
        return self.versions.get(str(version), VersionOutcomes())
