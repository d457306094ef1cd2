"""How separable the simulated data is: per-step accuracy of supervised classifiers on the 30 features.

Context for bench/quality.py: a linear and a 256-256 MLP classifier, trained on the rows of 1,000
simulated episodes (seed 1) with the labels, tested on 2,000 fresh ones (seed 2), by step index.
No policy can respond correctly earlier than the evidence allows.

    python bench/separability.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from streamdqn.simulator import simulate, write_events
from streamdqn.telemetry import read_events_file
from streamdqn.transitions import EpisodeData, split_episodes


def load(n: int, seed: int, tmp: Path) -> list[EpisodeData]:
    path = tmp / f"sim{seed}.jsonl"
    write_events(path, simulate(n, seed))
    return split_episodes(read_events_file(path).events)


def rows(episodes: list[EpisodeData]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.concatenate([e.features for e in episodes])
    y = np.concatenate([np.full(len(e), 0 if not e.malicious else 1 + min(2, int(e.severity * 3))) for e in episodes])
    position = np.concatenate([np.arange(len(e)) for e in episodes])
    return x, y, position


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train, test = load(1000, 1, Path(tmp)), load(2000, 2, Path(tmp))
    x, y, _ = rows(train)
    xt, yt, pt = rows(test)
    mean, std = x.mean(0), x.std(0) + 1e-6

    def scaled(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    print("classifier  step  malicious-vs-benign accuracy  4-class (benign + severity third) accuracy")
    for name, hidden in (("linear", []), ("mlp", [256, 256])):
        layers: list[torch.nn.Module] = []
        width = 30
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 4))
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        xb, yb = scaled(x), torch.tensor(y)
        for _ in range(3000):
            i = torch.randint(0, len(xb), (256,))
            loss = torch.nn.functional.cross_entropy(model(xb[i]), yb[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = model(scaled(xt)).argmax(1).numpy()
        for step in (0, 2, 4, 8):
            k = pt == step
            binary = ((predicted[k] > 0) == (yt[k] > 0)).mean()
            print(f"{name:<10}  {step:>4}  {binary:>28.3f}  {(predicted[k] == yt[k]).mean():>42.3f}")


if __name__ == "__main__":
    main()
