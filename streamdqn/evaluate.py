"""Offline evaluation: replay recorded episodes through a published snapshot and through baselines.

Replaying an episode through a policy: the policy sees the episode's feature rows in step order and
the episode's outcome is its first non-ignore action (or no response). Its return under the reward
table is the ignore reward of every step before the response plus the response's reward at its step;
with no response, the ignore rewards of all steps, the last one getting the final-step reward.

A decision at a step depends only on that step's feature row (the running context is part of the
row), so a policy is a plain function of a feature matrix, and evaluating many episodes is one batched
call over all their rows:

    batch    = EpisodeBatch.of(episodes)          # rows of all episodes, concatenated
    actions  = decide(batch.features)             # Policy: [R, 30] -> [R] int64
    outcomes = replay(actions, batch, rewards)    # first response and return per episode

`evaluate()` does this for a snapshot (onnxruntime) and the baselines (always ignore, review at
step 0, random, a per-step logistic-regression classifier, the label-aware oracle) on the same
held-out episodes; `format_report` and `EvaluationReport.as_dict` present the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from streamdqn.atomic import atomic_write_bytes
from streamdqn.errors import ConfigError, SnapshotError
from streamdqn.features import FEATURE_DIM, FEATURE_NAMES
from streamdqn.snapshots import LATEST, MANIFEST_FILE, MODEL_FILE
from streamdqn.telemetry import ACTION_NAMES, Action, read_events_file
from streamdqn.transitions import EpisodeData, RewardTable, split_episodes

Policy = Callable[[np.ndarray], np.ndarray]
"""Feature rows float32 [R, 30] to one action per row, int64 [R] (0 ignore … 4 review)."""

POLICY_NAMES: tuple[str, ...] = (
    "streamdqn", "always_ignore", "review_at_step0", "random", "logistic", "oracle"
)
ORACLE = "oracle"
SNAPSHOT_POLICY = "streamdqn"
RESPONSES = (Action.CONTAIN, Action.TERMINATE, Action.QUARANTINE)
CLASS_NAMES: tuple[str, ...] = ("benign", "malicious_low", "malicious_mid", "malicious_high")
# A severity standing for each malicious class (the middle of its third), to ask the reward table
# which response it rewards most.
_CLASS_SEVERITY = (1 / 6, 1 / 2, 5 / 6)
_FIRST_STEP_SEEN = float(np.log1p(1.0))  # the `log_steps_seen` feature on an episode's first row
_STEPS_SEEN = FEATURE_NAMES.index("log_steps_seen")


# --- replaying episodes -----------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeBatch:
    """The rows of many episodes concatenated in episode order, each episode's rows in step order."""

    features: np.ndarray  # float32 [R, 30]
    group: np.ndarray  # int64 [R]: index of each row's episode
    position: np.ndarray  # int64 [R]: 0-based position of each row within its episode
    lengths: np.ndarray  # int64 [E]
    malicious: np.ndarray  # bool [E]
    severity: np.ndarray  # float64 [E]

    @classmethod
    def of(cls, episodes: Sequence[EpisodeData]) -> EpisodeBatch:
        """Concatenate episodes; raises ValueError for an empty list or an episode without rows."""
        if not episodes:
            raise ValueError("no episodes to evaluate")
        lengths = np.array([len(e.features) for e in episodes], dtype=np.int64)
        if (lengths == 0).any():
            raise ValueError("an episode has no rows")
        group = np.repeat(np.arange(len(episodes), dtype=np.int64), lengths)
        starts = np.cumsum(lengths) - lengths
        return cls(
            features=np.concatenate([e.features for e in episodes]).astype(np.float32, copy=False),
            group=group,
            position=np.arange(len(group), dtype=np.int64) - starts[group],
            lengths=lengths,
            malicious=np.array([e.malicious for e in episodes], dtype=bool),
            severity=np.array([e.severity for e in episodes], dtype=np.float64),
        )

    @property
    def rows(self) -> int:
        return len(self.group)

    def __len__(self) -> int:
        return len(self.lengths)


