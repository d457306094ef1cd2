"""Offline evaluation: episode returns, metrics, baselines, the ONNX policy and the whole report."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from streamdqn import cli
from streamdqn.errors import ConfigError, SnapshotError
from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.offline.baselines import (
    CLASS_NAMES,
    always_ignore,
    fit_logistic_baseline,
    oracle_policy,
    random_policy,
    review_at_step0,
    severity_class,
)
from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.offline.evaluate import (
    POLICY_NAMES,
    Decision,
    EvaluationReport,
    evaluate,
    evaluate_policy,
    format_report,
    load_snapshot_model,
    read_decisions,
    write_decisions,
)
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.snapshots.export import publish_snapshot
from streamdqn.snapshots.layout import MODEL_FILE
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.snapshots.store import SnapshotStore
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, Policy, replay
from streamdqn.stream.wire import validate_records

Record = dict[str, object]
TABLE = RewardTable()


def _event(
    episode_id: int, step: int, *, malicious: bool, severity: float, final: bool, **fields: object
) -> Record:
    record: Record = {
        "episode_id": episode_id,
        "step": step,
        "is_malicious": malicious,
        "severity": severity,
        "syscall_count": 120,
        "file_read_count": 4,
        "file_write_count": 1,
        "network_connections": 0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "child_processes": 0,
        "cpu_usage": 10.0,
        "memory_usage": 150.0,
        "registry_modification": False,
        "privilege_escalation_attempt": False,
        "code_injection_detected": False,
        "sandbox_id": f"sb-{episode_id}",
        "final": final,
    }
    record.update(fields)
    return record


def _records(
    episode_id: int,
    length: int,
    *,
    malicious: bool,
    severity: float = 0.0,
    first_step: int = 0,
    **fields: object,
) -> list[Record]:
    last = length - 1
    return [
        _event(episode_id, first_step + k, malicious=malicious, severity=severity, final=k == last, **fields)
        for k in range(length)
    ]


def _episodes(records: Sequence[Record]) -> list[EpisodeData]:
    decoded = validate_records(list(records))
    assert not decoded.rejects, decoded.rejects
    return split_episodes(decoded.events)


def _fixed(actions: Sequence[Sequence[int]]) -> Policy:
    """A policy that takes the given actions, row by row, on the given episodes' concatenated rows."""
    flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in actions])

    def decide(features: np.ndarray) -> np.ndarray:
        assert len(features) == len(flat)
        return flat

    return decide


@pytest.fixture(scope="module")
def simulated() -> list[EpisodeData]:
    return _episodes(list(simulate(40, seed=5)))


@pytest.fixture(scope="module")
def snapshots(
    tmp_path_factory: pytest.TempPathFactory, simulated: list[EpisodeData]
) -> tuple[Path, DQNLearner]:
    """Two published versions of a small network (latest = 2), with a non-trivial normalization."""
    root = tmp_path_factory.mktemp("state") / "snapshots"
    rows = np.concatenate([e.features for e in simulated])
    store = SnapshotStore(root)
    learner = DQNLearner(LearnerSettings(seed=0, device="cpu", hidden=(32, 32)), 30, 5)
    with warnings.catch_warnings():
        # snapshots.py picks the TorchScript exporter on purpose (~150x faster); torch deprecates it
        # and its logging helpers, with several DeprecationWarnings. Only these two exports hide them.
        warnings.simplefilter("ignore", DeprecationWarning)
        publish_snapshot(store, learner.online, probe=rows[:8])
        learner.set_normalization(rows.mean(axis=0), rows.std(axis=0) + 1e-3, 10.0)
        publish_snapshot(store, learner.online, probe=rows[:8])
    return root, learner


# --- returns --------------------------------------------------------------------------------------

MAL_MID = {"malicious": True, "severity": 0.5}
MAL_HIGH = {"malicious": True, "severity": 0.9}
MAL_LOW = {"malicious": True, "severity": 0.2}
BENIGN = {"malicious": False, "severity": 0.0}


