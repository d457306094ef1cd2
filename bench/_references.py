"""Supervised stopping references: the strongest policies a user could build *with the labels*.

A reference is a per-row classifier trained on the training episodes with their labels, turned into a
stopping rule by the reward table. At each row it estimates P(malicious) = p and what each response
earns if the episode is malicious, r_mal(a); the expected reward of a response is

    E[r(a)] = p · r_mal(a) + (1 - p) · r_ben(a)

and the policy responds with argmax_a E[r(a)] at the first row where that best expected reward
exceeds a threshold, tuned (grid over quantiles, best mean return under `stream.scoring.replay`) on
the training episodes only. A reference is a `Policy` (feature rows -> actions), scored by the same
code as the baselines. The row features carry the running context of the episode so far
(stream/features.py), so a per-row classifier uses no future information.

Two classifiers, both early-stopped on a validation share of the training episodes (split by
episode, never by row, so rows of one episode are never on both sides):
- `hgb`: scikit-learn HistGradientBoostingClassifier for p and HistGradientBoostingRegressor for the
  severity ŝ (fit on malicious rows); r_mal(a) = r(a | malicious, ŝ);
- `mlp`: a 128-128 torch MLP over four classes (benign + the severity thirds); r_mal(a) is the
  reward of a at each third's centre, weighted by the class probabilities.

Why the threshold is tuned on *out-of-fold* predictions of the training episodes (cross-fitting):
on the rows it was fitted on, a flexible classifier is overconfident, so a threshold tuned there
responds too eagerly on new episodes. Each fold's rows are predicted by a model that never saw
them; the policy's own model is then fitted on all training episodes. `folds=0` tunes in-sample.

Imported as `_references` by bench scripts (their directory is first on sys.path) and by
tests/unit/test_references.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from streamdqn.offline.baselines import _CLASS_SEVERITY, severity_class
from streamdqn.offline.dataset import EpisodeData
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, replay
from streamdqn.stream.wire import Action

REFERENCE_NAMES = ("hgb", "mlp")
RESPONSE_ACTIONS = np.arange(1, len(Action), dtype=np.int64)  # contain, terminate, quarantine, review


class Belief(NamedTuple):
    """What a classifier believes about each row's episode."""

    p_malicious: np.ndarray  # float64 [R]
    malicious_rewards: np.ndarray  # float64 [R, 4]: reward of each response (RESPONSE_ACTIONS) if malicious


Estimator = Callable[[np.ndarray], Belief]
"""Feature rows float32 [R, 30] -> Belief."""


def malicious_response_rewards(rewards: RewardTable, severity: np.ndarray) -> np.ndarray:
    """[R, 4]: the reward of each response for a malicious episode of each row's severity."""
    s = np.clip(np.asarray(severity, dtype=np.float64), 0.0, 1.0)
    actions = np.broadcast_to(RESPONSE_ACTIONS, (len(s), len(RESPONSE_ACTIONS)))
    mal = np.ones(actions.shape, dtype=bool)
    final = np.zeros(actions.shape, dtype=bool)
    return rewards.rewards(actions, mal, np.broadcast_to(s[:, None], actions.shape), final)


def benign_response_rewards(rewards: RewardTable) -> np.ndarray:
    """[4]: the reward of each response for a benign episode."""
    n = len(RESPONSE_ACTIONS)
    return rewards.rewards(RESPONSE_ACTIONS, np.zeros(n, bool), np.zeros(n), np.zeros(n, bool))


def expected_rewards(belief: Belief, rewards: RewardTable) -> np.ndarray:
    """[R, 4]: E[r(a)] = p · r_mal(a) + (1 - p) · r_ben(a) for each response a."""
    p = np.clip(np.asarray(belief.p_malicious, dtype=np.float64), 0.0, 1.0)[:, None]
    out: np.ndarray = p * belief.malicious_rewards + (1.0 - p) * benign_response_rewards(rewards)[None, :]
    return out


