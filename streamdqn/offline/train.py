"""Offline mode: train from a telemetry file (the original pipeline). Reads top to bottom.

    events -> episodes -> for each episode: features, epsilon-greedy actions, transitions -> replay
           -> updates -> every 10 episodes a progress line, every 50 a checkpoint -> final ONNX snapshot
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdqn.errors import ConfigError
from streamdqn.history import HistoryPoint, append_history
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.offline.options import split_hyperparameters
from streamdqn.offline.report import plot_report
from streamdqn.progress import Progress
from streamdqn.snapshots.export import Provenance, publish_snapshot
from streamdqn.snapshots.store import Snapshot, SnapshotStore
from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import ACTION_NAMES, Action, read_events_file


@dataclass
class Agent:
    """A trained policy: the learner's networks, the normalizer and the reward table it learned under."""

    learner: DQNLearner
    normalizer: RunningNormalizer
    rewards: RewardTable

    def act(self, features: np.ndarray, *, explore: bool = False) -> np.ndarray:
        return self.learner.act(features, explore=explore)

    def q_values(self, features: np.ndarray) -> np.ndarray:
        return self.learner.q_values(features)

    def sync_normalization(self) -> None:
        n = self.normalizer
        self.learner.set_normalization(n.mean, n.std, n.clip)

    def state_dict(self) -> dict[str, object]:
        return {"learner": self.learner.state_dict(), "normalizer": self.normalizer.state_dict(),
                "rewards": self.rewards.as_dict()}


def load_episodes(telemetry_file: Path | None, seed: int) -> tuple[list[EpisodeData], int]:
    """Episodes of a telemetry file, or of 1,000 simulated ones when no file is given; and the reject
    count."""
    if telemetry_file is None:
        from streamdqn.offline.simulator import simulate, write_events

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "simulated.jsonl"
            write_events(path, simulate(1000, seed))
            decoded = read_events_file(path)
    else:
        decoded = read_events_file(Path(telemetry_file))
    episodes = split_episodes(decoded.events)
    if not episodes:
        raise ConfigError(f"{telemetry_file}: no valid events ({len(decoded.rejects)} rejected)")
    return episodes, len(decoded.rejects)


def _push(buffer: ReplayBuffer, batch: TransitionBatch) -> None:
    buffer.push(batch.states, batch.actions, batch.rewards, batch.next_states, batch.dones)


