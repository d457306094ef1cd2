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
(seed 2). `--train-file PATH --eval-file PATH` runs on any telemetry JSONL pair instead, `--real CSV`
on the imported MalBehavD-V1 samples.

**Ablation** (`--ablation`): the defaults and each learner improvement on its own (prioritized=true,
dueling=true, n_steps=3; `--variant SPEC` names others, e.g. `--variant n_steps=3,dueling=true`), all
on the same seeds and episodes; the references and baselines do not depend on the learner settings,
so they are fitted once per seed and shared by every variant. It ends with one markdown table: mean
return, detection, false positives and steps to response, median [min, max] over the seeds, and the
training time. `--combine LOG...` prints that table from the JSON lines of separate runs (e.g. one
`--set prioritized=true` run each), checking that they ran the same code on the same data and seeds.

    python bench/quality.py            # the full target, 3 seeds (minutes on 2 CPU cores)
    python bench/quality.py --smoke    # the CI check that the pipeline runs end to end (2 seeds)
    python bench/quality.py --ablation                     # defaults + 3 variants, 3 seeds
    python bench/quality.py --ablation --real MalBehavD-V1-dataset.csv
    python bench/quality.py --train-file train.jsonl --eval-file eval.jsonl --seeds 0
    python bench/quality.py --combine defaults.log prioritized.log

Detection counts the malicious episodes with any response, review included (Metrics.detection_rate);
false positives the benign episodes contained, terminated or quarantined; steps to response the mean
0-based step of the first non-ignore action over the episodes that got one. Training times are wall
times on whatever else the machine runs: compare them within one run only.

Exits 1 when a full run misses the target (with `--ablation`: when the defaults miss it); `--smoke`
never fails on it. The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
FIT_FRACTION = 0.3  # of the evaluation episodes, fitting the logistic baseline (evaluate()'s default)
MEASURES = ("mean_return", "detection_rate", "false_positive_rate", "mean_steps_to_response")
CONTEXT = (*REFERENCE_NAMES, "logistic", ORACLE)  # shown under the variants in the ablation table
HERE = Path(__file__).resolve().parent

Spread = dict[str, float | None]  # median, min, max over the seeds
Summary = dict[str, dict[str, Spread]]  # by policy, by measure (MEASURES and fit_seconds)


@dataclass(frozen=True)
class Scale:
    """How big a run is: episodes simulated for training and evaluation, and training episodes."""

    train_file_episodes: int
    eval_episodes: int
    train_episodes: int


FULL = Scale(train_file_episodes=1000, eval_episodes=2000, train_episodes=1000)
SMOKE = Scale(train_file_episodes=60, eval_episodes=100, train_episodes=30)


@dataclass(frozen=True)
class Variant:
    """Learner settings to measure: the name they go by in the tables and the train() values they set."""

    name: str
    hyperparameters: dict[str, Any]


DEFAULTS = Variant("defaults", {})
ABLATION = (
    DEFAULTS,
    Variant("prioritized=true", {"prioritized": True}),
    Variant("dueling=true", {"dueling": True}),
    Variant("n_steps=3", {"n_steps": 3}),
)


@dataclass(frozen=True)
class SeedReferences:
    """What one seed shares across variants: its held-out episodes and the references scored on them."""

    seed: int
    held_out: list[EpisodeData]
    metrics: dict[str, Metrics]  # by reference name
    fit_seconds: dict[str, float]  # logistic's fit and each reference's
    lines: list[str]


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


def _variant(text: str) -> Variant:
    """KEY=VALUE[,KEY=VALUE...]; a comma splits only before the next KEY=, so lists stay whole."""
    pairs = [_hyperparameter(part) for part in re.split(r",(?=[A-Za-z_]\w*=)", text)]
    return Variant(text, dict(pairs))


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {text!r}")
    return seeds


