"""Quality target: does offline DQN beat every baseline and close half the gap to the oracle?

Trains offline (streamdqn.offline.train.train) on 1,000 simulated episodes (seed 1), publishes the final
snapshot, and evaluates it with streamdqn.offline.evaluate.evaluate on 2,000 fresh episodes (seed 2), where
the baselines (logistic regression included) are fitted and scored on the same splits. The target:
mean return above every non-oracle baseline, and gap_closed >= 0.5. Exits 1 when the full run
misses it; `--smoke` runs a tiny version in seconds for CI and never fails on the target.

    python bench/quality.py            # the full target (minutes on 2 CPU cores)
    python bench/quality.py --smoke    # the CI check that the pipeline runs end to end

The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamdqn.offline.evaluate import ORACLE, SNAPSHOT_POLICY, EvaluationReport, evaluate, format_report
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.offline.train import train

TARGET_GAP = 0.5
TRAIN_SEED, EVAL_SEED = 1, 2


@dataclass(frozen=True)
class Scale:
    """How big a run is: episodes simulated for training and evaluation, and training episodes."""

    train_file_episodes: int
    eval_episodes: int
    train_episodes: int


FULL = Scale(train_file_episodes=1000, eval_episodes=2000, train_episodes=1000)
SMOKE = Scale(train_file_episodes=60, eval_episodes=100, train_episodes=30)


def _hyperparameter(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE parsed as JSON when it is JSON (numbers, lists, true), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI; does not check the target")
    parser.add_argument(
        "--train-episodes", type=int, help="training episodes (default: one pass over the file)"
    )
    parser.add_argument("--seed", type=int, default=0, help="training and evaluation-split seed (default 0)")
    parser.add_argument("--device", default="cpu", help="learner device: cpu, cuda or auto (default cpu)")
    parser.add_argument("--set", dest="hyper", type=_hyperparameter, action="append", default=[],
                        metavar="KEY=VALUE", help="a train() hyperparameter, e.g. --set lr=3e-4 (repeatable)")
    parser.add_argument("--workdir", type=Path, help="keep data and state here (default: a temp directory)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Simulate, train, evaluate; print the table and verdict; return the JSON-ready results."""
    base = SMOKE if args.smoke else FULL
    scale = Scale(base.train_file_episodes, base.eval_episodes, args.train_episodes or base.train_episodes)
    train_file, eval_file = workdir / "train.jsonl", workdir / "evaluate.jsonl"
    write_events(train_file, simulate(scale.train_file_episodes, seed=TRAIN_SEED))
    write_events(eval_file, simulate(scale.eval_episodes, seed=EVAL_SEED))

    started = time.perf_counter()
    hyper = {"device": args.device, **dict(args.hyper)}
    state_dir = workdir / "state"
    train(train_file, scale.train_episodes, state_dir=state_dir, seed=args.seed, progress=False, **hyper)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    report = evaluate(state_dir / "snapshots", eval_file, seed=args.seed)
    evaluate_seconds = time.perf_counter() - started

    verdict = _verdict(report)
    print(format_report(report))
    print()
    print(f"beats every baseline (logistic included): {_yes(verdict['beats_every_baseline'])}")
    print(f"closes >= {TARGET_GAP:.0%} of the gap to the oracle: {_yes(verdict['closes_half_gap'])}")
    if args.smoke:
        print("smoke run: the target is not checked")
    else:
        print(f"quality target: {'MET' if verdict['target_met'] else 'NOT MET'}")
    print(f"train {train_seconds:.1f} s, evaluate {evaluate_seconds:.1f} s")
    return {
        "bench": "quality",
        "smoke": args.smoke,
        "seed": args.seed,
        "device": args.device,
        "hyperparameters": dict(args.hyper),
        "train_file_episodes": scale.train_file_episodes,
        "train_episodes": scale.train_episodes,
        "eval_file_episodes": scale.eval_episodes,
        "evaluation_episodes": report.evaluation_episodes,
        "mean_return": {name: m.mean_return for name, m in report.metrics.items()},
        "metrics": {name: m.as_dict() for name, m in report.metrics.items()},
        "best_baseline": report.best_baseline,
        "gap_closed": report.gap_closed,
        **verdict,
        "train_seconds": round(train_seconds, 2),
        "evaluate_seconds": round(evaluate_seconds, 2),
    }


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def _verdict(report: EvaluationReport) -> dict[str, bool]:
    ours = report.metrics[SNAPSHOT_POLICY].mean_return
    baselines = [m.mean_return for n, m in report.metrics.items() if n not in (SNAPSHOT_POLICY, ORACLE)]
    beats = all(ours > b for b in baselines)
    closes = report.gap_closed is not None and report.gap_closed >= TARGET_GAP
    return {"beats_every_baseline": beats, "closes_half_gap": closes, "target_met": beats and closes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="streamdqn-quality-") as tmp:
            results = run(args, Path(tmp))
    results["command"] = command
    print(json.dumps(results, allow_nan=False))
    return 0 if args.smoke or results["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