@pytest.mark.parametrize(
    ("truth", "actions", "expected", "action", "step"),
    [
        (MAL_MID, [2, 0, 0, 0], 1.0, "terminate", 0),  # respond at step 0
        (MAL_MID, [0, 0, 3, 0], -0.05 * 2 + 0.7, "quarantine", 2),  # at a middle step
        (MAL_MID, [0, 0, 0, 1], -0.05 * 3 + 0.6, "contain", 3),  # at the final step: not "missed"
        (MAL_MID, [0, 0, 0, 0], -0.05 * 3 - 1.0, "ignore", None),  # never: final step is missed
        (MAL_MID, [0, 4, 3, 1], -0.05 + 0.4, "review", 1),  # only the first response counts
        (MAL_HIGH, [0, 0, 0], -0.09 * 2 - 1.4, "ignore", None),
        (MAL_HIGH, [3, 3, 3], 1.0, "quarantine", 0),
        (MAL_LOW, [1, 0], 1.0, "contain", 0),
        (MAL_LOW, [0, 2], -0.02 + 0.7, "terminate", 1),
        (BENIGN, [0, 0, 0], 0.5, "ignore", None),
        (BENIGN, [0, 4, 0], -0.2, "review", 1),
        (BENIGN, [0, 0, 2], -1.0, "terminate", 2),
        (BENIGN, [1, 0, 0], -0.5, "contain", 0),
    ],
)
def test_return_of_one_episode_matches_hand_computed(
    truth: dict[str, object], actions: list[int], expected: float, action: str, step: int | None
) -> None:
    episodes = _episodes(_records(7, len(actions), **truth))  # type: ignore[arg-type]
    metrics, decisions = evaluate_policy(_fixed([actions]), episodes, TABLE)
    assert metrics.mean_return == pytest.approx(expected, abs=1e-9)
    assert decisions == [Decision("sb-7", 7, action, step)]


def test_returns_of_a_batch_are_per_episode() -> None:
    episodes = _episodes([*_records(1, 4, **MAL_MID), *_records(2, 3, **BENIGN), *_records(3, 2, **MAL_LOW)])
    batch = EpisodeBatch.of(episodes)
    outcomes = replay(np.array([0, 0, 3, 0, 0, 4, 0, 0, 0]), batch, TABLE)
    np.testing.assert_allclose(outcomes.returns, [0.6, -0.2, -0.02 - 0.7])
    np.testing.assert_array_equal(outcomes.first_response, [2, 1, -1])
    np.testing.assert_array_equal(outcomes.action, [3, 4, 0])


def test_decision_step_is_the_events_step_and_steps_to_response_the_position() -> None:
    episodes = _episodes(_records(4, 3, first_step=10, **MAL_MID))
    metrics, decisions = evaluate_policy(_fixed([[0, 2, 0]]), episodes, TABLE)
    assert decisions[0].step == 11
    assert metrics.mean_steps_to_response == 1.0


def test_replay_rejects_malformed_actions() -> None:
    batch = EpisodeBatch.of(_episodes(_records(1, 3, **BENIGN)))
    with pytest.raises(ValueError, match="shape"):
        replay(np.zeros(2, dtype=np.int64), batch, TABLE)
    with pytest.raises(ValueError, match="outside"):
        replay(np.array([0, 5, 0]), batch, TABLE)
    with pytest.raises(ValueError, match="no episodes"):
        EpisodeBatch.of([])


# --- metrics --------------------------------------------------------------------------------------


def test_each_metric_on_a_crafted_set() -> None:
    records = [*(r for i in range(4) for r in _records(i, 3, **MAL_MID)),
               *(r for i in range(4, 8) for r in _records(i, 3, **BENIGN))]
    actions = [
        [2, 0, 0], [0, 0, 4], [0, 0, 0], [0, 0, 0],  # malicious: terminate@0, review@2, missed, missed
        [0, 1, 0], [4, 0, 0], [0, 0, 0], [0, 0, 3],  # benign: contain@1, review@0, let run, quarantine@2
    ]
    metrics, decisions = evaluate_policy(_fixed(actions), _episodes(records), TABLE)
    assert metrics.episodes == 8
    assert metrics.malicious_episodes == 4
    assert metrics.detection_rate == 0.5
    assert metrics.missed_rate == 0.5
    assert metrics.false_positive_rate == 0.5
    assert metrics.benign_review_rate == 0.25
    assert metrics.mean_steps_to_response == pytest.approx((0 + 2 + 1 + 0 + 2) / 5)
    expected = (1.0 + (-0.1 + 0.4) + 2 * (-0.1 - 1.0) - 0.5 - 0.2 + 0.5 - 1.0) / 8
    assert metrics.mean_return == pytest.approx(expected)
    assert [d.action for d in decisions] == [
        "terminate", "review", "ignore", "ignore", "contain", "review", "ignore", "quarantine"
    ]
    assert json.loads(json.dumps(metrics.as_dict()))["false_positive_rate"] == 0.5


def test_rates_without_episodes_of_a_class_are_none() -> None:
    metrics, _ = evaluate_policy(always_ignore, _episodes(_records(1, 3, **BENIGN)), TABLE)
    assert metrics.detection_rate is None
    assert metrics.missed_rate is None
    assert metrics.false_positive_rate == 0.0
    assert metrics.mean_steps_to_response is None


# --- baselines ------------------------------------------------------------------------------------


