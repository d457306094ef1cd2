"""The calibrated bias towards `ignore`: applied by torch, baked into ONNX, tuned on episodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.offline.dataset import split_episodes
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.offline.train import Agent, calibrate_ignore_margin
from streamdqn.snapshots.export import check_onnx, export_onnx
from streamdqn.stream.features import RunningNormalizer
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import read_events_file


def _learner() -> DQNLearner:
    torch.manual_seed(0)
    return DQNLearner(LearnerSettings(seed=0, device="cpu", hidden=(32, 32)), 30, 5)


def test_margin_shifts_the_greedy_action_in_torch_and_in_onnx() -> None:
    learner = _learner()
    probe = np.random.default_rng(0).normal(size=(256, 30)).astype(np.float32) * 3
    q = learner.q_values(probe)
    gap = (q[:, 1:].max(axis=1) - q[:, 0]).max()  # a margin above this makes every action ignore
    learner.online.ignore_margin.fill_(float(gap) + 0.01)
    assert (learner.act(probe) == 0).all()
    model = export_onnx(learner.online)
    check_onnx(model, learner.online, probe)  # parity, and action = argmax with the margin
    q_ort, action = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        None, {"features": probe}
    )
    assert (action == 0).all()
    np.testing.assert_allclose(q_ort, q, atol=1e-4)  # the Q-values themselves are untouched


def test_calibration_picks_the_best_margin_on_the_episodes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write_events(path, simulate(60, 3))
    episodes = split_episodes(read_events_file(path).events)
    agent = Agent(_learner(), RunningNormalizer(30), RewardTable())
    grid = np.array([0.0, 0.5, 5.0])
    margin, best = calibrate_ignore_margin(agent, episodes, grid)
    assert margin in grid
    assert float(agent.learner.online.ignore_margin) == margin == float(agent.learner.target.ignore_margin)
    # No margin of the grid does better than the chosen one.
    for other in grid:
        _, value = calibrate_ignore_margin(agent, episodes, np.array([other]))
        assert value <= best + 1e-9