def stopping_actions(expected: np.ndarray, threshold: float) -> np.ndarray:
    """Respond with the best expected-reward response where it exceeds `threshold`, else ignore."""
    best = expected.max(axis=1)
    chosen = RESPONSE_ACTIONS[expected.argmax(axis=1)]
    return np.where(best > threshold, chosen, int(Action.IGNORE)).astype(np.int64)


def tune_threshold(expected: np.ndarray, batch: EpisodeBatch, rewards: RewardTable, grid: int = 101) -> float:
    """The threshold of the best mean return on `batch` (whose rows `expected` scores).

    Candidates: quantiles of the rows' best expected reward, and one below them all (respond on every
    first row); the largest quantile never responds (the rule is strict). Ties go to the lowest.
    """
    best = expected.max(axis=1)
    candidates = np.unique(np.append(np.quantile(best, np.linspace(0.0, 1.0, grid)), best.min() - 1.0))
    scores = [replay(stopping_actions(expected, t), batch, rewards).returns.mean() for t in candidates]
    return float(candidates[int(np.argmax(scores))])


@dataclass(frozen=True)
class StoppingReference:
    """A supervised stopping rule as a Policy: feature rows float32 [R, 30] -> int64 actions [R]."""

    name: str
    estimate: Estimator
    threshold: float
    rewards: RewardTable

    def expected(self, features: np.ndarray) -> np.ndarray:
        return expected_rewards(self.estimate(np.asarray(features, dtype=np.float32)), self.rewards)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return stopping_actions(self.expected(features), self.threshold)


FitEstimator = Callable[[Sequence[EpisodeData], Sequence[EpisodeData], int], Estimator]
"""(learn episodes, validation episodes, seed) -> a fitted Estimator."""


def split_by_episode(
    episodes: Sequence[EpisodeData], fraction: float, seed: int
) -> tuple[list[EpisodeData], list[EpisodeData]]:
    """(rest, held) with about `fraction` of the episodes of each class held; both non-empty.

    Stratified by the malicious label, so a small validation share still holds both classes."""
    if len(episodes) < 2:
        raise ValueError(f"need at least 2 training episodes to hold some out, got {len(episodes)}")
    rng = np.random.default_rng(seed)
    malicious = np.array([e.malicious for e in episodes])
    held: list[int] = []
    for label in (False, True):
        members = rng.permutation(np.flatnonzero(malicious == label))
        if len(members) >= 2:
            held += members[: max(1, round(len(members) * fraction))].tolist()
    if not held:
        held = [int(rng.integers(len(episodes)))]
    mask = np.zeros(len(episodes), dtype=bool)
    mask[held] = True
    return [e for e, m in zip(episodes, mask, strict=True) if not m], [
        e for e, m in zip(episodes, mask, strict=True) if m
    ]


def fit_reference(
    name: str,
    fit_estimator: FitEstimator,
    episodes: Sequence[EpisodeData],
    rewards: RewardTable,
    seed: int,
    *,
    folds: int = 5,
    validation_fraction: float = 0.2,
) -> StoppingReference:
    """Fit a stopping reference on training `episodes` (with their labels) and nothing else.

    With `folds` >= 2 the threshold is tuned on out-of-fold predictions of every training episode
    (each fold's model is fitted on the others, early-stopped on a validation share of them); the
    returned policy's model is fitted on all episodes. `folds=0` tunes on the fitted rows.
    """
    _check_labels(episodes)
    batch = EpisodeBatch.of(episodes)
    if folds >= 2:
        if folds > len(episodes):
            raise ValueError(f"{folds} folds need at least {folds} training episodes, got {len(episodes)}")
        expected = np.empty((batch.rows, len(RESPONSE_ACTIONS)))
        fold_of = _stratified_folds(episodes, folds, seed)
        for k in range(folds):
            inside = fold_of == k
            others = [e for e, f in zip(episodes, fold_of, strict=True) if f != k]
            learn, held = split_by_episode(others, validation_fraction, seed + 1 + k)
            estimate = fit_estimator(learn, held, seed + 1 + k)
            rows = inside[batch.group]
            expected[rows] = expected_rewards(estimate(batch.features[rows]), rewards)
    learn, held = split_by_episode(episodes, validation_fraction, seed)
    estimate = fit_estimator(learn, held, seed)
    if folds < 2:
        expected = expected_rewards(estimate(batch.features), rewards)
    return StoppingReference(name, estimate, tune_threshold(expected, batch, rewards), rewards)