def test_always_ignore_detects_nothing(simulated: list[EpisodeData]) -> None:
    metrics, decisions = evaluate_policy(always_ignore, simulated, TABLE)
    assert metrics.malicious_episodes > 0
    assert metrics.detection_rate == 0.0
    assert metrics.missed_rate == 1.0
    assert all(d.action == "ignore" and d.step is None for d in decisions)


def test_review_at_step0_reviews_every_episode_on_its_first_row() -> None:
    episodes = _episodes([*_records(1, 3, first_step=5, **BENIGN), *_records(2, 4, **MAL_MID)])
    metrics, decisions = evaluate_policy(review_at_step0, episodes, TABLE)
    assert [(d.action, d.step) for d in decisions] == [("review", 5), ("review", 0)]
    assert metrics.benign_review_rate == 1.0
    assert metrics.mean_steps_to_response == 0.0


def test_random_policy_is_seeded_and_uniform() -> None:
    rows = np.zeros((5000, 30), dtype=np.float32)
    a, b, c = random_policy(3)(rows), random_policy(3)(rows), random_policy(4)(rows)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64
    np.testing.assert_allclose(np.bincount(a, minlength=5) / len(a), 0.2, atol=0.03)


def test_oracle_is_at_least_as_good_as_every_policy_on_every_episode(
    simulated: list[EpisodeData], snapshots: tuple[Path, DQNLearner]
) -> None:
    batch = EpisodeBatch.of(simulated)
    oracle = replay(oracle_policy(simulated, TABLE)(batch.features), batch, TABLE).returns
    others: dict[str, Policy] = {
        "always_ignore": always_ignore,
        "review_at_step0": review_at_step0,
        "random": random_policy(0),
        "logistic": fit_logistic_baseline(simulated, TABLE, seed=0),
        "streamdqn": OnnxPolicy(load_snapshot_model(snapshots[0])),
    }
    for name, decide in others.items():
        returns = replay(decide(batch.features), batch, TABLE).returns
        assert (oracle >= returns - 1e-12).all(), name
    means = [replay(d(batch.features), batch, TABLE).returns.mean() for d in others.values()]
    assert oracle.mean() > max(means)


def _separable() -> list[EpisodeData]:
    """Four classes told apart by flags and connection counts, with per-episode noise."""
    rng = np.random.default_rng(0)
    records: list[Record] = []
    kinds = [
        (BENIGN, {}),
        (MAL_LOW, {"code_injection_detected": True}),
        (MAL_MID, {"code_injection_detected": True, "network_connections": 40}),
        (MAL_HIGH, {"code_injection_detected": True, "privilege_escalation_attempt": True,
                    "network_connections": 40}),
    ]
    episode_id = 0
    for _ in range(15):
        for truth, fields in kinds:
            noise = {"syscall_count": int(rng.integers(50, 400)), "memory_usage": float(rng.uniform(50, 500))}
            records += _records(episode_id, 5, **truth, **{**fields, **noise})  # type: ignore[arg-type]
            episode_id += 1
    return _episodes(records)


def test_logistic_baseline_fits_separable_data_and_tunes_its_threshold() -> None:
    episodes = _separable()
    baseline = fit_logistic_baseline(episodes, TABLE, seed=0)
    batch = EpisodeBatch.of(episodes)
    labels = severity_class(batch.malicious, batch.severity)[batch.group]
    p = baseline.probabilities(batch.features)
    assert p.shape == (batch.rows, len(CLASS_NAMES))
    assert (p.argmax(axis=1) == labels).mean() >= 0.95
    assert baseline.class_actions.tolist() == [0, 1, 2, 3]

    logistic, _ = evaluate_policy(baseline, episodes, TABLE)
    ignore, _ = evaluate_policy(always_ignore, episodes, TABLE)
    assert logistic.mean_return > ignore.mean_return
    assert logistic.detection_rate == 1.0
    assert logistic.false_positive_rate == 0.0
    again = fit_logistic_baseline(episodes, TABLE, seed=0)
    np.testing.assert_array_equal(again.weights, baseline.weights)
    assert again.threshold == baseline.threshold


# --- the snapshot as a policy ---------------------------------------------------------------------


def test_onnx_policy_matches_the_torch_network(
    simulated: list[EpisodeData], snapshots: tuple[Path, DQNLearner]
) -> None:
    root, learner = snapshots
    rows = np.concatenate([e.features for e in simulated])
    onnx_actions = OnnxPolicy(load_snapshot_model(root), chunk_rows=97)(rows)
    torch_actions = learner.q_values(rows).argmax(axis=1)
    assert onnx_actions.dtype == np.int64
    np.testing.assert_array_equal(onnx_actions, torch_actions)
    assert len(np.unique(onnx_actions)) > 1  # a non-trivial comparison