class Outcomes(NamedTuple):
    """What a policy did to each episode of a batch."""

    first_response: np.ndarray  # int64 [E]: position of the first non-ignore action, -1 if none
    action: np.ndarray  # int64 [E]: that action, IGNORE if none
    returns: np.ndarray  # float64 [E]: return under the reward table


def replay(actions: np.ndarray, batch: EpisodeBatch, rewards: RewardTable) -> Outcomes:
    """Outcome and return of each episode when `actions` (one per row of `batch`) are taken.

    Only the first non-ignore action of an episode counts: it ends the episode. Raises ValueError
    when `actions` does not hold one valid action per row.
    """
    actions = _checked_actions(actions, batch.rows)
    n = len(batch)
    responding_rows = np.flatnonzero(actions != Action.IGNORE)
    episodes_responding, first_index = np.unique(batch.group[responding_rows], return_index=True)
    first_row = responding_rows[first_index]
    first = np.full(n, -1, dtype=np.int64)
    first[episodes_responding] = batch.position[first_row]
    action = np.full(n, int(Action.IGNORE), dtype=np.int64)
    action[episodes_responding] = actions[first_row]

    # Rows up to the response (all rows without one) earn rewards; the response row earns its own.
    cutoff = np.where(first >= 0, first, batch.lengths)[batch.group]
    taken = np.where(batch.position == cutoff, actions, Action.IGNORE)
    final = batch.position == batch.lengths[batch.group] - 1
    per_row = rewards.rewards(taken, batch.malicious[batch.group], batch.severity[batch.group], final)
    counted = np.where(batch.position <= cutoff, per_row, 0.0)
    returns = np.bincount(batch.group, weights=counted, minlength=n)
    return Outcomes(first, action, returns)


def _checked_actions(actions: np.ndarray, rows: int) -> np.ndarray:
    out = np.asarray(actions)
    if out.shape != (rows,):
        raise ValueError(f"policy returned actions of shape {out.shape}, expected ({rows},)")
    if out.dtype.kind not in "iu" or (rows and (out.min() < 0 or out.max() >= len(Action))):
        raise ValueError(f"policy returned actions outside 0..{len(Action) - 1} (dtype {out.dtype})")
    return out.astype(np.int64, copy=False)


# --- metrics and decisions --------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """How a policy did on a set of episodes. A rate is None when no episode of its class exists."""

    episodes: int
    malicious_episodes: int
    mean_return: float
    detection_rate: float | None  # malicious episodes with any non-ignore action
    false_positive_rate: float | None  # benign episodes contained, terminated or quarantined
    benign_review_rate: float | None  # benign episodes sent to review
    missed_rate: float | None  # malicious episodes with no response
    mean_steps_to_response: float | None  # mean 0-based row position of the first response

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """A policy's verdict on one episode: its first response and the telemetry step it came at."""

    sandbox_id: str
    episode_id: str
    action: str  # an ACTION_NAMES entry; "ignore" when the policy never responded
    step: int | None  # the event's `step` field at the response; None when it never responded


def _rate(hits: np.ndarray, of: np.ndarray) -> float | None:
    total = int(of.sum())
    return float((hits & of).sum() / total) if total else None


def metrics_of(outcomes: Outcomes, batch: EpisodeBatch) -> Metrics:
    """Aggregate per-episode outcomes into Metrics."""
    malicious, benign = batch.malicious, ~batch.malicious
    responded = outcomes.first_response >= 0
    return Metrics(
        episodes=len(batch),
        malicious_episodes=int(malicious.sum()),
        mean_return=float(outcomes.returns.mean()),
        detection_rate=_rate(responded, malicious),
        false_positive_rate=_rate(np.isin(outcomes.action, RESPONSES), benign),
        benign_review_rate=_rate(outcomes.action == Action.REVIEW, benign),
        missed_rate=_rate(~responded, malicious),
        mean_steps_to_response=float(outcomes.first_response[responded].mean()) if responded.any() else None,
    )