def train(
    telemetry_file: str | Path | None = None,
    num_episodes: int = 500,
    feature_dim: int = FEATURE_DIM,
    action_dim: int = len(Action),
    *,
    state_dir: str | Path | None = "state",
    seed: int = 0,
    progress: bool = True,
    rewards: RewardTable | None = None,
    **hyperparameters: Any,
) -> tuple[Agent, list[float], list[float]]:
    """Train a DQN agent offline; returns (agent, return per episode, mean loss per episode).

    Cycles through the file's episodes in a fresh random order on each pass. With `state_dir`,
    checkpoints go to state_dir/checkpoints and the final ONNX snapshot to state_dir/snapshots.
    """
    if feature_dim != FEATURE_DIM:
        raise ConfigError(f"feature_dim must be {FEATURE_DIM} (the feature spec's dimension), "
                          f"got {feature_dim}")
    if action_dim != len(Action):
        raise ConfigError(f"action_dim must be {len(Action)} ({', '.join(ACTION_NAMES)}), got {action_dim}")
    hyperparameters.setdefault("seed", seed)
    settings, options = split_hyperparameters(hyperparameters)
    if options.torch_threads > 0:
        torch.set_num_threads(options.torch_threads)
    episodes, _ = load_episodes(Path(telemetry_file) if telemetry_file else None, seed)
    calibration = episodes
    if options.calibrate_ignore_margin and options.calibration_fraction > 0:
        shuffled = [episodes[i] for i in np.random.default_rng(seed + 1).permutation(len(episodes))]
        cut = max(1, int(len(episodes) * options.calibration_fraction))
        calibration, episodes = shuffled[:cut], shuffled[cut:]

    table = rewards or RewardTable()
    learner = DQNLearner(settings, feature_dim, action_dim, clip=options.feature_clip)
    agent = Agent(learner, RunningNormalizer(feature_dim, clip=options.feature_clip), table)
    buffer = ReplayBuffer(options.replay_capacity, feature_dim, learner.device, seed=seed)
    tracker = EpisodeTracker(table, reward_clip=options.reward_clip, remember_closed=0)
    checkpoints = CheckpointStore(Path(state_dir) / "checkpoints") if state_dir else None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(episodes))

    episode_returns: list[float] = []
    episode_losses: list[float] = []
    events_seen = 0
    update_budget = 0.0
    bar = Progress(num_episodes, "training", unit="ep", enabled=progress)
    for i in range(num_episodes):
        bar.update()
        if i and i % len(episodes) == 0:
            order = rng.permutation(len(episodes))
        episode = episodes[order[i % len(episodes)]]

        observed, _ = tracker.observe(episode.events, now=float(i))
        agent.normalizer.update(observed.features)
        agent.sync_normalization()
        actions = learner.act(observed.features)
        batch = tracker.act(observed, actions)
        closing = tracker.close_all()  # an episode without `final: true` ends with the file
        _push(buffer, batch)
        _push(buffer, closing)
        learner.counters.acting_steps += len(batch) + len(closing)
        events_seen += len(observed.events)

        losses = []
        if len(buffer) >= options.learning_starts:
            update_budget += options.updates_per_transition * (len(batch) + len(closing))
            while update_budget >= 1:
                losses.append(learner.update(buffer.sample(settings.batch_size)).loss)
                update_budget -= 1
        episode_returns.append(sum(batch.episode_returns) + sum(closing.episode_returns))
        episode_losses.append(float(np.mean(losses)) if losses else float("nan"))

        if (i + 1) % options.log_every == 0:
            recent_loss = [x for x in episode_losses[-options.log_every :] if not np.isnan(x)]
            line = (
                f"episode {i + 1:>6}  avg reward {np.mean(episode_returns[-options.log_every:]):+.3f}  "
                f"avg loss {np.mean(recent_loss) if recent_loss else float('nan'):.4f}  "
                f"epsilon {learner.epsilon:.3f}  buffer {len(buffer)}"
            )
            bar.write(line)
            if state_dir:
                append_history(Path(state_dir), HistoryPoint(
                    time.time(), events_seen, learner.counters.updates,
                    float(np.mean(episode_returns[-options.log_every:])),
                    float(np.mean(recent_loss)) if recent_loss else float("nan"), learner.epsilon, 0))
        if checkpoints and (i + 1) % options.checkpoint_every == 0:
            checkpoints.save({**agent.state_dict(), "episode": i + 1, "events_seen": events_seen})

    if options.calibrate_ignore_margin:
        margin, mean_return = calibrate_ignore_margin(agent, calibration)
        bar.write(f"ignore margin {margin:.3f}: mean return on {len(calibration)} calibration episodes "
                  f"{mean_return:+.3f}")
    bar.close()
    if checkpoints:
        checkpoints.save({**agent.state_dict(), "episode": num_episodes, "events_seen": events_seen})
    if state_dir:
        snapshot = publish_final_snapshot(agent, episodes, Path(state_dir), events_seen, buffer.total_pushed)
        append_history(Path(state_dir), HistoryPoint(time.time(), events_seen, learner.counters.updates,
                                                     float("nan"), float("nan"), learner.epsilon,
                                                     snapshot.version))
        plot_report(Path(state_dir), Path(state_dir) / "report.png")
    return agent, episode_returns, episode_losses


def calibrate_ignore_margin(
    agent: Agent, episodes: Sequence[EpisodeData], grid: np.ndarray | None = None
) -> tuple[float, float]:
    """Pick the bias added to Q(ignore) that maximizes mean return on `episodes`, and set it.

    Responding is final while waiting is not, and a benign episode offers 8-30 chances for a small
    Q error to trigger a false positive; one calibrated margin counters that. Returns (margin, return).
    """
    from streamdqn.offline.evaluate import EpisodeBatch, metrics_of, replay

    batch = EpisodeBatch.of(list(episodes))
    q = agent.q_values(batch.features)
    best = (0.0, -np.inf)
    for margin in np.linspace(0.0, 1.0, 41) if grid is None else grid:
        shifted = q.copy()
        shifted[:, 0] += margin
        mean_return = metrics_of(replay(shifted.argmax(axis=1), batch, agent.rewards), batch).mean_return
        if mean_return > best[1] + 1e-9:
            best = (float(margin), mean_return)
    for network in (agent.learner.online, agent.learner.target):
        network.ignore_margin.fill_(best[0])
    return best


def publish_final_snapshot(
    agent: Agent, episodes: Sequence[EpisodeData], state_dir: Path, events: int, transitions: int
) -> Snapshot:
    from streamdqn.offline.evaluate import evaluate_policy

    metrics, _ = evaluate_policy(lambda x: agent.act(x), list(episodes), agent.rewards)
    probe = np.concatenate([e.features for e in episodes[:64]])
    learner = agent.learner
    provenance = Provenance(learner.counters.updates, events, transitions, agent.normalizer.count,
                            learner.settings.as_dict(), str(learner.device))
    return publish_snapshot(SnapshotStore(state_dir / "snapshots"), learner.online, probe, provenance,
                            rewards=agent.rewards, evaluation={"training_episodes": metrics.as_dict()})