def test_load_snapshot_model_from_a_version_or_a_snapshots_directory(
    snapshots: tuple[Path, DQNLearner]
) -> None:
    root, _ = snapshots
    assert load_snapshot_model(root / "1") == root / "1" / MODEL_FILE
    assert load_snapshot_model(root) == (root / "2" / MODEL_FILE).resolve()
    assert load_snapshot_model(root / "1" / MODEL_FILE) == root / "1" / MODEL_FILE


def test_load_snapshot_model_explains_a_wrong_directory(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"neither a snapshot version directory .* <state-dir>/snapshots"):
        load_snapshot_model(tmp_path)
    os.symlink("9", tmp_path / "latest")
    with pytest.raises(SnapshotError, match=r"points to a version without model\.onnx"):
        load_snapshot_model(tmp_path)


def test_onnx_policy_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(SnapshotError, match="onnxruntime cannot load it"):
        OnnxPolicy(load_snapshot_model(tmp_path))


# --- decisions file and the whole evaluation ------------------------------------------------------


def test_decisions_file_round_trip(tmp_path: Path) -> None:
    decisions = [Decision("sb-1", "7", "quarantine", 3), Decision("sb-2", 8, "ignore", None, True)]
    path = tmp_path / "out" / "decisions.jsonl"
    write_decisions(path, decisions)
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"sandbox_id": "sb-2", "episode_id": 8, "action": "ignore", "step": None,
                                    "fit_baseline": True}
    assert read_decisions(path) == decisions
    assert [p.name for p in path.parent.iterdir()] == ["decisions.jsonl"]  # no temp file left


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    write_events(path, simulate(40, seed=7))
    with path.open("a") as f:
        f.write('{"episode_id": 1, "step": "not a number"}\n')
    return path


def test_evaluate_is_deterministic_and_complete(
    events_file: Path, snapshots: tuple[Path, DQNLearner], tmp_path: Path
) -> None:
    root, _ = snapshots
    first = evaluate(root, events_file, seed=3)
    second = evaluate(root / "2", events_file, seed=3)
    assert first.as_dict() == second.as_dict()
    assert first.decisions == second.decisions

    report = first.as_dict()
    json.dumps(report, allow_nan=False)
    assert tuple(report["metrics"]) == POLICY_NAMES
    assert report["rejects"] == 1
    assert report["episodes"] == 40
    assert report["snapshot_version"] == 2
    assert report["fit_episodes"] == 12
    assert report["evaluation_episodes"] == 28
    # One decision for every episode of the file, in file order, ids exactly as they came in.
    assert len(first.decisions) == 40
    assert sum(d.fit_baseline for d in first.decisions) == 12
    assert [(d.sandbox_id, d.episode_id) for d in first.decisions] == _episode_ids_in(events_file)
    m = first.metrics
    assert all(m["oracle"].mean_return >= x.mean_return for x in m.values())
    assert m["always_ignore"].detection_rate == 0.0
    assert all(x.episodes == 28 for x in m.values())
    best = max(("always_ignore", "review_at_step0", "random", "logistic"), key=lambda n: m[n].mean_return)
    assert first.best_baseline == best
    assert first.gap_closed == pytest.approx(
        (m["streamdqn"].mean_return - m[best].mean_return) / (m["oracle"].mean_return - m[best].mean_return)
    )
    text = format_report(first)
    assert all(name in text for name in POLICY_NAMES)
    assert "gap closed" in text

    other_split = evaluate(root, events_file, seed=4)

    def fitted(report: EvaluationReport) -> set[object]:
        return {d.episode_id for d in report.decisions if d.fit_baseline}

    assert fitted(other_split) != fitted(first)


def _episode_ids_in(path: Path) -> list[tuple[str, object]]:
    """(sandbox_id, episode_id) of each valid episode of a JSON Lines file, in order of first event."""
    seen: dict[tuple[str, object], None] = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if isinstance(event.get("step"), int):
            seen.setdefault((event["sandbox_id"], event["episode_id"]), None)
    return list(seen)


def test_cli_decisions_out_joins_back_to_the_telemetry_file(
    events_file: Path, snapshots: tuple[Path, DQNLearner], tmp_path: Path
) -> None:
    out = tmp_path / "decisions.jsonl"
    assert cli.main(["evaluate", "--snapshot", str(snapshots[0]), "--events", str(events_file),
                     "--decisions-out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["sandbox_id"], r["episode_id"]) for r in rows] == _episode_ids_in(events_file)
    assert all(isinstance(r["episode_id"], int) for r in rows)  # as the simulator wrote them


def test_evaluate_refuses_a_bad_fit_fraction(events_file: Path, snapshots: tuple[Path, DQNLearner]) -> None:
    with pytest.raises(ConfigError, match="fit_fraction"):
        evaluate(snapshots[0], events_file, fit_fraction=1.0)