def decisions_of(outcomes: Outcomes, episodes: Sequence[EpisodeData]) -> list[Decision]:
    """One Decision per episode, in episode order."""
    out = []
    for episode, first, action in zip(episodes, outcomes.first_response, outcomes.action, strict=True):
        step = episode.events[first].step if first >= 0 else None
        out.append(Decision(episode.sandbox_id, episode.episode_id, ACTION_NAMES[action], step))
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
    """Write one JSON line per episode: {"sandbox_id", "episode_id", "action", "step"}, atomically."""
    lines = (json.dumps(asdict(d), separators=(",", ":")) + "\n" for d in decisions)
    atomic_write_bytes(Path(path), "".join(lines).encode())


def read_decisions(path: Path) -> list[Decision]:
    """The decisions a `write_decisions` file holds."""
    text = Path(path).read_text(encoding="utf-8")
    return [Decision(**json.loads(line)) for line in text.splitlines() if line.strip()]


# --- the snapshot as a policy -----------------------------------------------------------------


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


class OnnxPolicy:
    """A published snapshot's greedy policy: the `action` output of its ONNX model (onnxruntime, CPU)."""

    def __init__(self, model_path: Path, *, threads: int = 1, chunk_rows: int = 65_536) -> None:
        self.model_path = Path(model_path)
        self.chunk_rows = chunk_rows
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), options, providers=["CPUExecutionProvider"]
            )
        # onnxruntime's errors (InvalidProtobuf, NoSuchFile, Fail…) derive from Exception directly.
        except Exception as exc:
            raise SnapshotError(f"{self.model_path}: onnxruntime cannot load it: {exc}") from exc
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        shape = inputs.get("features")
        if shape is None or len(shape) != 2 or shape[1] != FEATURE_DIM or "action" not in outputs:
            raise SnapshotError(
                f"{self.model_path}: expected input features[N, {FEATURE_DIM}] and output action[N], "
                f"found inputs {inputs} and outputs {sorted(outputs)}; re-export it with this streamdqn"
            )

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != FEATURE_DIM:
            raise ValueError(f"features must be [N, {FEATURE_DIM}], got {x.shape}")
        parts = [
            self._session.run(["action"], {"features": x[i : i + self.chunk_rows]})[0]
            for i in range(0, len(x), self.chunk_rows)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


# --- baselines --------------------------------------------------------------------------------


def always_ignore(features: np.ndarray) -> np.ndarray:
    """Never respond."""
    return np.zeros(len(features), dtype=np.int64)


def review_at_step0(features: np.ndarray) -> np.ndarray:
    """Send every episode to review on its first row (the row whose steps-seen count is 1)."""
    first = np.abs(features[:, _STEPS_SEEN] - _FIRST_STEP_SEEN) < 1e-4
    return np.where(first, int(Action.REVIEW), int(Action.IGNORE)).astype(np.int64)


def random_policy(seed: int) -> Policy:
    """Uniform over the five actions at every row; the same rows give the same actions for a seed."""

    def decide(features: np.ndarray) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, len(Action), size=len(features), dtype=np.int64)

    return decide


def oracle_policy(episodes: Sequence[EpisodeData], rewards: RewardTable) -> Policy:
    """The label-aware upper bound: ignore benign episodes, respond to malicious ones on their first row
    with `rewards.best_action`. It knows only these episodes: call it on their concatenated rows."""
    batch = EpisodeBatch.of(episodes)
    best = np.array([rewards.best_action(e.malicious, e.severity) for e in episodes], dtype=np.int64)
    actions = np.where(batch.position == 0, best[batch.group], int(Action.IGNORE)).astype(np.int64)

    def decide(features: np.ndarray) -> np.ndarray:
        if len(features) != len(actions):
            raise ValueError(f"the oracle knows {len(actions)} rows of its episodes, got {len(features)}")
        return actions

    return decide


