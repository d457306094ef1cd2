"""Offline evaluation: replay recorded episodes through a published snapshot and through baselines.

`evaluate()` scores a snapshot (onnxruntime, the sandboxes' own path) and the baselines (always
ignore, review at step 0, random, a per-step logistic-regression classifier, the label-aware oracle)
on the same held-out episodes with streamdqn.stream.scoring; `format_report` and
`EvaluationReport.as_dict` present the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamdqn.atomic import atomic_write_bytes
from streamdqn.errors import ConfigError, SnapshotError
from streamdqn.offline.baselines import (
    always_ignore,
    fit_logistic_baseline,
    oracle_policy,
    random_policy,
    review_at_step0,
)
from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.snapshots.layout import LATEST, MANIFEST_FILE, MODEL_FILE
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, Metrics, Outcomes, Policy, metrics_of, replay
from streamdqn.stream.wire import ACTION_NAMES, read_events_file

POLICY_NAMES: tuple[str, ...] = (
    "streamdqn", "always_ignore", "review_at_step0", "random", "logistic", "oracle"
)
ORACLE = "oracle"
SNAPSHOT_POLICY = "streamdqn"


@dataclass(frozen=True)
class Decision:
    """A policy's verdict on one episode: its first response and the telemetry step it came at.

    `sandbox_id` and `episode_id` are exactly as the events carried them (an integer id stays an
    integer), so a decisions file joins back to its telemetry file.
    """

    sandbox_id: str
    episode_id: int | str
    action: str  # an ACTION_NAMES entry; "ignore" when the policy never responded
    step: int | None  # the event's `step` field at the response; None when it never responded
    fit_baseline: bool = False  # the episode fitted the logistic baseline and is not in the metrics


def decisions_of(
    outcomes: Outcomes, episodes: Sequence[EpisodeData], fit: Sequence[bool] | None = None
) -> list[Decision]:
    """One Decision per episode, in episode order."""
    out = []
    marks = fit if fit is not None else [False] * len(episodes)
    for episode, first, action, mark in zip(episodes, outcomes.first_response, outcomes.action, marks,
                                            strict=True):
        step = episode.events[first].step if first >= 0 else None
        out.append(Decision(episode.sandbox_id, episode.events[0].episode_id, ACTION_NAMES[action], step,
                            mark))
    return out


def evaluate_policy(
    decide: Policy, episodes: Sequence[EpisodeData], rewards: RewardTable
) -> tuple[Metrics, list[Decision]]:
    """Replay episodes through a policy (one batched call over all their rows)."""
    batch = EpisodeBatch.of(episodes)
    return _evaluate_batch(decide, batch, episodes, rewards)


def _evaluate_batch(
    decide: Policy, batch: EpisodeBatch, episodes: Sequence[EpisodeData], rewards: RewardTable
) -> tuple[Metrics, list[Decision]]:
    outcomes = replay(decide(batch.features), batch, rewards)
    return metrics_of(outcomes, batch), decisions_of(outcomes, episodes)


def write_decisions(path: Path, decisions: Sequence[Decision]) -> None:
    """One JSON line per episode: {"sandbox_id", "episode_id", "action", "step", "fit_baseline"},
    written atomically."""
    lines = (json.dumps(asdict(d), separators=(",", ":")) + "\n" for d in decisions)
    atomic_write_bytes(Path(path), "".join(lines).encode())


def read_decisions(path: Path) -> list[Decision]:
    """The decisions a `write_decisions` file holds."""
    text = Path(path).read_text(encoding="utf-8")
    return [Decision(**json.loads(line)) for line in text.splitlines() if line.strip()]


def load_snapshot_model(path: Path) -> Path:
    """The model file a snapshot path names.

    `path` is one snapshot version directory (holding model.onnx), a snapshots directory (its
    `latest` version is used) or a .onnx file. Raises SnapshotError, saying what to pass, otherwise.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    latest = path / LATEST
    if latest.is_symlink() or latest.exists():
        model = latest / MODEL_FILE
        if model.is_file():
            return model.resolve()
        raise SnapshotError(
            f"{latest} points to a version without {MODEL_FILE}; pass a version directory "
            f"({path}/<version>) or publish a new snapshot with `streamdqn train`"
        )
    raise SnapshotError(
        f"{path} is neither a snapshot version directory (holding {MODEL_FILE}) nor a snapshots directory "
        f"(holding a `{LATEST}` link); pass <state-dir>/snapshots for the latest snapshot or "
        f"<state-dir>/snapshots/<version> for one version (`streamdqn train` publishes them)"
    )