def variant_name(hyper: Sequence[tuple[str, Any]]) -> str:
    """The name a single run's --set values give its variant: "defaults" when there are none."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in hyper) or DEFAULTS.name


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
                        metavar="KEY=VALUE", help="a train() hyperparameter, e.g. --set lr=3e-4 (repeatable; "
                        "with --ablation, set in every variant)")
    parser.add_argument("--ablation", action="store_true", help="the defaults and each improvement on "
                        f"its own ({', '.join(v.name for v in ABLATION[1:])}), references shared per seed")
    parser.add_argument("--variant", dest="variants", type=_variant, action="append", default=[],
                        metavar="KEY=VALUE[,KEY=VALUE]", help="an ablation variant beside the defaults, "
                        "instead of the standard ones (repeatable; implies --ablation)")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="LOG",
                        help="print the ablation table from these runs' output (their last JSON line)")
    parser.add_argument("--workdir", type=Path, help="keep data and state here (default: a temp directory)")
    args = parser.parse_args(argv)
    if args.combine is not None:
        missing = [str(p) for p in args.combine if not p.is_file()]
        if missing:
            parser.error(f"no such file: {', '.join(missing)}")
        return args
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
    if args.variants:
        args.ablation = True
        args.variants = [DEFAULTS, *args.variants]
    elif args.ablation:
        args.variants = list(ABLATION)
    else:
        args.variants = [Variant(variant_name(args.hyper), {})]
    names = [v.name for v in args.variants]
    if len(set(names)) != len(names):
        parser.error(f"variants must differ: {', '.join(names)}")
    return args


def _episodes(path: Path) -> list[EpisodeData]:
    decoded = read_events_file(path)
    episodes = split_episodes(decoded.events)
    if not episodes:
        raise SystemExit(f"{path}: no valid events ({len(decoded.rejects)} rejected)")
    return episodes


def fit_references(
    seed: int, args: argparse.Namespace, training: list[EpisodeData], evaluation: list[EpisodeData],
    rewards: RewardTable,
) -> SeedReferences:
    """Fit both references on the training episodes (labels included) and score them on this seed's
    held-out evaluation episodes, the ones evaluate() scores every variant's snapshot on."""
    fit_split, held_out = split_fit_evaluation(evaluation, seed, FIT_FRACTION)
    fit_seconds: dict[str, float] = {}
    started = time.perf_counter()
    fit_logistic_baseline(fit_split, rewards, seed)  # timed only: evaluate() fits its own on this split
    fit_seconds["logistic"] = time.perf_counter() - started
    metrics, lines = {}, []
    for name, fitter in reference_fitters(rewards, smoke=args.smoke).items():
        started = time.perf_counter()
        reference = fit_reference(name, fitter, training, rewards, seed, folds=args.reference_folds)
        fit_seconds[name] = time.perf_counter() - started
        metrics[name], _ = evaluate_policy(reference, held_out, rewards)
        lines.append(describe(reference))
    return SeedReferences(seed, held_out, metrics, fit_seconds, lines)