def severity_class(malicious: np.ndarray, severity: np.ndarray) -> np.ndarray:
    """Class index per CLASS_NAMES: 0 benign, 1 + severity third for malicious."""
    third = np.clip((np.asarray(severity, dtype=np.float64) * 3).astype(np.int64), 0, 2)
    return np.where(np.asarray(malicious, dtype=bool), 1 + third, 0)


@dataclass(frozen=True)
class LogisticBaseline:
    """A per-step multinomial logistic regression over CLASS_NAMES, used as a policy.

    It responds at the first row where P(malicious) = 1 - P(benign) exceeds `threshold`, with the
    action the reward table prefers for the most probable malicious class.
    """

    mean: np.ndarray  # [30] standardization of the raw features
    std: np.ndarray  # [30]
    weights: np.ndarray  # [31, 4]; the last row is the bias
    threshold: float
    class_actions: np.ndarray  # int64 [4]: the response for each class (benign: ignore)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """P(class | row), float64 [N, 4]."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return _softmax(z @ self.weights[:-1] + self.weights[-1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        p = self.probabilities(features)
        return _threshold_actions(p, self.class_actions, self.threshold)


def _threshold_actions(p: np.ndarray, class_actions: np.ndarray, threshold: float) -> np.ndarray:
    matched = class_actions[1 + p[:, 1:].argmax(axis=1)]
    return np.where(1.0 - p[:, 0] > threshold, matched, int(Action.IGNORE)).astype(np.int64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e: np.ndarray = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def fit_logistic_baseline(
    episodes: Sequence[EpisodeData],
    rewards: RewardTable,
    seed: int,
    *,
    l2: float = 1e-3,
    max_rows: int = 200_000,
    threshold_grid: int = 101,
) -> LogisticBaseline:
    """Fit the per-step classifier on every row of `episodes` (labelled with its episode's class) and
    tune its threshold on the same episodes: the grid point (quantiles of P(malicious)) of the best
    mean return. `seed` picks the rows when there are more than `max_rows`."""
    batch = EpisodeBatch.of(episodes)
    labels = severity_class(batch.malicious, batch.severity)[batch.group]
    x = batch.features.astype(np.float64)
    rows = np.arange(batch.rows)
    if batch.rows > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(batch.rows, size=max_rows, replace=False))
    mean = x[rows].mean(axis=0)
    std = x[rows].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features carry no information; keep them at 0
    weights = _fit_softmax_regression((x[rows] - mean) / std, labels[rows], len(CLASS_NAMES), l2)
    class_actions = np.array(
        [int(Action.IGNORE), *(rewards.best_action(True, s) for s in _CLASS_SEVERITY)], dtype=np.int64
    )
    untuned = LogisticBaseline(mean, std, weights, 1.0, class_actions)
    probabilities = untuned.probabilities(batch.features)
    threshold = _tune_threshold(probabilities, class_actions, batch, rewards, threshold_grid)
    return LogisticBaseline(mean, std, weights, threshold, class_actions)


def _tune_threshold(
    p: np.ndarray, class_actions: np.ndarray, batch: EpisodeBatch, rewards: RewardTable, grid: int
) -> float:
    # Candidates: quantiles of P(malicious) over the rows, plus 1.0 (never respond). Ties go to the
    # lowest threshold, so the choice is deterministic.
    candidates = np.unique(np.append(np.quantile(1.0 - p[:, 0], np.linspace(0.0, 1.0, grid)), 1.0))
    scores = [
        replay(_threshold_actions(p, class_actions, t), batch, rewards).returns.mean() for t in candidates
    ]
    return float(candidates[int(np.argmax(scores))])


_BIAS_L2 = 1e-6  # a touch on the biases keeps the Hessian positive definite when a class is absent


