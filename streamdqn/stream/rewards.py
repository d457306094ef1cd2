"""The reward table: what each of the five actions earns given the ground truth. The one place rewards
are defined; vectorized, numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamdqn.stream.wire import Action


@dataclass(frozen=True)
class RewardTable:
    """Rewards by action and ground truth; severity s splits malicious responses into thirds."""

    ignore_step_malicious_per_severity: float = -0.1
    ignore_step_benign: float = 0.0
    missed_malicious_base: float = -0.5
    missed_malicious_per_severity: float = -1.0
    benign_let_run: float = 0.5
    # Rewards for a malicious sample by severity third (low s<1/3, mid, high s>=2/3).
    contain_malicious: tuple[float, float, float] = (1.0, 0.6, 0.3)
    terminate_malicious: tuple[float, float, float] = (0.7, 1.0, 0.7)
    quarantine_malicious: tuple[float, float, float] = (0.7, 0.7, 1.0)
    review_malicious: tuple[float, float, float] = (0.4, 0.4, 0.4)
    contain_benign: float = -0.5
    terminate_benign: float = -1.0
    quarantine_benign: float = -1.0
    review_benign: float = -0.2

    def rewards(
        self, actions: np.ndarray, malicious: np.ndarray, severity: np.ndarray, final: np.ndarray
    ) -> np.ndarray:
        """Vectorized reward of taking `actions` at steps with this ground truth (`final`: last step)."""
        actions = np.asarray(actions, dtype=np.int64)
        malicious = np.asarray(malicious, dtype=bool)
        s = np.asarray(severity, dtype=np.float64)
        third = np.clip((s * 3).astype(np.int64), 0, 2)
        responses = np.array(
            [
                (0.0, 0.0, 0.0),
                self.contain_malicious,
                self.terminate_malicious,
                self.quarantine_malicious,
                self.review_malicious,
            ]
        )
        benign_responses = np.array(
            [0.0, self.contain_benign, self.terminate_benign, self.quarantine_benign, self.review_benign]
        )
        ignore_mal = np.where(
            final,
            self.missed_malicious_base + self.missed_malicious_per_severity * s,
            self.ignore_step_malicious_per_severity * s,
        )
        ignore_ben = np.where(final, self.benign_let_run, self.ignore_step_benign)
        mal = np.where(actions == Action.IGNORE, ignore_mal, responses[actions, third])
        ben = np.where(actions == Action.IGNORE, ignore_ben, benign_responses[actions])
        return np.where(malicious, mal, ben)

    def best_action(self, malicious: bool, severity: float) -> int:
        """The oracle's response: ignore benign samples, else the severity-matched action."""
        if not malicious:
            return int(Action.IGNORE)
        values = [self.rewards(np.array([a]), np.array([True]), np.array([severity]), np.array([False]))[0]
                  for a in range(1, len(Action))]
        return 1 + int(np.argmax(values))

    def as_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
