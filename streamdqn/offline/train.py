"""Offline mode: train from a telemetry file through the same ingest pipeline the daemon runs. Reads
top to bottom.

    file -> records (one per line) -> the pipeline over all of them once: every reject reported
         -> for each training episode, in a fresh random order each pass over the file:
                its records -> the pipeline (decode, episodes, features, rows) -> replay -> updates
         -> every 10 episodes a progress line, every 50 a checkpoint
         -> ignore-margin calibration -> the final ONNX snapshot (and report.png)
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdqn.errors import ConfigError
from streamdqn.history import HistoryPoint, append_history
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.learning.learner import DQNLearner, update_from
from streamdqn.learning.replay.buffer import make_replay
from streamdqn.learning.settings import LearnerSettings
from streamdqn.offline.options import OfflineOptions, split_hyperparameters
from streamdqn.offline.report import plot_report
from streamdqn.progress import Progress
from streamdqn.snapshots.export import Provenance, publish_snapshot
from streamdqn.snapshots.store import Snapshot, SnapshotStore
from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.rows import ReplayRows
from streamdqn.stream.scoring import EpisodeBatch, metrics_of, replay
from streamdqn.stream.sources import Record, file_records
from streamdqn.stream.wire import ACTION_NAMES, Action, decode_batch

SHOWN_REJECTS = 5


@dataclass
class Agent:
    """A trained policy: the learner's networks, the normalizer and the reward table it learned under."""

    learner: DQNLearner
    normalizer: RunningNormalizer
    rewards: RewardTable

    def act(self, features: np.ndarray) -> np.ndarray:
        return self.learner.act(features)

    def q_values(self, features: np.ndarray) -> np.ndarray:
        return self.learner.q_values(features)

    def sync_normalization(self) -> None:
        n = self.normalizer
        self.learner.set_normalization(n.mean, n.std, n.clip)


@dataclass(frozen=True)
class LearnedEpisode:
    """What the pipeline learned from one episode: its rows' states in step order and its label."""

    features: np.ndarray
    malicious: bool
    severity: float


@dataclass
class FileReport:
    """What reading the file through the pipeline found."""

    records: int
    events: int
    episodes: int
    rejected: Counter[str] = field(default_factory=Counter)
    first_rejects: list[str] = field(default_factory=list)  # "line N: reason: detail"

    def summary(self, name: str) -> str:
        if not self.rejected:
            return f"{name}: {self.events} events of {self.episodes} episodes, none rejected"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.rejected.most_common())
        total = sum(self.rejected.values())
        lines = [f"{name}: {self.events} events of {self.episodes} episodes; rejected {total} ({reasons})"]
        lines += [f"  {line}" for line in self.first_rejects]
        return "\n".join(lines)


def read_training_file(
    telemetry_file: Path | None, seed: int, options: PipelineOptions
) -> tuple[list[list[Record]], FileReport]:
    """The file's records grouped by episode (in order of each episode's first record), and what the
    pipeline rejects of them. Without a file: 1,000 simulated episodes."""
    if telemetry_file is None:
        from streamdqn.offline.simulator import simulate, write_events

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "simulated.jsonl"
            write_events(path, simulate(1000, seed))
            records = file_records(path)
    else:
        records = file_records(Path(telemetry_file))
    report = _check_through_the_pipeline(records, options)
    decoded = decode_batch([r.value for r in records], [None] * len(records),
                           max_bytes=options.max_message_bytes, max_events=options.max_events_per_message)
    groups: dict[tuple[str, str], list[Record]] = {}
    placed: set[int] = set()
    events = decoded.events
    origins = decoded.origin.tolist()
    for r, sandbox, episode in zip(origins, events.sandbox_id, events.episode_id, strict=True):
        if r not in placed:  # a record of several events goes with its first event's episode
            placed.add(r)
            groups.setdefault((sandbox, str(episode)), []).append(records[r])
    return list(groups.values()), report


def _check_through_the_pipeline(records: Sequence[Record], options: PipelineOptions) -> FileReport:
    """Run every record through a throwaway pipeline once: what it consumes and rejects, by line."""
    pipeline = IngestPipeline(EpisodeTracker(), RunningNormalizer(), lambda rows: None, options)
    outcome = pipeline.process(records, now=0.0)
    pipeline.close_all()
    report = FileReport(len(records), outcome.events, pipeline.counters.episodes, outcome.rejected)
    for r, rejects in outcome.rejects.items():
        for reject in rejects:
            if len(report.first_rejects) < SHOWN_REJECTS:
                where = f"line {records[r].offset + 1}"
                if reject.position > 0:  # within a line that holds an array of events
                    where += f" [{reject.position}]"
                report.first_rejects.append(f"{where}: {reject.reason}: {reject.detail}"[:300])
    return report


