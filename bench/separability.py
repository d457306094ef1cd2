"""How much the simulated data allows: supervised classifiers on the 30 features, scored two ways.

Context for bench/quality.py, on the same data (1,000 training episodes from seed 1; the 1,400
held-out episodes of seed 2 that `streamdqn evaluate` scores with seed 0):

1. accuracy by step of a linear and a 256-256 MLP classifier trained on every row with its label:
   no policy can respond correctly earlier than the evidence allows;
2. the **supervised stopping references** of bench/_references.py (`hgb`: gradient-boosted trees,
   `mlp`: an early-stopped 128-128 MLP), which respond at the first step where the best expected
   reward beats a threshold tuned on the training episodes. They learn from the labels, which the
   DQN never sees, so they show how much of the gap to the oracle these 1,000 episodes support.
   bench/quality.py scores the same references next to the DQN over several seeds.

    python bench/separability.py            # about a minute on 2 cores
    python bench/separability.py --smoke    # seconds, for CI

The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from _references import Scaler, classifier, describe, fit_classifier, fit_reference, reference_fitters

from streamdqn.offline.baselines import fit_logistic_baseline, oracle_policy, severity_class
from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.offline.evaluate import split_fit_evaluation
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, replay
from streamdqn.stream.wire import read_events_file

TRAIN_SEED, EVAL_SEED = 1, 2


def load(n: int, seed: int, tmp: Path) -> list[EpisodeData]:
    path = tmp / f"sim{seed}.jsonl"
    write_events(path, simulate(n, seed))
    return split_episodes(read_events_file(path).events)


def rows(episodes: Sequence[EpisodeData]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, class (benign or severity third) and position of every row."""
    batch = EpisodeBatch.of(episodes)
    return batch.features, severity_class(batch.malicious, batch.severity)[batch.group], batch.position


def accuracy_by_step(
    train: list[EpisodeData], test: list[EpisodeData], steps: int,
) -> dict[str, dict[int, float]]:
    x, y, _ = rows(train)
    xt, yt, pt = rows(test)
    scale = Scaler(x)
    print("classifier  step  malicious-vs-benign accuracy  4-class (benign + severity third) accuracy")
    results: dict[str, dict[int, float]] = {}
    for name, hidden in (("linear", []), ("mlp", [256, 256])):
        model = classifier(hidden)
        fit_classifier(model, scale(x), torch.tensor(y), steps)
        with torch.no_grad():
            predicted = model(scale(xt)).argmax(1).numpy()
        results[name] = {}
        for step in (0, 2, 4, 8):
            k = pt == step
            binary = float(((predicted[k] > 0) == (yt[k] > 0)).mean())
            results[name][step] = round(binary, 4)
            print(f"{name:<10}  {step:>4}  {binary:>28.3f}  {(predicted[k] == yt[k]).mean():>42.3f}")
    return results


def supervised_references(
    train: list[EpisodeData], evaluation: list[EpisodeData], fit_split: list[EpisodeData], seed: int,
    smoke: bool,
) -> dict[str, object]:
    rewards = RewardTable()
    batch = EpisodeBatch.of(evaluation)

    def mean_return(actions: np.ndarray) -> float:
        return float(replay(actions, batch, rewards).returns.mean())

    logistic = mean_return(fit_logistic_baseline(fit_split, rewards, seed)(batch.features))
    oracle = mean_return(oracle_policy(evaluation, rewards)(batch.features))
    print()
    print(f"supervised stopping references (logistic {logistic:+.4f}, oracle {oracle:+.4f})")
    out: dict[str, object] = {"logistic": round(logistic, 4), "oracle": round(oracle, 4)}
    for name, fitter in reference_fitters(rewards, smoke=smoke).items():
        reference = fit_reference(name, fitter, train, rewards, seed)
        ours = mean_return(reference(batch.features))
        gap = (ours - logistic) / (oracle - logistic)
        print(f"  {describe(reference)}")
        print(f"    mean return {ours:+.4f}   gap closed {gap:.3f}")
        out[name] = {"mean_return": round(ours, 4), "gap_closed": round(gap, 4),
                     "threshold": reference.threshold}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args(argv)
    sizes = (60, 100, 200) if args.smoke else (1000, 2000, 3000)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train, test = load(sizes[0], TRAIN_SEED, Path(tmp)), load(sizes[1], EVAL_SEED, Path(tmp))
    fit_split, evaluation = split_fit_evaluation(test, 0, 0.3)  # evaluate()'s split, seed 0
    accuracy = accuracy_by_step(train, evaluation, sizes[2])
    references = supervised_references(train, evaluation, fit_split, seed=0, smoke=args.smoke)
    print(json.dumps({"bench": "separability", "smoke": args.smoke, "accuracy": accuracy, **references}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
