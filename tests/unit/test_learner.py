"""The learner: row_loss by hand, real updates on a tiny MDP, target updates, state, devices."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from streamdqn.learning.learner import DQNLearner, resolve_device, row_loss, update_from
from streamdqn.learning.model import QNetwork
from streamdqn.learning.replay.buffer import ReplayBuffer, RowBatch
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import N_ACTIONS, ReplayRows


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # Tiny networks on a shared 2-core box: a second intra-op thread only adds contention (15x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_q(weight: np.ndarray, bias: np.ndarray) -> QNetwork:
    """A QNetwork with no hidden layer: Q(s) = W s + b, with identity normalization."""
    q = QNetwork(weight.shape[1], weight.shape[0], hidden=())
    with torch.no_grad():
        q.mlp[0].weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        q.mlp[0].bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return q


def batch_of(states: np.ndarray, rewards: np.ndarray, known: np.ndarray, next_states: np.ndarray,
             horizon: np.ndarray, weights: np.ndarray | None = None) -> RowBatch:
    n = len(states)
    return RowBatch(
        torch.as_tensor(states, dtype=torch.float32), torch.as_tensor(rewards, dtype=torch.float32),
        torch.as_tensor(known), torch.as_tensor(next_states, dtype=torch.float32),
        torch.as_tensor(horizon, dtype=torch.int8), torch.arange(n),
        torch.as_tensor(np.ones(n) if weights is None else weights, dtype=torch.float32),
    )


def huber(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)


@pytest.mark.parametrize("double_dqn", [True, False])
def test_row_loss_against_a_hand_computation(double_dqn: bool) -> None:
    rng = np.random.default_rng(0)
    w_online, b_online = rng.normal(size=(3, 2)), rng.normal(size=3)
    w_target, b_target = rng.normal(size=(3, 2)), rng.normal(size=3)
    online, target = linear_q(w_online, b_online), linear_q(w_target, b_target)
    s = rng.normal(size=(4, 2))
    s2 = rng.normal(size=(4, 2))
    r = rng.normal(size=(4, 3))
    known = np.array([[True, True, True], [False, True, True], [True, False, True], [True, True, False]])
    horizon = np.array([1, 0, 3, 2])
    weights = np.array([1.0, 0.5, 2.0, 1.0])
    gamma = 0.9

    q = s @ w_online.T + b_online
    q_target_next = s2 @ w_target.T + b_target
    if double_dqn:  # the online network picks, the target network values
        pick = (s2 @ w_online.T + b_online).argmax(axis=1)
        next_q = q_target_next[np.arange(4), pick]
    else:
        next_q = q_target_next.max(axis=1)
    y = r.copy()
    y[:, 0] += np.where(horizon > 0, gamma**horizon * next_q, 0.0)  # row 1 (horizon 0) is terminal
    expected = (huber(q - y) * known * weights[:, None]).sum() / known.sum()
    expected_td = (np.abs(q - y) * known).sum(axis=1) / known.sum(axis=1)

    batch = batch_of(s, r, known, s2, horizon, weights)
    loss, td_abs, q_max = row_loss(online, target, batch, gamma, double_dqn)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(td_abs.numpy(), expected_td, rtol=1e-5)
    np.testing.assert_allclose(q_max.numpy(), q.max(axis=1), rtol=1e-5)
    assert not td_abs.requires_grad
    assert loss.requires_grad


def test_unknown_targets_contribute_nothing() -> None:
    online, target = linear_q(np.eye(2), np.zeros(2)), linear_q(np.eye(2), np.zeros(2))
    s = np.array([[1.0, 0.0]])
    known = np.array([[False, True]])
    base = row_loss(online, target, batch_of(s, np.array([[0.0, 3.0]]), known, s, np.array([1])), 0.9, True)
    # Another ignore reward and horizon, both unknown: the loss is the same.
    other = row_loss(online, target, batch_of(s, np.array([[-5.0, 3.0]]), known, s, np.array([5])), 0.9, True)
    assert base[0].item() == other[0].item() == pytest.approx(float(huber(np.array(3.0))))


def test_row_loss_gradient_flows_only_into_the_online_network() -> None:
    online, target = linear_q(np.eye(2), np.zeros(2)), linear_q(np.ones((2, 2)), np.zeros(2))
    s = np.array([[1.0, 0.0]])
    batch = batch_of(s, np.array([[1.0, 0.0]]), np.ones((1, 2), bool), np.array([[0.0, 1.0]]), np.array([1]))
    loss, _, _ = row_loss(online, target, batch, 0.99, True)
    loss.backward()
    assert online.mlp[0].weight.grad is not None
    assert target.mlp[0].weight.grad is None


# --- real updates ----------------------------------------------------------------------------------

S0, S1 = np.eye(FEATURE_DIM, dtype=np.float32)[0], np.eye(FEATURE_DIM, dtype=np.float32)[1]
# s0: ignore -> s1 (reward 0), responses end with 1, 0.5, -1, 0.  s1: ignore ends with 2, responses -1.
# With gamma 0.9: Q*(s0) = [1.8, 1, 0.5, -1, 0], Q*(s1) = [2, -1, -1, -1, -1].
Q_STAR = np.array([[1.8, 1.0, 0.5, -1.0, 0.0], [2.0, -1.0, -1.0, -1.0, -1.0]])


def mdp_rows(copies: int = 16) -> ReplayRows:
    rows = ReplayRows.empty(2)
    rows.states[:] = [S0, S1]
    rows.next_states[:] = [S1, S1]
    rows.rewards[:] = [[0.0, 1.0, 0.5, -1.0, 0.0], [2.0, -1.0, -1.0, -1.0, -1.0]]
    rows.known[:] = True
    rows.horizon[:] = [1, 0]
    return ReplayRows.concat([rows] * copies)


def filled(capacity: int = 256, seed: int = 0) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, "cpu", seed=seed)
    buffer.push(mdp_rows())
    return buffer


def test_a_few_hundred_updates_learn_every_actions_value_from_one_row_per_state() -> None:
    settings = LearnerSettings(
        hidden=(16,), lr=1e-2, gamma=0.9, batch_size=32, target_update_interval=20, device="cpu", seed=0
    )
    learner = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    buffer = filled()
    losses = [update_from(learner, buffer).loss for _ in range(300)]
    q = learner.q_values(np.stack([S0, S1]))
    np.testing.assert_allclose(q, Q_STAR, atol=0.05)
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
    assert learner.counters.updates == 300
    assert learner.act(np.stack([S0, S1])).tolist() == [0, 0]


def test_the_dueling_head_learns_the_same_values() -> None:
    settings = LearnerSettings(hidden=(16,), lr=1e-2, gamma=0.9, batch_size=32, target_update_interval=20,
                               device="cpu", seed=0, dueling=True)
    learner = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    assert learner.online.mlp[-1].out_features == N_ACTIONS + 1
    buffer = filled()
    for _ in range(400):
        update_from(learner, buffer)
    np.testing.assert_allclose(learner.q_values(np.stack([S0, S1])), Q_STAR, atol=0.08)


def params(q: QNetwork) -> list[torch.Tensor]:
    return [p.detach().clone() for p in q.parameters()]


def test_hard_target_update_every_n_updates() -> None:
    learner = DQNLearner(
        LearnerSettings(hidden=(8,), lr=1e-2, target_update_interval=3, device="cpu", seed=1), FEATURE_DIM,
        N_ACTIONS,
    )
    buffer = filled(64, seed=1)
    initial = params(learner.target)
    for _ in range(2):
        learner.update(buffer.sample(16))
        assert all(torch.equal(a, b) for a, b in zip(params(learner.target), initial, strict=True))
    learner.update(buffer.sample(16))
    assert all(torch.equal(a, b) for a, b in zip(params(learner.target), params(learner.online), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(params(learner.target), initial, strict=True))


def test_polyak_target_update() -> None:
    tau = 0.25
    learner = DQNLearner(
        LearnerSettings(hidden=(8,), lr=1e-2, tau=tau, target_update_interval=1, device="cpu", seed=2),
        FEATURE_DIM, N_ACTIONS,
    )
    buffer = filled(64, seed=2)
    for _ in range(3):
        before = params(learner.target)
        learner.update(buffer.sample(16))
        for t, o, b in zip(params(learner.target), params(learner.online), before, strict=True):
            torch.testing.assert_close(t, (1 - tau) * b + tau * o)


def test_the_update_reports_each_rows_td_error() -> None:
    learner = DQNLearner(LearnerSettings(hidden=(8,), device="cpu", seed=3), FEATURE_DIM, N_ACTIONS)
    batch = filled(64, seed=3).sample(16)
    expected = row_loss(learner.online, learner.target, batch, 0.99, True)[1]
    learner.update(batch)
    torch.testing.assert_close(learner.td_abs, expected)


def test_state_dict_round_trip_continues_identically() -> None:
    settings = LearnerSettings(hidden=(8,), lr=1e-2, target_update_interval=5, device="cpu", seed=3)
    original = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    buffer = filled(64, seed=3)
    for _ in range(7):
        original.update(buffer.sample(16))
    restored = DQNLearner(settings.model_copy(update={"seed": 99}), FEATURE_DIM, N_ACTIONS)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)  # as a checkpoint holds it, read back with weights_only
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert restored.counters.updates == 7
    batch = buffer.sample(16)
    a, b = original.update(batch), restored.update(batch)
    assert a == b
    for p, q in zip(params(original.online), params(restored.online), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(params(original.target), params(restored.target), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_act_is_the_greedy_action_with_the_normalization() -> None:
    learner = DQNLearner(LearnerSettings(hidden=(8,), device="cpu", seed=4), 2, 3)
    learner.set_normalization(np.array([0.5, -1.0]), np.array([2.0, 0.5]), 3.0)
    states = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    np.testing.assert_array_equal(learner.act(states), learner.q_values(states).argmax(axis=1))
    assert learner.act(np.zeros((0, 2), np.float32)).shape == (0,)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)
    with pytest.raises(ValueError, match=name):
        DQNLearner(LearnerSettings(hidden=(4,), device=name), 2, 2)


# --- CUDA graphs -----------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def round_trip(state: dict[str, object]) -> dict[str, object]:
    """A learner state as a checkpoint gives it back: saved, then loaded with weights_only."""
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    loaded: dict[str, object] = torch.load(saved, weights_only=True)
    return loaded


def assert_same_learner(a: DQNLearner, b: DQNLearner, atol: float = 0.0, rtol: float = 0.0) -> None:
    for network in ("online", "target"):
        for p, q in zip(params(getattr(a, network)), params(getattr(b, network)), strict=True):
            torch.testing.assert_close(p, q, atol=atol, rtol=rtol)
    assert a.counters.updates == b.counters.updates


def test_cuda_graph_setting_changes_nothing_on_the_cpu() -> None:
    settings = LearnerSettings(hidden=(8,), lr=1e-2, target_update_interval=4, device="cpu", seed=5)
    graphed = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    eager = DQNLearner(settings.model_copy(update={"cuda_graph": False}), FEATURE_DIM, N_ACTIONS)
    assert graphed.graphed_step is None
    assert eager.graphed_step is None
    buffer = filled(64, seed=5)
    for _ in range(30):
        batch = buffer.sample(16)
        assert graphed.update(batch) == eager.update(batch)
    assert_same_learner(graphed, eager)


def test_a_checkpoint_keeps_the_loading_optimizers_own_flags() -> None:
    # A GPU learner's checkpoint says capturable (and maybe foreach); a CPU learner must keep its fused step.
    settings = LearnerSettings(hidden=(8,), lr=1e-2, device="cpu", seed=6)
    original = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    buffer = filled(64, seed=6)
    for _ in range(5):
        original.update(buffer.sample(16))
    state = original.state_dict()
    optimizer_state: dict[str, list[dict[str, object]]] = state["optimizer"]  # type: ignore[assignment]
    gpu_flags = {"capturable": True, "fused": None, "foreach": True}
    groups = [{**g, **gpu_flags} for g in optimizer_state["param_groups"]]
    state["optimizer"] = {**optimizer_state, "param_groups": groups}
    restored = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    restored.load_state_dict(round_trip(state))
    group = restored.optimizer.param_groups[0]
    assert (group["fused"], group["capturable"], group["foreach"]) == (True, False, None)
    batch = buffer.sample(16)
    assert original.update(batch) == restored.update(batch)
    assert_same_learner(original, restored)


def cuda_samples(seed: int, sizes: list[int]) -> list[RowBatch]:
    buffer = ReplayBuffer(256, "cuda", seed=seed)
    buffer.push(mdp_rows())
    return [RowBatch(*(t.clone() for t in buffer.sample(n))) for n in sizes]


@cuda_only
@pytest.mark.parametrize(
    ("tau", "weight_decay"), [(0.0, 0.0), (0.05, 0.0), (0.0, 1e-3)], ids=["hard-copy", "polyak", "adamw"]
)
def test_the_cuda_graph_update_matches_the_eager_one(tau: float, weight_decay: float) -> None:
    settings = LearnerSettings(
        hidden=(32, 32), lr=1e-2, tau=tau, weight_decay=weight_decay, target_update_interval=7,
        device="cuda", seed=7,
    )
    graphed = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    eager = DQNLearner(settings.model_copy(update={"cuda_graph": False}), FEATURE_DIM, N_ACTIONS)
    assert graphed.graphed_step is not None
    assert eager.graphed_step is None
    # Two batch sizes, and back: each gets its own graph, and all of them step the same optimizer state.
    first = cuda_samples(7, [16] * 15 + [32] * 10 + [16] * 5)
    for batch in first:
        np.testing.assert_allclose(graphed.update(batch), eager.update(batch), rtol=1e-5, atol=1e-6)
    assert graphed.graphed_step.captured
    assert graphed.graphed_step.error is None
    assert_same_learner(graphed, eager, atol=1e-6, rtol=1e-5)

    # Checkpoints either way round: the graphed learner restored from an eager one captures anew.
    from_eager = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    from_graphed = DQNLearner(settings.model_copy(update={"seed": 99}), FEATURE_DIM, N_ACTIONS)
    from_eager.load_state_dict(round_trip(eager.state_dict()))
    from_graphed.load_state_dict(round_trip(graphed.state_dict()))
    graphed.load_state_dict(round_trip(graphed.state_dict()))  # reloading must re-capture, not go stale
    for batch in cuda_samples(8, [16] * 25):
        expected = eager.update(batch)
        for learner in (graphed, from_eager, from_graphed):
            np.testing.assert_allclose(learner.update(batch), expected, rtol=1e-5, atol=1e-6)
    for learner in (graphed, from_eager, from_graphed):
        assert learner.graphed_step is not None
        assert learner.graphed_step.captured
        assert learner.optimizer.param_groups[0]["capturable"]
        assert_same_learner(learner, eager, atol=1e-6, rtol=1e-5)
    assert eager.counters.updates == 55


@cuda_only
def test_a_failed_capture_falls_back_to_eager_updates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_capture(*args: object, **kwargs: object) -> None:
        raise RuntimeError("capture refused")

    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    settings = LearnerSettings(hidden=(16,), lr=1e-2, target_update_interval=5, device="cuda", seed=8)
    graphed = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    eager = DQNLearner(settings.model_copy(update={"cuda_graph": False}), FEATURE_DIM, N_ACTIONS)
    with caplog.at_level("WARNING", logger="streamdqn.learning.graphs"):
        for batch in cuda_samples(9, [16] * 12 + [32] * 3):
            np.testing.assert_allclose(graphed.update(batch), eager.update(batch), rtol=1e-5, atol=1e-6)
    assert graphed.graphed_step is not None
    assert not graphed.graphed_step.captured
    assert graphed.graphed_step.error == "RuntimeError: capture refused"
    assert [r.getMessage() for r in caplog.records if r.name == "streamdqn.learning.graphs"] == [
        "CUDA graph capture failed; updates run eagerly from now on: RuntimeError: capture refused"
    ]
    assert_same_learner(graphed, eager, atol=1e-6, rtol=1e-5)