def _fit_softmax_regression(
    x: np.ndarray, y: np.ndarray, classes: int, l2: float, *, max_iter: int = 50, tol: float = 1e-7
) -> np.ndarray:
    """Weights [d+1, classes] (bias last) minimizing mean cross-entropy + l2/2·|W|², by damped Newton.

    Newton on this strictly convex objective converges in a few dozen steps, deterministically; the
    backtracking line search keeps early steps on (nearly) separable data from overshooting.
    """
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(classes)[y]
    reg = np.full((d + 1, 1), l2)
    reg[-1] = _BIAS_L2

    def objective(w: np.ndarray) -> float:
        z = xb @ w
        top = z.max(axis=1)
        log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        return float((log_norm - z[np.arange(n), y]).mean() + 0.5 * (reg * w**2).sum())

    w = np.zeros((d + 1, classes))
    value = objective(w)
    for _ in range(max_iter):
        p = _softmax(xb @ w)
        grad = xb.T @ (p - onehot) / n + reg * w
        if np.abs(grad).max() < tol:
            break
        hessian = np.empty((d + 1, classes, d + 1, classes))
        for a in range(classes):
            for b in range(a, classes):
                coef = p[:, a] * (float(a == b) - p[:, b])
                block = (xb * coef[:, None]).T @ xb / n
                hessian[:, a, :, b] = block
                hessian[:, b, :, a] = block
        h = hessian.reshape((d + 1) * classes, -1) + np.diag(np.repeat(reg[:, 0], classes))
        step = np.linalg.solve(h, grad.ravel()).reshape(d + 1, classes)
        slope = float(grad.ravel() @ step.ravel())
        t = 1.0
        while True:
            candidate = w - t * step
            new_value = objective(candidate)
            if new_value <= value - 1e-4 * t * slope or t < 1e-8:
                break
            t /= 2
        w, value = candidate, new_value
    return w


# --- the whole evaluation ---------------------------------------------------------------------


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
    decisions: list[Decision] = field(repr=False)  # the snapshot's, one per evaluation episode

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
    metrics: dict[str, Metrics] = {}
    decisions: list[Decision] = []
    for name, decide in policies.items():
        metrics[name], policy_decisions = _evaluate_batch(decide, batch, held_out, table)
        if name == SNAPSHOT_POLICY:
            decisions = policy_decisions
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


# --- the publish gate -------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishGate:
    """When a candidate snapshot may replace `latest` (a data-poisoning guard).

    Evaluated on held-out recent episodes: the candidate's mean return must not be worse than the
    current latest's by more than `return_tolerance`, and it must stay within asymmetric-cost limits
    on benign false positives and missed malicious episodes.
    """

    min_episodes: int = 50
    return_tolerance: float = 0.05
    max_false_positive_rate: float = 0.2
    max_missed_rate: float = 0.5

    def check(self, candidate: Metrics, current: Metrics | None) -> tuple[bool, str]:
        """(publish?, why) for a candidate against the current latest (None: nothing published yet)."""
        fp = candidate.false_positive_rate or 0.0
        missed = candidate.missed_rate or 0.0
        if fp > self.max_false_positive_rate:
            return False, f"false-positive rate {fp:.3f} > {self.max_false_positive_rate}"
        if missed > self.max_missed_rate:
            return False, f"missed-malicious rate {missed:.3f} > {self.max_missed_rate}"
        if current is not None and candidate.mean_return < current.mean_return - self.return_tolerance:
            return False, (f"mean return {candidate.mean_return:+.3f} is worse than latest's "
                           f"{current.mean_return:+.3f} by more than {self.return_tolerance}")
        return True, "passed"


def evaluate_rows(decide: Policy, episodes: Sequence[EpisodeData], rewards: RewardTable) -> Metrics:
    """Metrics of a policy on episodes that only need features, labels and severity (no events)."""
    batch = EpisodeBatch.of(episodes)
    return metrics_of(replay(decide(batch.features), batch, rewards), batch)