def snapshot_version(model: Path) -> int | None:
    """The version its manifest gives a snapshot's model file, if the manifest is readable."""
    try:
        version = json.loads((Path(model).parent / MANIFEST_FILE).read_bytes()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def split_fit_evaluation(
    episodes: Sequence[EpisodeData], seed: int, fit_fraction: float
) -> tuple[list[EpisodeData], list[EpisodeData]]:
    """Split episodes at random (by `seed`) into the logistic baseline's fit split and the evaluation
    split; both keep the original order and neither is empty."""
    if not 0.0 < fit_fraction < 1.0:
        raise ConfigError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    n = len(episodes)
    if n < 2:
        raise ConfigError(
            f"need at least 2 episodes (one to fit the logistic baseline, one to evaluate), got {n}"
        )
    n_fit = min(max(round(n * fit_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    fit = np.sort(order[:n_fit])
    held_out = np.sort(order[n_fit:])
    return [episodes[i] for i in fit], [episodes[i] for i in held_out]


@dataclass(frozen=True)
class EvaluationReport:
    """The snapshot and every baseline on the same held-out episodes."""

    snapshot: str  # the model file evaluated
    snapshot_version: int | None
    events_file: str
    seed: int
    fit_fraction: float
    events: int
    rejects: int
    episodes: int
    fit_episodes: int
    evaluation_episodes: int
    logistic_threshold: float
    metrics: dict[str, Metrics]  # by policy name, in POLICY_NAMES order
    best_baseline: str  # the non-oracle baseline with the highest mean return
    gap_closed: float | None  # (snapshot - best) / (oracle - best baseline); None if no gap
    decisions: list[Decision] = field(repr=False)  # the snapshot's, one per episode of the file

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; the decisions are left out (see `write_decisions`)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("metrics", "decisions")}
        out["metrics"] = {name: m.as_dict() for name, m in self.metrics.items()}
        return out


def gap_closed(metrics: dict[str, Metrics]) -> tuple[str, float | None]:
    """The best non-oracle baseline and the share of its gap to the oracle the snapshot closes."""
    baselines = [n for n in metrics if n not in (SNAPSHOT_POLICY, ORACLE)]
    best = max(baselines, key=lambda n: metrics[n].mean_return)
    floor = metrics[best].mean_return
    span = metrics[ORACLE].mean_return - floor
    if span <= 0:
        return best, None
    return best, (metrics[SNAPSHOT_POLICY].mean_return - floor) / span


def evaluate(
    snapshot: Path,
    events_file: Path,
    *,
    seed: int = 0,
    fit_fraction: float = 0.3,
    rewards: RewardTable | None = None,
) -> EvaluationReport:
    """Evaluate a snapshot (a version or snapshots directory) and the baselines on a telemetry file.

    Invalid events are counted as rejects and skipped. A `fit_fraction` of the episodes, chosen by
    `seed`, fits the logistic baseline; every policy is evaluated on the rest.
    """
    table = rewards or RewardTable()
    model = load_snapshot_model(Path(snapshot))
    streamdqn_policy = OnnxPolicy(model)
    decoded = read_events_file(Path(events_file))
    episodes = split_episodes(decoded.events)
    if not episodes:
        raise ConfigError(f"{events_file}: no valid events ({len(decoded.rejects)} rejected)")
    fit, held_out = split_fit_evaluation(episodes, seed, fit_fraction)
    logistic = fit_logistic_baseline(fit, table, seed)
    policies: dict[str, Policy] = {
        SNAPSHOT_POLICY: streamdqn_policy,
        "always_ignore": always_ignore,
        "review_at_step0": review_at_step0,
        "random": random_policy(seed),
        "logistic": logistic,
        ORACLE: oracle_policy(held_out, table),
    }
    batch = EpisodeBatch.of(held_out)
    metrics = {name: _evaluate_batch(decide, batch, held_out, table)[0] for name, decide in policies.items()}
    # The snapshot's decision on every episode of the file, in file order; the fit ones are marked.
    fitted = {id(e) for e in fit}
    everything = EpisodeBatch.of(episodes)
    outcomes = replay(streamdqn_policy(everything.features), everything, table)
    decisions = decisions_of(outcomes, episodes, [id(e) in fitted for e in episodes])
    best, gap = gap_closed(metrics)
    return EvaluationReport(
        snapshot=str(model),
        snapshot_version=snapshot_version(model),
        events_file=str(events_file),
        seed=seed,
        fit_fraction=fit_fraction,
        events=len(decoded.events),
        rejects=len(decoded.rejects),
        episodes=len(episodes),
        fit_episodes=len(fit),
        evaluation_episodes=len(held_out),
        logistic_threshold=logistic.threshold,
        metrics=metrics,
        best_baseline=best,
        gap_closed=gap,
        decisions=decisions,
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(report: EvaluationReport) -> str:
    """The report as a readable table, one row per policy."""
    version = "" if report.snapshot_version is None else f" (version {report.snapshot_version})"
    any_metrics = next(iter(report.metrics.values()))
    lines = [
        f"snapshot  {report.snapshot}{version}",
        f"events    {report.events_file}: {report.events} events, {report.rejects} rejected",
        f"episodes  {report.episodes}: {report.fit_episodes} fit the logistic baseline "
        f"(threshold {report.logistic_threshold:.3f}), {report.evaluation_episodes} evaluated "
        f"({any_metrics.malicious_episodes} malicious), seed {report.seed}",
        "",
    ]
    header = (
        "policy", "mean return", "detection", "false pos", "benign review", "missed", "steps to response"
    )
    rows = [header]
    for name, m in report.metrics.items():
        steps = "-" if m.mean_steps_to_response is None else f"{m.mean_steps_to_response:.2f}"
        rows.append((
            name, f"{m.mean_return:+.4f}", _percent(m.detection_rate), _percent(m.false_positive_rate),
            _percent(m.benign_review_rate), _percent(m.missed_rate), steps,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        lines.append("  ".join(cells))
    best = report.metrics[report.best_baseline].mean_return
    gap = (
        "n/a (the oracle does no better than the best baseline)"
        if report.gap_closed is None
        else f"{report.gap_closed:.3f}"
    )
    lines += [
        "",
        f"gap closed: {gap}  (from the best baseline, {report.best_baseline} at {best:+.4f}, "
        f"to the oracle at {report.metrics[ORACLE].mean_return:+.4f})",
    ]
    return "\n".join(lines)
