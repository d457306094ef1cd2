"""Quality target: does offline DQN, without labels, match the supervised stopping references?

The bar is the strongest policy a user could build *with the labels* from the same data: a
supervised classifier turned into a stopping rule (bench/_references.py: `hgb`, gradient-boosted
trees, and `mlp`, an early-stopped MLP; each responds when the expected reward of its best response
beats a threshold tuned on the training episodes). Target: the DQN's mean return, median over the
seeds, >= the strongest reference's median, with a false-positive rate (median) no higher than that
reference's.

For each seed (`--seeds 0,1,2`): train the DQN offline (streamdqn.offline.train.train) on the
training file, evaluate its snapshot with streamdqn.offline.evaluate.evaluate on the evaluation file
(which fits the logistic baseline on a 30 % split of it chosen by the seed and scores every baseline
on the rest), fit both references on the training file with its labels, and score them on the same
held-out evaluation episodes. Nothing is tuned on the evaluation episodes.

By default the data are simulated: 1,000 training episodes (seed 1), 2,000 evaluation episodes
(seed 2). `--train-file PATH --eval-file PATH` runs on any telemetry JSONL pair instead.

    python bench/quality.py            # the full target, 3 seeds (minutes on 2 CPU cores)
    python bench/quality.py --smoke    # the CI check that the pipeline runs end to end (2 seeds)
    python bench/quality.py --train-file train.jsonl --eval-file eval.jsonl --seeds 0

Exits 1 when a full run misses the target; `--smoke` never fails on it. The last line printed is
one JSON object with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _references import REFERENCE_NAMES, describe, fit_reference, reference_fitters

from streamdqn.offline.baselines import fit_logistic_baseline
from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.offline.evaluate import (
    ORACLE,
    SNAPSHOT_POLICY,
    EvaluationReport,
    evaluate,
    evaluate_policy,
    format_report,
    split_fit_evaluation,
)
from streamdqn.offline.importer import import_malbehavd
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.offline.train import train
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import Metrics
from streamdqn.stream.wire import read_events_file

TRAIN_SEED, EVAL_SEED = 1, 2
FULL_SEEDS, SMOKE_SEEDS = (0, 1, 2), (0, 1)


@dataclass(frozen=True)
class Scale:
    """How big a run is: episodes simulated for training and evaluation, and training episodes."""

    train_file_episodes: int
    eval_episodes: int
    train_episodes: int


FULL = Scale(train_file_episodes=1000, eval_episodes=2000, train_episodes=1000)
SMOKE = Scale(train_file_episodes=60, eval_episodes=100, train_episodes=30)


@dataclass(frozen=True)
class SeedResult:
    """One seed: every policy on the same held-out evaluation episodes, and what fitting each cost."""

    seed: int
    report: EvaluationReport  # evaluate()'s own: the snapshot and the baselines
    metrics: dict[str, Metrics]  # the report's policies with the references before the oracle
    fit_seconds: dict[str, float]  # by policy: the DQN's training, each reference's fit, logistic's fit
    reference_lines: list[str]


def _hyperparameter(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE parsed as JSON when it is JSON (numbers, lists, true), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI; does not check the target")
    parser.add_argument(
        "--train-episodes", type=int, help="DQN training episodes (default: one pass over the training file)"
    )
    parser.add_argument("--seeds", type=_seeds, help="seeds, each training the DQN and the references and "
                        "picking the logistic fit split (default 0,1,2; --smoke: 0,1)")
    parser.add_argument("--train-file", type=Path, help="telemetry JSONL to train on (with --eval-file; "
                        "default: simulated)")
    parser.add_argument("--eval-file", type=Path, help="telemetry JSONL to evaluate on (with --train-file)")
    parser.add_argument("--real", type=Path, metavar="CSV",
                        help="real behaviour: the MalBehavD-V1 CSV, imported (streamdqn import) and split by "
                        "sample into 70 %% training / 30 %% evaluation with a fixed hash of the sample")
    parser.add_argument("--reference-folds", type=int, default=5, help="cross-fitting folds for the "
                        "references' thresholds (0: tune on the rows they were fitted on; default 5)")
    parser.add_argument("--device", default="cpu", help="learner device: cpu, cuda or auto (default cpu)")
    parser.add_argument("--set", dest="hyper", type=_hyperparameter, action="append", default=[],
                        metavar="KEY=VALUE", help="a train() hyperparameter, e.g. --set lr=3e-4 (repeatable)")
    parser.add_argument("--workdir", type=Path, help="keep data and state here (default: a temp directory)")
    args = parser.parse_args(argv)
    if args.real is not None and (args.train_file is not None or args.eval_file is not None):
        parser.error("--real makes its own training and evaluation files: leave out --train-file/--eval-file")
    if args.real is not None and not args.real.is_file():
        parser.error(f"{args.real}: no such file")
    if (args.train_file is None) != (args.eval_file is None):
        parser.error("--train-file and --eval-file go together: pass both, or neither to simulate")
    for path in (args.train_file, args.eval_file):
        if path is not None and not path.is_file():
            parser.error(f"{path}: no such file")
    if args.reference_folds == 1 or args.reference_folds < 0:
        parser.error("--reference-folds must be 0 (in-sample) or at least 2")
    if args.seeds is None:
        args.seeds = SMOKE_SEEDS if args.smoke else FULL_SEEDS
    return args


def _episodes(path: Path) -> list[EpisodeData]:
    decoded = read_events_file(path)
    episodes = split_episodes(decoded.events)
    if not episodes:
        raise SystemExit(f"{path}: no valid events ({len(decoded.rejects)} rejected)")
    return episodes


def run_seed(
    seed: int, args: argparse.Namespace, workdir: Path, train_file: Path, eval_file: Path,
    training: list[EpisodeData], evaluation: list[EpisodeData], train_episodes: int, rewards: RewardTable,
) -> SeedResult:
    """Train and fit everything for one seed and score it on that seed's held-out evaluation episodes."""
    fit_seconds: dict[str, float] = {}
    started = time.perf_counter()
    hyper = {"device": args.device, **dict(args.hyper)}
    state_dir = workdir / f"state-seed{seed}"
    train(train_file, train_episodes, state_dir=state_dir, seed=seed, progress=False, rewards=rewards,
          **hyper)
    fit_seconds[SNAPSHOT_POLICY] = time.perf_counter() - started

    report = evaluate(state_dir / "snapshots", eval_file, seed=seed, rewards=rewards)
    fit_split, held_out = split_fit_evaluation(evaluation, seed, report.fit_fraction)
    if len(held_out) != report.evaluation_episodes:
        raise RuntimeError("this held-out split differs from evaluate()'s: they must be the same episodes")
    started = time.perf_counter()
    fit_logistic_baseline(fit_split, rewards, seed)  # timed only: evaluate() fitted its own on this split
    fit_seconds["logistic"] = time.perf_counter() - started

    references = {}
    for name, fitter in reference_fitters(rewards, smoke=args.smoke).items():
        started = time.perf_counter()
        references[name] = fit_reference(name, fitter, training, rewards, seed, folds=args.reference_folds)
        fit_seconds[name] = time.perf_counter() - started

    metrics = {n: m for n, m in report.metrics.items() if n != ORACLE}
    for name, reference in references.items():
        metrics[name], _ = evaluate_policy(reference, held_out, rewards)
    metrics[ORACLE] = report.metrics[ORACLE]
    lines = [describe(r) for r in references.values()]
    return SeedResult(seed, report, metrics, fit_seconds, lines)


