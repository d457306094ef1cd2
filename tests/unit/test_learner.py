"""The learner: td_loss by hand, real updates on a tiny MDP, target updates, epsilon, state, devices."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from streamdqn.learning.learner import ActingPolicy, DQNLearner, epsilon_at, resolve_device, td_loss
from streamdqn.learning.model import QNetwork
from streamdqn.learning.replay.buffer import ReplayBuffer, ReplaySamples
from streamdqn.learning.settings import LearnerSettings


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # Tiny networks on a shared 2-core box: a second intra-op thread only adds contention (15x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_q(weight: list[list[float]], bias: list[float]) -> QNetwork:
    """A QNetwork with no hidden layer: Q(s) = W s + b, with identity normalization."""
    q = QNetwork(2, 2, hidden=())
    with torch.no_grad():
        q.mlp[0].weight.copy_(torch.tensor(weight))
        q.mlp[0].bias.copy_(torch.tensor(bias))
    return q


def samples(
    states: list[list[float]],
    actions: list[int],
    rewards: list[float],
    next_states: list[list[float]],
    dones: list[bool],
) -> ReplaySamples:
    return ReplaySamples(
        torch.tensor(states),
        torch.tensor(actions),
        torch.tensor(rewards),
        torch.tensor(next_states),
        torch.tensor(dones),
    )


def huber(d: np.ndarray) -> float:
    return float(np.mean(np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)))


@pytest.mark.parametrize("double_dqn", [True, False])
def test_td_loss_against_a_hand_computation(double_dqn: bool) -> None:
    w_online, b_online = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([0.0, 0.5])
    w_target, b_target = np.array([[3.0, 0.0], [0.0, 1.0]]), np.array([0.0, 0.0])
    online, target = (
        linear_q(w_online.tolist(), b_online.tolist()),
        linear_q(w_target.tolist(), b_target.tolist()),
    )
    s = np.array([[1.0, 1.0], [0.5, 0.0], [0.0, 1.0]])
    a = np.array([1, 0, 0])
    r = np.array([0.5, -1.0, 2.0])
    s2 = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    done = np.array([False, False, True])
    gamma = 0.9
    batch = samples(s.tolist(), a.tolist(), r.tolist(), s2.tolist(), done.tolist())

    q_online_s = s @ w_online.T + b_online
    q = q_online_s[np.arange(3), a]
    q_target_next = s2 @ w_target.T + b_target
    if double_dqn:  # the online network picks, the target network values
        pick = (s2 @ w_online.T + b_online).argmax(axis=1)
        next_q = q_target_next[np.arange(3), pick]
    else:
        next_q = q_target_next.max(axis=1)
    y = r + gamma * (~done) * next_q
    # Row 0: online picks action 1 (2.5 > 1), target values it 1; plain DQN takes the target's max 3.
    assert next_q[0] == (1.0 if double_dqn else 3.0)

    loss, td_abs, q_max = td_loss(online, target, batch, gamma, double_dqn)
    assert loss.item() == pytest.approx(huber(q - y), rel=1e-6)
    np.testing.assert_allclose(td_abs.numpy(), np.abs(q - y), rtol=1e-6)
    np.testing.assert_allclose(q_max.numpy(), q_online_s.max(axis=1), rtol=1e-6)
    assert not td_abs.requires_grad
    assert loss.requires_grad
    # The done row's target is its reward alone: whatever its next state's value is.
    assert abs(td_abs[2].item()) == pytest.approx(abs(q[2] - 2.0))


def test_td_loss_gradient_flows_only_into_the_online_network() -> None:
    online, target = linear_q([[1.0, 0.0], [0.0, 1.0]], [0, 0]), linear_q([[1.0, 1.0], [1.0, 1.0]], [0, 0])
    loss, _, _ = td_loss(online, target, samples([[1.0, 0.0]], [0], [1.0], [[0.0, 1.0]], [False]), 0.99, True)
    loss.backward()
    assert online.mlp[0].weight.grad is not None
    assert target.mlp[0].weight.grad is None


# --- real updates ----------------------------------------------------------------------------------

S0, S1 = [1.0, 0.0], [0.0, 1.0]


def two_state_mdp(buffer: ReplayBuffer) -> None:
    """s0: a0 -> s1 (r 0), a1 -> end (r 1).  s1: a0 -> end (r 2), a1 -> end (r -1).  Q*(s0) = [2 gamma, 1]."""
    for _ in range(16):
        buffer.push(
            np.array([S0, S0, S1, S1], dtype=np.float32),
            np.array([0, 1, 0, 1]),
            np.array([0.0, 1.0, 2.0, -1.0]),
            np.array([S1, S0, S1, S1], dtype=np.float32),
            np.array([False, True, True, True]),
        )


def test_a_few_hundred_updates_learn_the_right_q_ordering() -> None:
    settings = LearnerSettings(
        hidden=(16,), lr=1e-2, gamma=0.9, batch_size=32, target_update_interval=20, device="cpu", seed=0
    )
    learner = DQNLearner(settings, obs_dim=2, n_actions=2)
    buffer = ReplayBuffer(256, 2, "cpu", seed=0)
    two_state_mdp(buffer)
    losses = [learner.update(buffer.sample(settings.batch_size)).loss for _ in range(200)]
    q = learner.q_values(np.array([S0, S1], dtype=np.float32))
    assert q[0, 0] > q[0, 1]
    assert q[1, 0] > q[1, 1]
    np.testing.assert_allclose(q, [[1.8, 1.0], [2.0, -1.0]], atol=0.05)
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
    assert learner.counters.updates == 200
    assert learner.act(np.array([S0, S1], dtype=np.float32), explore=False).tolist() == [0, 0]


def params(q: QNetwork) -> list[torch.Tensor]:
    return [p.detach().clone() for p in q.parameters()]


def test_hard_target_update_every_n_updates() -> None:
    learner = DQNLearner(
        LearnerSettings(hidden=(8,), lr=1e-2, target_update_interval=3, device="cpu", seed=1), 2, 2
    )
    buffer = ReplayBuffer(64, 2, "cpu", seed=1)
    two_state_mdp(buffer)
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
        LearnerSettings(hidden=(8,), lr=1e-2, tau=tau, target_update_interval=1, device="cpu", seed=2), 2, 2
    )
    buffer = ReplayBuffer(64, 2, "cpu", seed=2)
    two_state_mdp(buffer)
    for _ in range(3):
        before = params(learner.target)
        learner.update(buffer.sample(16))
        for t, o, b in zip(params(learner.target), params(learner.online), before, strict=True):
            torch.testing.assert_close(t, (1 - tau) * b + tau * o)


def test_epsilon_schedule() -> None:
    s = LearnerSettings(epsilon_start=1.0, epsilon_end=0.1, epsilon_decay_steps=100)
    assert epsilon_at(0, s) == 1.0
    assert epsilon_at(50, s) == pytest.approx(0.55)
    assert epsilon_at(100, s) == pytest.approx(0.1)
    assert epsilon_at(10_000, s) == pytest.approx(0.1)
    assert epsilon_at(5, LearnerSettings(epsilon_end=0.05, epsilon_decay_steps=0)) == 0.05
    learner = DQNLearner(LearnerSettings(hidden=(4,), epsilon_decay_steps=100, device="cpu", seed=0), 2, 2)
    learner.counters.acting_steps = 50
    assert learner.epsilon == pytest.approx(0.55)


def test_exploration_follows_epsilon() -> None:
    states = np.tile(np.array([S0], dtype=np.float32), (2000, 1))
    greedy_only = DQNLearner(
        LearnerSettings(hidden=(4,), epsilon_start=0.0, epsilon_end=0.0, device="cpu", seed=0), 2, 5
    )
    chosen = greedy_only.act(states)
    assert len(set(chosen.tolist())) == 1
    uniform = LearnerSettings(
        hidden=(4,), epsilon_start=1.0, epsilon_end=1.0, explore_ignore_probability=None, device="cpu", seed=0
    )
    random_only = DQNLearner(uniform, 2, 5)
    counts = np.bincount(random_only.act(states), minlength=5)
    assert counts.min() > 300  # uniform over the five actions
    assert random_only.act(np.zeros((0, 2), np.float32)).shape == (0,)
    mostly_ignore = DQNLearner(uniform.model_copy(update={"explore_ignore_probability": 0.8}), 2, 5)
    counts = np.bincount(mostly_ignore.act(states), minlength=5)
    assert 1500 < counts[0] < 1700
    assert counts[1:].min() > 60
    default = LearnerSettings().explore_ignore_probability
    watching = DQNLearner(uniform.model_copy(update={"explore_ignore_probability": default}), 2, 5)
    assert (watching.act(states) == 0).all()  # the default explores by watching longer


def test_state_dict_round_trip_continues_identically() -> None:
    settings = LearnerSettings(hidden=(8,), lr=1e-2, target_update_interval=5, device="cpu", seed=3)
    original = DQNLearner(settings, 2, 2)
    buffer = ReplayBuffer(64, 2, "cpu", seed=3)
    two_state_mdp(buffer)
    for _ in range(7):
        original.update(buffer.sample(16))
    original.counters.acting_steps = 123
    restored = DQNLearner(
        LearnerSettings(hidden=(8,), lr=1e-2, target_update_interval=5, device="cpu", seed=99), 2, 2
    )
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)  # as a checkpoint holds it, read back with weights_only
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert (restored.counters.updates, restored.counters.acting_steps) == (7, 123)
    batch = buffer.sample(16)
    a, b = original.update(batch), restored.update(batch)
    assert a == b
    for p, q in zip(params(original.online), params(restored.online), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(params(original.target), params(restored.target), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_acting_policy_follows_loaded_weights_and_normalization() -> None:
    settings = LearnerSettings(hidden=(8,), epsilon_start=0.0, epsilon_end=0.0, device="cpu", seed=4)
    learner = DQNLearner(settings, 2, 3)
    learner.set_normalization(np.array([0.5, -1.0]), np.array([2.0, 0.5]), 3.0)
    policy = ActingPolicy(settings, 2, 3)
    policy.load_weights(learner.online.state_dict(), version=7)
    states = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    assert policy.weights_version == 7
    np.testing.assert_array_equal(policy.act(states), learner.act(states, explore=False))


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
    graphed = DQNLearner(settings, 2, 2)
    eager = DQNLearner(settings.model_copy(update={"cuda_graph": False}), 2, 2)
    assert graphed.graphed_step is None
    assert eager.graphed_step is None
    buffer = ReplayBuffer(64, 2, "cpu", seed=5)
    two_state_mdp(buffer)
    for _ in range(30):
        batch = buffer.sample(16)
        assert graphed.update(batch) == eager.update(batch)
    assert_same_learner(graphed, eager)


def test_a_checkpoint_keeps_the_loading_optimizers_own_flags() -> None:
    # A GPU learner's checkpoint says capturable (and maybe foreach); a CPU learner must keep its fused step.
    settings = LearnerSettings(hidden=(8,), lr=1e-2, device="cpu", seed=6)
    original = DQNLearner(settings, 2, 2)
    buffer = ReplayBuffer(64, 2, "cpu", seed=6)
    two_state_mdp(buffer)
    for _ in range(5):
        original.update(buffer.sample(16))
    state = original.state_dict()
    optimizer_state: dict[str, list[dict[str, object]]] = state["optimizer"]  # type: ignore[assignment]
    gpu_flags = {"capturable": True, "fused": None, "foreach": True}
    groups = [{**g, **gpu_flags} for g in optimizer_state["param_groups"]]
    state["optimizer"] = {**optimizer_state, "param_groups": groups}
    restored = DQNLearner(settings, 2, 2)
    restored.load_state_dict(round_trip(state))
    group = restored.optimizer.param_groups[0]
    assert (group["fused"], group["capturable"], group["foreach"]) == (True, False, None)
    batch = buffer.sample(16)
    assert original.update(batch) == restored.update(batch)
    assert_same_learner(original, restored)


def cuda_samples(seed: int, sizes: list[int]) -> list[ReplaySamples]:
    buffer = ReplayBuffer(256, 2, "cuda", seed=seed)
    two_state_mdp(buffer)
    return [ReplaySamples(*(t.clone() for t in buffer.sample(n))) for n in sizes]


@cuda_only
@pytest.mark.parametrize(
    "tau, weight_decay", [(0.0, 0.0), (0.05, 0.0), (0.0, 1e-3)], ids=["hard-copy", "polyak", "adamw"]
)
def test_the_cuda_graph_update_matches_the_eager_one(tau: float, weight_decay: float) -> None:
    settings = LearnerSettings(
        hidden=(32, 32), lr=1e-2, tau=tau, weight_decay=weight_decay, target_update_interval=7,
        device="cuda", seed=7,
    )
    graphed = DQNLearner(settings, 2, 2)
    eager = DQNLearner(settings.model_copy(update={"cuda_graph": False}), 2, 2)
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
    from_eager = DQNLearner(settings, 2, 2)
    from_graphed = DQNLearner(settings.model_copy(update={"seed": 99}), 2, 2)
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
    graphed = DQNLearner(settings, 2, 2)
    eager = DQNLearner(settings.model_copy(update={"cuda_graph": False}), 2, 2)
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
