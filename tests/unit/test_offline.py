"""Offline training end to end on a small simulated file, through the Python API and the CLI."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import streamdqn
from streamdqn.cli import main
from streamdqn.errors import ConfigError
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.snapshots.layout import LATEST, MANIFEST_FILE, MODEL_FILE
from streamdqn.snapshots.manifest import SCHEMA_VERSION, parse_manifest
from streamdqn.stream.features import FEATURE_NAMES
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import ACTION_NAMES


@pytest.fixture(autouse=True)
def legacy_exporter() -> Iterator[None]:
    # Training ends with an ONNX export through torch's TorchScript exporter, which snapshots.py picks
    # on purpose and torch deprecates: -W error would turn its DeprecationWarnings into failures.
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
    torch.set_num_threads(threads)  # train() sets one torch thread for the whole process


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "events.jsonl"
    write_events(path, simulate(12, seed=3, sandboxes=3))
    return path


def test_train_returns_agent_rewards_losses_and_writes_checkpoint_and_snapshot(
    telemetry: Path, tmp_path: Path
) -> None:
    agent, rewards, losses = streamdqn.train(
        telemetry_file=telemetry, num_episodes=30, state_dir=tmp_path, progress=False, hidden=(32, 32)
    )
    assert len(rewards) == len(losses) == 30
    assert all(np.isfinite(rewards))
    assert any(np.isfinite(losses))  # updates started once the buffer held learning_starts transitions
    assert agent.learner.online.hidden == (32, 32)
    assert agent.act(np.zeros((3, len(FEATURE_NAMES)), np.float32)).shape == (3,)

    checkpoint = CheckpointStore(tmp_path / "checkpoints").load_latest()
    assert checkpoint is not None
    assert checkpoint.state["episode"] == 30
    assert checkpoint.state["learner"]["updates"] == agent.learner.counters.updates > 0

    latest = tmp_path / "snapshots" / LATEST
    manifest = json.loads((latest / MANIFEST_FILE).read_text())
    model = (latest / MODEL_FILE).read_bytes()
    assert manifest["version"] == 1
    assert manifest["created_at"] > 0
    assert manifest["updates"] == agent.learner.counters.updates
    assert manifest["events_learned"] >= 30  # every episode had events
    assert manifest["transitions_learned"] > 0
    assert manifest["sha256"] == hashlib.sha256(model).hexdigest()
    assert manifest["feature_spec"]["names"] == list(FEATURE_NAMES)
    assert (
        manifest["action_names"]
        == list(ACTION_NAMES)
        == ["ignore", "contain", "terminate", "quarantine", "review"]
    )
    assert manifest["reward_table"] == RewardTable().as_dict()
    normalizer = manifest["normalizer"]
    assert normalizer["count"] > 0
    assert len(normalizer["mean"]) == len(normalizer["std"]) == len(FEATURE_NAMES)
    # The normalizer in the manifest is the one baked into the model's graph.
    np.testing.assert_allclose(normalizer["mean"], agent.normalizer.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(normalizer["std"], agent.normalizer.std, rtol=1e-6, atol=1e-6)
    assert parse_manifest((latest / MANIFEST_FILE).read_bytes(), "offline").schema_version == SCHEMA_VERSION
    assert manifest["evaluation"]
    assert all(isinstance(v, dict) for v in manifest["evaluation"].values())
    assert {"streamdqn", "torch", "numpy", "onnx", "onnxruntime"} <= set(manifest["packages"])


def test_unknown_hyperparameter_is_a_config_error(telemetry: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learning_rte"):
        streamdqn.train(
            telemetry_file=telemetry, num_episodes=1, state_dir=tmp_path, progress=False, learning_rte=0.1
        )
    assert not (tmp_path / "checkpoints").exists()


def test_cli_simulate_then_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "sim.json"
    assert main(["simulate", "--episodes", "6", "--seed", "2", "--sandboxes", "2", "--out", str(events)]) == 0
    assert "6 episodes" in capsys.readouterr().out
    assert isinstance(json.loads(events.read_text()), list)  # .json: one JSON array
    state = tmp_path / "state"
    code = main(
        [
            "train",
            "--events",
            str(events),
            "--episodes",
            "20",
            "--state-dir",
            str(state),
            "--hidden",
            "32",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "trained 20 episodes" in out
    manifest = json.loads((state / "snapshots" / LATEST / MANIFEST_FILE).read_text())
    assert manifest["learner"]["hidden"] == [32]
    assert CheckpointStore(state / "checkpoints").load_latest() is not None


def test_cli_train_on_a_file_without_valid_events_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "bad.jsonl"
    events.write_text('{"episode_id": 1}\nnot json\n')
    assert (
        main(
            [
                "train",
                "--events",
                str(events),
                "--episodes",
                "2",
                "--state-dir",
                str(tmp_path / "s"),
                "--quiet",
            ]
        )
        == 1
    )
    assert "no valid events" in capsys.readouterr().err