def run_variant(
    variant: Variant, references: SeedReferences, args: argparse.Namespace, workdir: Path,
    train_file: Path, eval_file: Path, train_episodes: int, rewards: RewardTable,
) -> SeedResult:
    """Train the DQN with a variant's settings for one seed and score it beside the seed's references."""
    seed = references.seed
    hyper = {"device": args.device, **dict(args.hyper), **variant.hyperparameters}
    state_dir = workdir / f"state-{_slug(variant.name)}-seed{seed}"
    started = time.perf_counter()
    train(train_file, train_episodes, state_dir=state_dir, seed=seed, progress=False, rewards=rewards,
          **hyper)
    fit_seconds = {SNAPSHOT_POLICY: time.perf_counter() - started, **references.fit_seconds}

    report = evaluate(state_dir / "snapshots", eval_file, seed=seed, fit_fraction=FIT_FRACTION,
                      rewards=rewards)
    if report.evaluation_episodes != len(references.held_out):
        raise RuntimeError("this held-out split differs from evaluate()'s: they must be the same episodes")
    metrics = {n: m for n, m in report.metrics.items() if n != ORACLE}
    metrics.update(references.metrics)
    metrics[ORACLE] = report.metrics[ORACLE]
    return SeedResult(seed, report, metrics, fit_seconds, references.lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _spread(values: Sequence[float | None]) -> Spread:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def summarize(results: list[SeedResult]) -> Summary:
    """Per policy: median, min and max over the seeds of each of MEASURES and of the fit time."""
    summary: Summary = {}
    for name in results[0].metrics:
        measures = {m: _spread([getattr(r.metrics[name], m) for r in results]) for m in MEASURES}
        measures["fit_seconds"] = _spread([r.fit_seconds.get(name) for r in results])
        summary[name] = measures
    return summary


def verdict(summary: Summary) -> dict[str, Any]:
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


def _steps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _print_columns(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        print("  ".join(cells))


def print_summary(summary: Summary, seeds: tuple[int, ...]) -> None:
    header = ("policy", "mean return median", "min..max", "detection", "false pos median", "min..max",
              "steps to response", "fit time")
    rows: list[tuple[str, ...]] = [header]
    for name, s in summary.items():
        r, fp = s["mean_return"], s["false_positive_rate"]
        rows.append((
            name, f"{r['median']:+.4f}", f"{r['min']:+.4f}..{r['max']:+.4f}",
            _percent(s["detection_rate"]["median"]),
            _percent(fp["median"]), f"{_percent(fp['min'])}..{_percent(fp['max'])}",
            _steps(s["mean_steps_to_response"]["median"]), _seconds(s["fit_seconds"]["median"]),
        ))
    print(f"summary over seeds {','.join(map(str, seeds))} (medians; fit time: wall, this machine, this run)")
    _print_columns(rows)


def print_seed_table(seed: int, results: dict[str, SeedResult]) -> None:
    """One seed of an ablation: every variant's DQN, then the shared references and baselines."""
    first = next(iter(results.values()))
    episodes = first.report.evaluation_episodes
    malicious = first.metrics[ORACLE].malicious_episodes
    print(f"== seed {seed}: {episodes} held-out evaluation episodes ({malicious} malicious)")
    rows: list[tuple[str, ...]] = [
        ("policy", "mean return", "detection", "false pos", "steps to response", "fit time")]

    def row(label: str, m: Metrics, seconds: float | None) -> tuple[str, ...]:
        return (label, f"{m.mean_return:+.4f}", _percent(m.detection_rate), _percent(m.false_positive_rate),
                _steps(m.mean_steps_to_response), _seconds(seconds))

    for name, result in results.items():
        rows.append(row(f"{SNAPSHOT_POLICY} {name}", result.metrics[SNAPSHOT_POLICY],
                        result.fit_seconds[SNAPSHOT_POLICY]))
    for name, m in first.metrics.items():
        if name != SNAPSHOT_POLICY:
            rows.append(row(name, m, first.fit_seconds.get(name)))
    _print_columns(rows)
    for line in first.reference_lines:
        print(f"reference {line}")
    print(flush=True)


def _cell(spread: Spread, show: str) -> str:
    """median [min, max] in a measure's format; one value when the seeds agree."""
    if spread["median"] is None:
        return "-"
    formats: dict[str, Callable[[float], str]] = {
        "return": lambda v: f"{v:+.3f}", "percent": lambda v: f"{100 * v:.1f}",
        "steps": lambda v: f"{v:.2f}", "seconds": lambda v: f"{v:.0f}",
    }
    unit = {"percent": " %", "seconds": " s"}.get(show, "")
    f = formats[show]
    low, high = spread["min"], spread["max"]
    assert low is not None and high is not None
    median = f(spread["median"])
    if f(low) == f(high):
        return f"{median}{unit}"
    return f"{median}{unit} [{f(low)}, {f(high)}]"


def _context_label(name: str) -> str:
    if name in REFERENCE_NAMES:
        return f"`{name}` reference (labels)"
    if name == ORACLE:
        return "oracle (knows the label at step 0)"
    return f"{name} baseline"


def ablation_table(variants: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: each variant's DQN, then the references, logistic and the oracle for context."""
    def line(label: str, s: dict[str, Spread]) -> str:
        cells = (
            _cell(s["mean_return"], "return"), _cell(s["detection_rate"], "percent"),
            _cell(s["false_positive_rate"], "percent"), _cell(s["mean_steps_to_response"], "steps"),
            _cell(s["fit_seconds"], "seconds"),
        )
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = ["| variant | mean return | detection | false positives | steps to response | training time |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [line(f"streamdqn `{v['name']}`", v["summary"][SNAPSHOT_POLICY]) for v in variants]
    context = variants[0]["summary"]
    lines += [line(_context_label(name), context[name]) for name in CONTEXT if name in context]
    return lines


def print_ablation(variants: list[dict[str, Any]], seeds: Sequence[int], data: str, runs: int = 1) -> None:
    where = "in this run" if runs == 1 else f"in {runs} separate runs: compare with care"
    print(f"ablation on {data}, seeds {','.join(map(str, seeds))}: median [min, max] over the seeds; "
          f"training time: wall, on this machine {where}")
    print()
    for line in ablation_table(variants):
        print(line)
    print()
    for v in variants:
        fp = v["false_positive_margin"]
        print(f"{v['name']}: {v['return_margin']:+.4f} mean return against {v['strongest_reference']}"
              + ("" if fp is None else f", false positives {100 * fp:+.1f} points")
              + f": target {'MET' if v['target_met'] else 'not met'}")


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


def code_version() -> str | None:
    """The commit the bench and the package ran from, "-dirty" when either had uncommitted changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12", "--exclude", "*"],
            cwd=HERE, capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _data_name(args: argparse.Namespace) -> str:
    if args.real is not None:
        return f"real behaviour ({args.real.name})"
    if args.train_file is not None:
        return f"{args.train_file} / {args.eval_file}"
    return "the simulator (smoke sizes)" if args.smoke else "the simulator"


def _variant_json(variant: Variant, results: list[SeedResult]) -> dict[str, Any]:
    summary = summarize(results)
    return {
        "name": variant.name,
        "hyperparameters": variant.hyperparameters,
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
        **verdict(summary),
    }


def _print_verdict(summary: Summary, judged: dict[str, Any], smoke: bool) -> None:
    strongest = judged["strongest_reference"]
    print()
    print(f"strongest reference: {strongest} (median mean return "
          f"{summary[strongest]['mean_return']['median']:+.4f})")
    print(f"DQN median >= strongest reference median: {_yes(judged['dqn_median_ge_reference'])} "
          f"(margin {judged['return_margin']:+.4f})")
    fp_margin = judged["false_positive_margin"]
    print(f"DQN FP <= that reference's FP: {_yes(judged['dqn_fp_le_reference'])}"
          + ("" if fp_margin is None else f" (margin {100 * fp_margin:+.1f} points)"))
    if smoke:
        print("smoke run: the target is not checked")
    else:
        print(f"quality target: {'MET' if judged['target_met'] else 'NOT MET'}")


def run(args: argparse.Namespace, workdir: Path, version: str | None) -> dict[str, Any]:
    """Run every seed of every variant; print the tables and the verdict; return the JSON results.

    `version` is the code's (code_version()), read before anything ran."""
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

    results: dict[str, list[SeedResult]] = {v.name: [] for v in args.variants}
    for seed in args.seeds:
        references = fit_references(seed, args, training, evaluation, rewards)
        this_seed = {}
        for variant in args.variants:
            result = run_variant(variant, references, args, workdir, train_file, eval_file, train_episodes,
                                 rewards)
            results[variant.name].append(result)
            this_seed[variant.name] = result
        if args.ablation:
            print_seed_table(seed, this_seed)
            continue
        print(f"== seed {seed}")
        print(format_report(replace(result.report, metrics=result.metrics)))
        for line in result.reference_lines:
            print(f"reference {line}")
        print("fit wall time: " + ", ".join(f"{n} {s:.1f} s" for n, s in result.fit_seconds.items()))
        print(flush=True)

    variants = [_variant_json(v, results[v.name]) for v in args.variants]
    first = variants[0]
    if args.ablation:
        print_ablation(variants, args.seeds, _data_name(args))
    else:
        print_summary(first["summary"], args.seeds)
        _print_verdict(first["summary"], first, args.smoke)
    return {
        "bench": "quality",
        "smoke": args.smoke,
        "ablation": args.ablation,
        "code_version": version,
        "data": _data_name(args),
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
        # The first variant (the defaults) at the top level, as run_all.py and single runs read it.
        "per_seed": first["per_seed"],
        "summary": first["summary"],
        **verdict(first["summary"]),
        "variants": variants,
    }


def _last_json(path: Path) -> dict[str, Any]:
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            if result.get("bench") == "quality":
                return result
    raise SystemExit(f"{path}: no quality.py JSON line (did the run finish?)")


def combine(paths: Sequence[Path]) -> dict[str, Any]:
    """The ablation table of separate runs, which must share code, data, seeds and settings."""
    runs = [_last_json(p) for p in paths]
    same = ("code_version", "data", "seeds", "device", "train_episodes", "reference_folds", "smoke")
    for key in same:
        values = {json.dumps(r.get(key)) for r in runs}
        if len(values) > 1:
            raise SystemExit(f"these runs differ in {key}: {', '.join(sorted(values))}")
    if runs[0].get("code_version") is None or str(runs[0]["code_version"]).endswith("-dirty"):
        print(f"warning: code version {runs[0].get('code_version')}: not one clean commit")
    variants = [v for r in runs for v in r["variants"]]
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"a variant appears twice in these runs: {', '.join(names)}")
    shared = [{n: s["mean_return"] for n, s in r["summary"].items() if n != SNAPSHOT_POLICY} for r in runs]
    if any(s != shared[0] for s in shared):
        print("warning: the references and baselines differ between these runs; the table shows the first's")
    print(f"command(s): {'; '.join(r.get('command', '?') for r in runs)}")
    print_ablation(variants, runs[0]["seeds"], runs[0]["data"], len(runs))
    return {"bench": "quality", "combined": [str(p) for p in paths], "code_version": runs[0]["code_version"],
            "data": runs[0]["data"], "seeds": runs[0]["seeds"], "variants": variants}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")
    if args.combine is not None:
        print(json.dumps(combine(args.combine), allow_nan=False))
        return 0
    version = code_version()  # now: the tree may change while a long run goes on
    print(f"code version: {version}")
    started = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(args, args.workdir, version)
    else:
        with tempfile.TemporaryDirectory(prefix="streamdqn-quality-") as tmp:
            results = run(args, Path(tmp), version)
    results["command"] = command
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"wall time {results['wall_seconds']:.0f} s")
    print(json.dumps(results, allow_nan=False))
    return 0 if args.smoke or results["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