def train(
    telemetry_file: str | Path | None = None,
    num_episodes: int = 500,
    feature_dim: int = FEATURE_DIM,
    action_dim: int = len(Action),
    *,
    state_dir: str | Path | None = "state",
    seed: int = 0,
    progress: bool = True,
    strict: bool = False,
    rewards: RewardTable | None = None,
    **hyperparameters: Any,
) -> tuple[Agent, list[float], list[float]]:
    """Train a DQN agent offline; returns (agent, return of the greedy policy on each trained episode,
    mean loss per episode).

    Cycles through the file's episodes in a fresh random order on each pass. Rejected records are
    reported (with `strict`, any reject is a ConfigError before training starts). With `state_dir`,
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
    bar = Progress(num_episodes, "training", unit="ep", enabled=progress)
    name = str(telemetry_file) if telemetry_file else "1,000 simulated episodes"
    path = Path(telemetry_file) if telemetry_file else None
    groups, report = read_training_file(path, seed, PipelineOptions())
    if strict and report.rejected:
        raise ConfigError(report.summary(name) + "\n(--strict: fix or drop these records, or leave it out)")
    bar.write(report.summary(name))
    if not groups:
        raise ConfigError(f"{name}: no valid events ({sum(report.rejected.values())} rejected)")

    table = rewards or RewardTable()
    learner = DQNLearner(settings, feature_dim, action_dim, clip=options.feature_clip)
    agent = Agent(learner, RunningNormalizer(feature_dim, clip=options.feature_clip), table)
    buffer = make_replay(options.replay_capacity, learner.device, prioritized=settings.prioritized,
                         alpha=settings.priority_alpha, beta=settings.priority_beta, seed=seed)
    fed: list[ReplayRows] = []

    def push(rows: ReplayRows) -> None:
        buffer.push(rows)
        fed.append(rows)

    # remember_closed=0: each pass over the file meets the same episodes again, as new ones.
    tracker = EpisodeTracker(table, gamma=settings.gamma, n_steps=settings.n_steps,
                             reward_clip=options.reward_clip, remember_closed=0)
    pipeline = IngestPipeline(tracker, agent.normalizer, push, PipelineOptions())
    order, calibration_groups = _split_calibration(groups, options, seed)
    checkpoints = CheckpointStore(Path(state_dir) / "checkpoints") if state_dir else None
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(len(order))

    episode_returns: list[float] = []
    episode_losses: list[float] = []
    learned: dict[int, LearnedEpisode] = {}  # by position in `order`, from the first pass
    update_budget = 0.0
    for i in range(num_episodes):
        if i and i % len(order) == 0:
            permutation = rng.permutation(len(order))
        position = int(permutation[i % len(order)])
        fed.clear()
        pipeline.process(order[position], now=float(i))
        pipeline.close_all()  # an episode without `final: true` ends with the file
        agent.sync_normalization()
        rows = ReplayRows.concat(fed)
        if rows.size:
            learned.setdefault(position, LearnedEpisode(rows.states, bool(rows.malicious[0]),
                                                        float(rows.severity[0])))

        losses = []
        if len(buffer) >= options.learning_starts:
            update_budget += options.updates_per_transition * rows.size
            while update_budget >= 1:
                losses.append(update_from(learner, buffer).loss)
                update_budget -= 1
        episode_returns.append(_greedy_return(agent, learned.get(position)) if rows.size else float("nan"))
        episode_losses.append(float(np.mean(losses)) if losses else float("nan"))
        bar.update()
        if (i + 1) % options.log_every == 0:
            _progress_line(bar, i + 1, episode_returns, episode_losses, options, learner, len(buffer),
                           pipeline.counters.transitions, Path(state_dir) if state_dir else None,
                           pipeline.counters.events_consumed)
        if checkpoints and (i + 1) % options.checkpoint_every == 0:
            checkpoints.save(_checkpoint(agent, i + 1, pipeline.counters.events_consumed))

    episodes = list(learned.values())
    if options.calibrate_ignore_margin and episodes:
        calibration = _episodes_of(calibration_groups, table, settings, options) or episodes
        margin, mean_return = calibrate_ignore_margin(agent, calibration)
        bar.write(f"ignore margin {margin:.3f}: mean return on {len(calibration)} calibration episodes "
                  f"{mean_return:+.3f}")
    bar.close()
    if checkpoints:
        checkpoints.save(_checkpoint(agent, num_episodes, pipeline.counters.events_consumed))
    if state_dir and episodes:
        snapshot = publish_final_snapshot(agent, episodes, Path(state_dir), pipeline.counters.events_consumed,
                                          buffer.total_pushed)
        spi = _samples_per_insert(learner, settings, pipeline.counters.transitions)
        append_history(Path(state_dir), HistoryPoint(
            time.time(), pipeline.counters.events_consumed, learner.counters.updates, float("nan"),
            float("nan"), spi, snapshot.version))
        plot_report(Path(state_dir), Path(state_dir) / "report.png")
    return agent, episode_returns, episode_losses


def _split_calibration(
    groups: list[list[Record]], options: OfflineOptions, seed: int
) -> tuple[list[list[Record]], list[list[Record]]]:
    """The training episodes, and those kept out of training for the ignore-margin calibration."""
    if not (options.calibrate_ignore_margin and options.calibration_fraction > 0):
        return groups, []
    shuffled = [groups[i] for i in np.random.default_rng(seed + 1).permutation(len(groups))]
    cut = max(1, int(len(groups) * options.calibration_fraction))
    return shuffled[cut:], shuffled[:cut]


def _episodes_of(
    groups: list[list[Record]], table: RewardTable, settings: LearnerSettings, options: OfflineOptions
) -> list[LearnedEpisode]:
    """Episodes of record groups as the pipeline featurizes them (no learning, its own normalizer)."""
    out: list[LearnedEpisode] = []
    collected: list[ReplayRows] = []
    tracker = EpisodeTracker(table, gamma=settings.gamma, reward_clip=options.reward_clip, remember_closed=0)
    pipeline = IngestPipeline(tracker, RunningNormalizer(), collected.append, PipelineOptions())
    for group in groups:
        collected.clear()
        pipeline.process(group, now=0.0)
        pipeline.close_all()
        rows = ReplayRows.concat(collected)
        if rows.size:
            out.append(LearnedEpisode(rows.states, bool(rows.malicious[0]), float(rows.severity[0])))
    return out


def _greedy_return(agent: Agent, episode: LearnedEpisode | None) -> float:
    if episode is None:
        return float("nan")
    batch = EpisodeBatch.of([episode])
    return float(replay(agent.act(batch.features), batch, agent.rewards).returns[0])


def _samples_per_insert(learner: DQNLearner, settings: LearnerSettings, rows: int) -> float:
    return learner.counters.updates * settings.batch_size / rows if rows else 0.0


def _progress_line(
    bar: Progress, done: int, returns: list[float], losses: list[float], options: OfflineOptions,
    learner: DQNLearner, buffered: int, rows: int, state_dir: Path | None, events: int,
) -> None:
    recent_returns = [x for x in returns[-options.log_every:] if not np.isnan(x)]
    recent_loss = [x for x in losses[-options.log_every:] if not np.isnan(x)]
    mean_return = float(np.mean(recent_returns)) if recent_returns else float("nan")
    mean_loss = float(np.mean(recent_loss)) if recent_loss else float("nan")
    spi = _samples_per_insert(learner, learner.settings, rows)
    bar.write(f"episode {done:>6}  greedy return {mean_return:+.3f}  avg loss {mean_loss:.4f}  "
              f"samples/insert {spi:.2f}  buffer {buffered}")
    if state_dir:
        point = HistoryPoint(time.time(), events, learner.counters.updates, mean_return, mean_loss, spi, 0)
        append_history(state_dir, point)


def _checkpoint(agent: Agent, episode: int, events: int) -> dict[str, object]:
    return {"learner": agent.learner.state_dict(), "normalizer": _normalizer_state(agent.normalizer),
            "rewards": agent.rewards.as_dict(), "episode": episode, "events_seen": events}


def _normalizer_state(normalizer: RunningNormalizer) -> dict[str, object]:
    state = normalizer.state()
    return {"count": state.count, "mean": state.mean, "m2": state.m2, "clip": state.clip}


def calibrate_ignore_margin(
    agent: Agent, episodes: Sequence[LearnedEpisode], grid: np.ndarray | None = None
) -> tuple[float, float]:
    """Pick the bias added to Q(ignore) that maximizes mean return on `episodes`, and set it.

    Responding is final while waiting is not, and a benign episode offers 8-30 chances for a small
    Q error to trigger a false positive; one calibrated margin counters that. Returns (margin, return).
    """
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
    agent: Agent, episodes: Sequence[LearnedEpisode], state_dir: Path, events: int, transitions: int
) -> Snapshot:
    batch = EpisodeBatch.of(list(episodes))
    metrics = metrics_of(replay(agent.act(batch.features), batch, agent.rewards), batch)
    probe = np.concatenate([e.features for e in episodes[:64]])
    learner = agent.learner
    provenance = Provenance(learner.counters.updates, events, transitions, agent.normalizer.count,
                            learner.settings.as_dict(), str(learner.device))
    return publish_snapshot(SnapshotStore(state_dir / "snapshots"), learner.online, probe, provenance,
                            rewards=agent.rewards, evaluation={"training_episodes": metrics.as_dict()})