def _check_labels(episodes: Sequence[EpisodeData]) -> None:
    classes = {e.malicious for e in episodes}
    if len(classes) < 2:
        only = "malicious" if True in classes else "benign"
        raise ValueError(
            f"every training episode is {only}: a supervised reference needs both benign and malicious "
            f"episodes; pass a training file that holds both"
        )


def _stratified_folds(episodes: Sequence[EpisodeData], folds: int, seed: int) -> np.ndarray:
    """int64 [E]: a fold index per episode, each class dealt round-robin in a random order."""
    rng = np.random.default_rng(seed)
    malicious = np.array([e.malicious for e in episodes])
    fold_of = np.empty(len(episodes), dtype=np.int64)
    offset = 0
    for label in (False, True):
        members = rng.permutation(np.flatnonzero(malicious == label))
        fold_of[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    return fold_of


def _rows(episodes: Sequence[EpisodeData]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, malicious label, severity and 4-class label (benign + severity third) of every row."""
    batch = EpisodeBatch.of(episodes)
    malicious = batch.malicious[batch.group]
    severity = batch.severity[batch.group]
    return batch.features, malicious, severity, severity_class(malicious, severity)


# ---- hgb: gradient-boosted trees --------------------------------------------------------------------

@dataclass(frozen=True)
class HgbEstimate:
    """P(malicious) from a HistGradientBoostingClassifier, ŝ from a HistGradientBoostingRegressor."""

    classifier: Any  # sklearn HistGradientBoostingClassifier (no type stubs)
    regressor: Any  # sklearn HistGradientBoostingRegressor, fitted on the malicious rows
    rewards: RewardTable

    def __call__(self, features: np.ndarray) -> Belief:
        x = np.asarray(features, dtype=np.float32)
        with _one_thread():
            p = self.classifier.predict_proba(x)[:, list(self.classifier.classes_).index(True)]
            severity = self.regressor.predict(x)
        return Belief(p.astype(np.float64), malicious_response_rewards(self.rewards, severity))

    @property
    def iterations(self) -> tuple[int, int]:
        """Boosting iterations kept by early stopping: (classifier, regressor)."""
        return int(self.classifier.n_iter_), int(self.regressor.n_iter_)


def hgb_fitter(rewards: RewardTable, *, max_iter: int = 500, learning_rate: float = 0.1) -> FitEstimator:
    """Fits HgbEstimate, early-stopped on the validation episodes' rows (log loss / squared error)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    def fit(learn: Sequence[EpisodeData], held: Sequence[EpisodeData], seed: int) -> Estimator:
        x, y, s, _ = _rows(learn)
        xv, yv, sv, _ = _rows(held)
        common = {"max_iter": max_iter, "learning_rate": learning_rate, "random_state": seed,
                  "n_iter_no_change": 20}
        both = len(set(yv.tolist())) == 2
        classifier = HistGradientBoostingClassifier(early_stopping=both, **common)
        regressor = HistGradientBoostingRegressor(early_stopping=bool(yv.any()), **common)
        with _one_thread():
            classifier.fit(x, y, **_validation(xv, yv, both))
            regressor.fit(x[y], s[y], **_validation(xv[yv], sv[yv], bool(yv.any())))
        return HgbEstimate(classifier, regressor, rewards)

    return fit


def _one_thread() -> Any:
    # One OpenMP thread, as the DQN trains on one torch thread. On small shared machines, OpenMP
    # threads that spin-wait for busy cores made single fits 20x slower (4 s instead of 0.2 s).
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def _validation(x: np.ndarray, y: np.ndarray, usable: bool) -> dict[str, np.ndarray]:
    # A validation share without both classes (tiny sets) cannot score log loss: fit without it.
    return {"X_val": x, "y_val": y} if usable else {}


# ---- mlp: the early-stopped classifier of bench/separability.py -------------------------------------

class Scaler:
    """Standardization fitted on training rows; returns float32 tensors."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.tensor((x - self.mean) / self.std, dtype=torch.float32)


def classifier(hidden: Sequence[int], classes: int = 4) -> torch.nn.Sequential:
    """An MLP over the 30 features with ReLU hidden layers (none: a linear classifier)."""
    layers: list[torch.nn.Module] = []
    width = FEATURE_DIM
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def fit_classifier(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None, every: int = 100, seed: int = 0,
) -> int:
    """Adam, batches of 256; with `validation`, keep the weights of the best validation loss.

    Returns the number of steps of the weights kept."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    best = (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    for step in range(1, steps + 1):
        i = torch.randint(0, len(x), (256,), generator=generator)
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if validation is not None and step % every == 0:
            with torch.no_grad():
                held = F.cross_entropy(model(validation[0]), validation[1]).item()
            if held < best[0]:
                best = (held, step, {k: v.clone() for k, v in model.state_dict().items()})
    if validation is None:
        return steps
    model.load_state_dict(best[2])
    return best[1]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    # As the DQN trains (OfflineOptions.torch_threads = 1): on small shared machines intra-op threads
    # waiting for busy cores made these small batches 10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def class_malicious_rewards(rewards: RewardTable) -> np.ndarray:
    """[3, 4]: the reward of each response at the centre of each severity third."""
    return malicious_response_rewards(rewards, np.array(_CLASS_SEVERITY))


@dataclass(frozen=True)
class MlpEstimate:
    """p = 1 - P(benign); r_mal(a) = Σ_third P(third | malicious) · r(a | third's centre)."""

    model: torch.nn.Module
    scale: Scaler
    third_rewards: np.ndarray  # [3, 4]
    kept_steps: int

    def __call__(self, features: np.ndarray) -> Belief:
        with _one_torch_thread(), torch.no_grad():
            probabilities = torch.softmax(self.model(self.scale(features)), 1).double().numpy()
        p = 1.0 - probabilities[:, 0]
        given_malicious = probabilities[:, 1:] / np.maximum(p, 1e-12)[:, None]
        return Belief(p, given_malicious @ self.third_rewards)


def mlp_fitter(
    rewards: RewardTable, *, hidden: Sequence[int] = (128, 128), max_steps: int = 3000
) -> FitEstimator:
    """Fits MlpEstimate: cross-entropy over four classes, the weights of the best validation loss kept."""

    def fit(learn: Sequence[EpisodeData], held: Sequence[EpisodeData], seed: int) -> Estimator:
        torch.manual_seed(seed)
        x, _, _, y = _rows(learn)
        xv, _, _, yv = _rows(held)
        scale = Scaler(x)
        model = classifier(hidden)
        with _one_torch_thread():
            kept = fit_classifier(model, scale(x), torch.tensor(y), max_steps, (scale(xv), torch.tensor(yv)),
                                  seed=seed)
        model.eval()
        return MlpEstimate(model, scale, class_malicious_rewards(rewards), kept)

    return fit


def reference_fitters(rewards: RewardTable, *, smoke: bool = False) -> dict[str, FitEstimator]:
    """The fitter of each reference, by REFERENCE_NAMES; `smoke` shrinks the fits to seconds."""
    return {
        "hgb": hgb_fitter(rewards, max_iter=30 if smoke else 500),
        "mlp": mlp_fitter(rewards, max_steps=200 if smoke else 3000),
    }


def describe(reference: StoppingReference) -> str:
    """One line: the classifier, what early stopping kept, the threshold."""
    estimate = reference.estimate
    if isinstance(estimate, HgbEstimate):
        kept = "{} classifier / {} regressor iterations".format(*estimate.iterations)
    elif isinstance(estimate, MlpEstimate):
        kept = f"{estimate.kept_steps} steps"
    else:
        kept = type(estimate).__name__
    return f"{reference.name}: {kept} kept by early stopping, threshold {reference.threshold:+.3f}"