def _spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def summarize(results: list[SeedResult]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per policy: median, min and max over the seeds of mean return and false-positive rate."""
    names = list(results[0].metrics)
    return {
        name: {
            "mean_return": _spread([r.metrics[name].mean_return for r in results]),
            "false_positive_rate": _spread([r.metrics[name].false_positive_rate for r in results]),
        }
        for name in names
    }


def verdict(summary: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, Any]:
    """The DQN against the reference of the highest median mean return."""
    def median(name: str, measure: str) -> float | None:
        return summary[name][measure]["median"]

    strongest = max(REFERENCE_NAMES, key=lambda n: median(n, "mean_return") or float("-inf"))
    ours, theirs = median(SNAPSHOT_POLICY, "mean_return"), median(strongest, "mean_return")
    assert ours is not None
    assert theirs is not None
    our_fp = median(SNAPSHOT_POLICY, "false_positive_rate")
    their_fp = median(strongest, "false_positive_rate")
    # None: no benign evaluation episode, so no false positive to compare.
    fp_margin = None if our_fp is None or their_fp is None else our_fp - their_fp
    fp_ok = None if fp_margin is None else fp_margin <= 0
    return {
        "strongest_reference": strongest,
        "return_margin": ours - theirs,
        "false_positive_margin": fp_margin,
        "dqn_median_ge_reference": ours >= theirs,
        "dqn_fp_le_reference": fp_ok,
        "target_met": ours >= theirs and fp_ok is not False,
    }


def _yes(value: bool | None) -> str:
    return "n/a (no benign episodes)" if value is None else ("yes" if value else "NO")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_summary(summary: dict[str, dict[str, dict[str, float | None]]], seeds: tuple[int, ...]) -> None:
    header = ("policy", "mean return median", "min..max", "false pos median", "min..max")
    rows = [header]
    for name, s in summary.items():
        r, fp = s["mean_return"], s["false_positive_rate"]
        rows.append((
            name, f"{r['median']:+.4f}", f"{r['min']:+.4f}..{r['max']:+.4f}",
            _percent(fp["median"]), f"{_percent(fp['min'])}..{_percent(fp['max'])}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"summary over seeds {','.join(map(str, seeds))}")
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        print("  ".join(cells))


def in_evaluation_split(episode_id: object) -> bool:
    """A fixed 30 % of the samples, by a hash of the episode (one sample per episode): the same split on
    every run and machine, chosen before anything is trained or scored."""
    digest = hashlib.sha256(f"malbehavd-split\0{episode_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < 0.3


def split_real(csv_path: Path, train_file: Path, eval_file: Path) -> None:
    """Import MalBehavD-V1 (each row a sample's API-call sequence, labelled) and split it by sample."""
    events = list(import_malbehavd([csv_path]).events())
    write_events(train_file, (e for e in events if not in_evaluation_split(e["episode_id"])))
    write_events(eval_file, (e for e in events if in_evaluation_split(e["episode_id"])))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run every seed; print the per-seed tables, the summary and the verdict; return the JSON results."""
    rewards = RewardTable()
    base = SMOKE if args.smoke else FULL
    if args.train_file is not None:
        train_file, eval_file = args.train_file, args.eval_file
    elif args.real is not None:
        train_file, eval_file = workdir / "real-train.jsonl", workdir / "real-evaluate.jsonl"
        split_real(args.real, train_file, eval_file)
    else:
        train_file, eval_file = workdir / "train.jsonl", workdir / "evaluate.jsonl"
        write_events(train_file, simulate(base.train_file_episodes, seed=TRAIN_SEED))
        write_events(eval_file, simulate(base.eval_episodes, seed=EVAL_SEED))
    training, evaluation = _episodes(train_file), _episodes(eval_file)
    one_pass = min(len(training), base.train_episodes) if args.smoke else len(training)
    train_episodes = args.train_episodes or one_pass

    results = []
    for seed in args.seeds:
        result = run_seed(seed, args, workdir, train_file, eval_file, training, evaluation, train_episodes,
                          rewards)
        results.append(result)
        print(f"== seed {seed}")
        print(format_report(replace(result.report, metrics=result.metrics)))
        for line in result.reference_lines:
            print(f"reference {line}")
        print("fit wall time: " + ", ".join(f"{n} {s:.1f} s" for n, s in result.fit_seconds.items()))
        print(flush=True)

    summary = summarize(results)
    print_summary(summary, args.seeds)
    judged = verdict(summary)
    strongest = judged["strongest_reference"]
    print()
    print(f"strongest reference: {strongest} (median mean return "
          f"{summary[strongest]['mean_return']['median']:+.4f})")
    print(f"DQN median >= strongest reference median: {_yes(judged['dqn_median_ge_reference'])} "
          f"(margin {judged['return_margin']:+.4f})")
    fp_margin = judged["false_positive_margin"]
    print(f"DQN FP <= that reference's FP: {_yes(judged['dqn_fp_le_reference'])}"
          + ("" if fp_margin is None else f" (margin {100 * fp_margin:+.1f} points)"))
    if args.smoke:
        print("smoke run: the target is not checked")
    else:
        print(f"quality target: {'MET' if judged['target_met'] else 'NOT MET'}")
    return {
        "bench": "quality",
        "smoke": args.smoke,
        "seeds": list(args.seeds),
        "device": args.device,
        "hyperparameters": dict(args.hyper),
        "train_file": str(args.train_file) if args.train_file else None,
        "eval_file": str(args.eval_file) if args.eval_file else None,
        "real": str(args.real) if args.real else None,
        "train_file_episodes": len(training),
        "train_episodes": train_episodes,
        "eval_file_episodes": len(evaluation),
        "reference_folds": args.reference_folds,
        "per_seed": [
            {
                "seed": r.seed,
                "evaluation_episodes": r.report.evaluation_episodes,
                "mean_return": {n: m.mean_return for n, m in r.metrics.items()},
                "metrics": {n: m.as_dict() for n, m in r.metrics.items()},
                "best_baseline": r.report.best_baseline,
                "gap_closed": r.report.gap_closed,
                "references": r.reference_lines,
                "fit_seconds": {n: round(s, 2) for n, s in r.fit_seconds.items()},
            }
            for r in results
        ],
        "summary": summary,
        **judged,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")
    started = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="streamdqn-quality-") as tmp:
            results = run(args, Path(tmp))
    results["command"] = command
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"wall time {results['wall_seconds']:.0f} s")
    print(json.dumps(results, allow_nan=False))
    return 0 if args.smoke or results["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
