"""How much the simulated data allows: supervised classifiers on the 30 features, scored two ways.

Context for bench/quality.py, on the same data (1,000 training episodes from seed 1; the 1,400
held-out episodes of seed 2 that `streamdqn evaluate` scores):

1. accuracy by step of a linear and a 256-256 MLP classifier trained on every row with its label:
   no policy can respond correctly earlier than the evidence allows;
2. a **supervised policy reference**: an MLP classifier (early-stopped on 20 % of the training
   episodes) whose class probabilities give each response's expected reward; it responds at the
   first step where the best expected reward exceeds a threshold tuned on the training episodes,
   as the logistic baseline tunes its own. It learns from the labels, which the DQN never sees, so
   it shows how much of the gap to the oracle these 1,000 episodes support.

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
import torch.nn.functional as F

from streamdqn.offline.baselines import _CLASS_SEVERITY, fit_logistic_baseline, oracle_policy, severity_class
from streamdqn.offline.dataset import EpisodeData, split_episodes
from streamdqn.offline.evaluate import split_fit_evaluation
from streamdqn.offline.simulator import simulate, write_events
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.scoring import EpisodeBatch, replay
from streamdqn.stream.wire import Action, read_events_file

TRAIN_SEED, EVAL_SEED = 1, 2


def load(n: int, seed: int, tmp: Path) -> list[EpisodeData]:
    path = tmp / f"sim{seed}.jsonl"
    write_events(path, simulate(n, seed))
    return split_episodes(read_events_file(path).events)


def rows(episodes: Sequence[EpisodeData]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, class (benign or severity third) and position of every row."""
    batch = EpisodeBatch.of(episodes)
    return batch.features, severity_class(batch.malicious, batch.severity)[batch.group], batch.position


class Scaler:
    def __init__(self, x: np.ndarray) -> None:
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.tensor((x - self.mean) / self.std, dtype=torch.float32)


def classifier(hidden: Sequence[int], classes: int = 4) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    width = 30
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def fit(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None, every: int = 100,
) -> int:
    """Adam, batches of 256; with `validation`, keep the weights of the best validation loss.

    Returns the number of steps of the weights kept."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    best = (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    for step in range(1, steps + 1):
        i = torch.randint(0, len(x), (256,))
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if validation is not None and step % every == 0:
            with torch.no_grad():
                held = F.cross_entropy(model(validation[0]), validation[1]).item()
            if held < best[0]:
                best = (held, step, {k: v.clone() for k, v in model.state_dict().items()})
    if validation is None:
        return steps
    model.load_state_dict(best[2])
    return best[1]


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
        fit(model, scale(x), torch.tensor(y), steps)
        with torch.no_grad():
            predicted = model(scale(xt)).argmax(1).numpy()
        results[name] = {}
        for step in (0, 2, 4, 8):
            k = pt == step
            binary = float(((predicted[k] > 0) == (yt[k] > 0)).mean())
            results[name][step] = round(binary, 4)
            print(f"{name:<10}  {step:>4}  {binary:>28.3f}  {(predicted[k] == yt[k]).mean():>42.3f}")
    return results


def class_rewards(rewards: RewardTable) -> np.ndarray:
    """[4 classes, 4 responses]: the reward of each response for benign and for the centre of each
    severity third."""
    responses = np.arange(1, len(Action))
    table = [rewards.rewards(responses, np.zeros(4, bool), np.zeros(4), np.zeros(4, bool))]
    table += [rewards.rewards(responses, np.ones(4, bool), np.full(4, s), np.zeros(4, bool))
              for s in _CLASS_SEVERITY]
    return np.array(table)


def expected_reward_policy(p: np.ndarray, table: np.ndarray, threshold: float) -> np.ndarray:
    """Respond with the best expected-reward response where it beats `threshold`, else ignore."""
    expected = p @ table
    return np.where(expected.max(1) > threshold, 1 + expected.argmax(1), int(Action.IGNORE))


def supervised_reference(
    train: list[EpisodeData], evaluation: list[EpisodeData], fit_split: list[EpisodeData], max_steps: int,
    seed: int,
) -> dict[str, float]:
    rewards = RewardTable()
    order = np.random.default_rng(seed).permutation(len(train))
    cut = len(train) // 5
    learn, held = [train[i] for i in order[cut:]], [train[i] for i in order[:cut]]
    x, y, _ = rows(learn)
    xv, yv, _ = rows(held)
    scale = Scaler(x)
    model = classifier([128, 128])
    kept = fit(model, scale(x), torch.tensor(y), max_steps, (scale(xv), torch.tensor(yv)))

    table = class_rewards(rewards)
    train_batch, eval_batch = EpisodeBatch.of(train), EpisodeBatch.of(evaluation)
    with torch.no_grad():
        p_train = torch.softmax(model(scale(train_batch.features)), 1).double().numpy()
        p_eval = torch.softmax(model(scale(eval_batch.features)), 1).double().numpy()
    grid = np.linspace(-0.5, 1.0, 61)
    scores = [replay(expected_reward_policy(p_train, table, t), train_batch, rewards).returns.mean()
              for t in grid]
    threshold = float(grid[int(np.argmax(scores))])
    ours = float(replay(expected_reward_policy(p_eval, table, threshold), eval_batch, rewards).returns.mean())
    logistic = float(replay(fit_logistic_baseline(fit_split, rewards, seed)(eval_batch.features), eval_batch,
                            rewards).returns.mean())
    oracle = float(replay(oracle_policy(evaluation, rewards)(eval_batch.features), eval_batch,
                          rewards).returns.mean())
    gap = (ours - logistic) / (oracle - logistic)
    print()
    print(f"supervised policy reference (MLP 128-128, {kept} steps kept by early stopping, "
          f"threshold {threshold:+.3f})")
    print(f"  mean return {ours:+.4f}   logistic {logistic:+.4f}   oracle {oracle:+.4f}   "
          f"gap closed {gap:.3f}")
    print(f"  the quality target's bar (half the gap): {logistic + 0.5 * (oracle - logistic):+.4f}")
    return {"supervised_mean_return": round(ours, 4), "logistic": round(logistic, 4),
            "oracle": round(oracle, 4), "supervised_gap_closed": round(gap, 4), "threshold": threshold,
            "classifier_steps": kept}


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
    reference = supervised_reference(train, evaluation, fit_split, sizes[2], seed=0)
    print(json.dumps({"bench": "separability", "smoke": args.smoke, "accuracy": accuracy, **reference}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
