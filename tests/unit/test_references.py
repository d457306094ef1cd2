"""The supervised stopping references of bench/_references.py (bench/quality.py's quality bar)."""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, replay
from streamdqn.stream.wire import Action, read_events_file

pytest.importorskip("sklearn", reason="the hgb reference needs scikit-learn (the `bench` extra)")

# bench scripts import their siblings by name (their directory is first on sys.path); do the same.
BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
refs: ModuleType = importlib.import_module("_references")

REWARDS = RewardTable()


def _episodes(tmp: Path, n: int, seed: int) -> list[EpisodeData]:
    path = tmp / f"sim{seed}.jsonl"
    write_events(path, simulate(n, seed))
    return split_episodes(read_events_file(path).events)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[EpisodeData], list[EpisodeData]]:
    tmp = tmp_path_factory.mktemp("references")
    return _episodes(tmp, 80, seed=11), _episodes(tmp, 40, seed=12)


def _hgb(episodes: list[EpisodeData], seed: int = 0) -> object:
    return refs.fit_reference("hgb", refs.hgb_fitter(REWARDS, max_iter=30), episodes, REWARDS, seed, folds=3)


def _certain(p: float, severity: float, rows: int = 1) -> object:
    return refs.Belief(np.full(rows, p), refs.malicious_response_rewards(REWARDS, np.full(rows, severity)))


@given(st.floats(0.0, 1.0))
def test_a_certain_malicious_row_gets_the_severity_matched_response(severity: float) -> None:
    expected = refs.expected_rewards(_certain(1.0, severity), REWARDS)
    assert refs.stopping_actions(expected, 0.0)[0] == REWARDS.best_action(True, severity)


def test_the_rule_weighs_responses_by_their_expected_reward() -> None:
    # Severity 0.9 (high third): quarantine earns 1.0 if malicious, -1.0 if benign; review 0.4 / -0.2.
    at = {p: int(refs.stopping_actions(refs.expected_rewards(_certain(p, 0.9), REWARDS), -1.0)[0])
          for p in (0.6, 0.5)}
    assert at[0.6] == Action.QUARANTINE  # 0.6·1.0 + 0.4·(-1.0) = 0.20 beats review's 0.16
    assert at[0.5] == Action.REVIEW  # quarantine 0.00, review 0.5·0.4 + 0.5·(-0.2) = 0.10


def test_a_reference_responds_or_ignores_as_the_threshold_says() -> None:
    def estimate(features: np.ndarray) -> object:  # p is the first feature; severity mid third
        return refs.Belief(features[:, 0].astype(np.float64),
                           refs.malicious_response_rewards(REWARDS, np.full(len(features), 0.5)))

    features = np.zeros((2, 30), dtype=np.float32)
    features[0, 0] = 1.0  # p = 1; row 1 has p = 0
    at_half = refs.StoppingReference("fixed", estimate, 0.5, REWARDS)(features)
    assert at_half.dtype == np.int64
    assert at_half.tolist() == [Action.TERMINATE, Action.IGNORE]
    # The best reward (terminate, 1.0) must *exceed* the threshold; p = 0's best is review at -0.2.
    assert refs.StoppingReference("fixed", estimate, 1.0, REWARDS)(features).tolist() == [0, 0]
    assert refs.StoppingReference("fixed", estimate, -0.3, REWARDS)(features).tolist() == [
        Action.TERMINATE, Action.REVIEW]


def test_the_tuned_threshold_is_the_best_candidate_on_the_training_rows(
    data: tuple[list[EpisodeData], list[EpisodeData]],
) -> None:
    train, _ = data
    batch = EpisodeBatch.of(train)
    estimate = refs.hgb_fitter(REWARDS, max_iter=20)(train, train[:10], 0)
    expected = refs.expected_rewards(estimate(batch.features), REWARDS)
    chosen = refs.tune_threshold(expected, batch, REWARDS)

    def score(t: float) -> float:
        return float(replay(refs.stopping_actions(expected, t), batch, REWARDS).returns.mean())

    others = np.quantile(expected.max(axis=1), np.linspace(0, 1, 17))
    assert all(score(chosen) >= score(t) for t in others)
    assert score(chosen) > score(float(expected.max()))  # better than never responding


def test_a_fitted_reference_decides_from_features_alone(
    data: tuple[list[EpisodeData], list[EpisodeData]],
) -> None:
    train, evaluation = data
    reference = _hgb(train)
    flipped = [replace(e, malicious=not e.malicious, severity=1.0 - e.severity) for e in evaluation]
    batch, flipped_batch = EpisodeBatch.of(evaluation), EpisodeBatch.of(flipped)
    actions = reference(batch.features)
    assert np.array_equal(actions, reference(flipped_batch.features))
    # The evaluation labels reach the score, not the decisions.
    scored = replay(actions, batch, REWARDS).returns
    assert not np.array_equal(scored, replay(actions, flipped_batch, REWARDS).returns)


def test_fitting_is_deterministic_and_learns_from_the_training_labels(
    data: tuple[list[EpisodeData], list[EpisodeData]],
) -> None:
    train, evaluation = data
    features = EpisodeBatch.of(evaluation).features
    first, again = _hgb(train), _hgb(train)
    assert first.threshold == again.threshold
    assert np.array_equal(first(features), again(features))
    wrong = _hgb([replace(e, malicious=not e.malicious) for e in train])
    assert not np.array_equal(first(features), wrong(features))


def test_the_mlp_reference_is_a_policy(data: tuple[list[EpisodeData], list[EpisodeData]]) -> None:
    train, evaluation = data
    reference = refs.fit_reference("mlp", refs.mlp_fitter(REWARDS, max_steps=100), train, REWARDS, 0, folds=2)
    batch = EpisodeBatch.of(evaluation)
    actions = reference(batch.features)
    assert actions.shape == (batch.rows,)
    assert actions.dtype == np.int64
    assert actions.min() >= 0
    assert actions.max() < len(Action)
    assert "steps kept by early stopping" in refs.describe(reference)


def test_validation_holds_whole_episodes_of_both_classes(
    data: tuple[list[EpisodeData], list[EpisodeData]],
) -> None:
    train, _ = data
    learn, held = refs.split_by_episode(train, 0.2, seed=3)
    assert {id(e) for e in learn}.isdisjoint(id(e) for e in held)
    assert len(learn) + len(held) == len(train)
    assert {e.malicious for e in held} == {False, True}


def test_training_episodes_of_one_class_get_a_clear_error(
    data: tuple[list[EpisodeData], list[EpisodeData]],
) -> None:
    train, _ = data
    benign = [e for e in train if not e.malicious]
    with pytest.raises(ValueError, match="needs both benign and malicious"):
        _hgb(benign)
