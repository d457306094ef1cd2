"""Learner: DQNLearner.update(buffer.sample(b)) updates/s against the compute limit and two peers,
and the Q-value targets each design learns per second.

All on the CPU, MLP 30-256-256-5, one torch thread unless stated, same batch sizes (64, 256). Replay
holds rows as the ingest stage builds them from simulated events (bench/_workload.simulated_rows):
one row per step, with the target of every action whose reward is known (`known`).

    streamdqn  DQNLearner.update(ReplayBuffer.sample(b)): row_loss (masked Huber over every known
               target, double DQN for ignore's bootstrap), grad clip, fused Adam
    bare       one forward + masked Huber over the batch's five outputs + backward + fused Adam step of
               the same MLP on a fixed batch: the limit
    bare_ddqn  bare plus the two no-grad forwards a double-DQN target needs: the limit for DQN
    cleanrl    a CleanRL-style eager loop written here, on single-action transitions: plain tensors,
               randint sampling, target net, MSE TD loss, default Adam, hard target copies
    sb3        Stable-Baselines3 DQN.train(gradient_steps, batch_size) on its own numpy replay buffer
               of single-action transitions (skipped with a reason when it is not installed)

Candidates alternate in rounds; each number is the median of the rounds. Then "targets learned per
second": a row teaches every known Q-value of its state (5 here), a transition one. At batch 64,

    streamdqn  targets/s = updates/s x 64 x mean known targets per row
    five-row   the same information the earlier design's way: a plain single-action double-DQN TD
               loss (Huber, grad clip, fused Adam, hard target copies, as streamdqn) over 5 x 64 = 320
               transitions sampled from a plain tensor ring per update; targets/s = updates/s x 320

both measured in the same alternating rounds, and the ratio. Then streamdqn at 1 vs 2 torch threads,
and where an update's time goes.

    python bench/learner.py [--smoke]
Targets: streamdqn >= 0.85x bare and >= 1.5x SB3 (updates/s). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    Target,
    emit,
    header,
    ops_per_second,
    random_transitions,
    ratio,
    report_targets,
    side_by_side,
    table,
)
from _workload import simulated_rows
from torch import nn

from streamdqn.learning.learner import DQNLearner, row_loss, update_from
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import N_ACTIONS, ReplayRows

HIDDEN = (256, 256)
BATCHES = (64, 256)
FILL = 50_000
TARGET_BARE, TARGET_SB3 = 0.85, 1.5
TARGETS_BATCH = 64  # the daemon's default batch size


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = FEATURE_DIM
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, N_ACTIONS))


# ---------------------------------------------------------------- candidates


def streamdqn_update(buffer: ReplayBuffer, batch: int) -> Callable[[], object]:
    learner = DQNLearner(LearnerSettings(batch_size=batch, device="cpu", seed=0), FEATURE_DIM, N_ACTIONS)
    return lambda: update_from(learner, buffer)


def bare_step(rows: ReplayRows, batch: int) -> Callable[[], object]:
    """The compute limit: forward, masked loss over the five outputs, backward and a fused Adam step on a
    fixed batch."""
    torch.manual_seed(0)
    net = mlp()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    x = torch.from_numpy(rows.states[:batch])
    y = torch.from_numpy(rows.rewards[:batch])
    known = torch.from_numpy(rows.known[:batch]).float()

    def step() -> None:
        loss = (F.smooth_l1_loss(net(x), y, reduction="none") * known).sum() / known.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bare_double_dqn_step(rows: ReplayRows, batch: int) -> Callable[[], object]:
    """The limit for a double-DQN update: `bare` plus the two no-grad forwards on next states."""
    torch.manual_seed(0)
    net = mlp()
    target = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    x = torch.from_numpy(rows.states[:batch])
    x2 = torch.from_numpy(rows.next_states[:batch])
    r = torch.from_numpy(rows.rewards[:batch])
    known = torch.from_numpy(rows.known[:batch]).float()

    def step() -> None:
        with torch.no_grad():
            best = net(x2).argmax(dim=1, keepdim=True)
            y = r.clone()
            y[:, 0] += 0.99 * target(x2).gather(1, best).squeeze(1)
        loss = (F.smooth_l1_loss(net(x), y, reduction="none") * known).sum() / known.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class FiveRowReference:
    """The earlier design's update, written here: single-action transitions, five per visited step.

    A plain preallocated tensor ring sampled with randint + index_select; double-DQN TD target on the
    one taken action, Huber loss, grad-norm clip, fused Adam, hard target copies: streamdqn's
    settings, one target per sampled transition.
    """

    def __init__(self, data: dict[str, np.ndarray], batch: int, s: LearnerSettings) -> None:
        torch.manual_seed(0)
        self.obs = torch.from_numpy(data["states"])
        self.next_obs = torch.from_numpy(data["next_states"])
        self.actions = torch.from_numpy(data["actions"])
        self.rewards = torch.from_numpy(data["rewards"])
        self.dones = torch.from_numpy(data["dones"].astype(np.float32))
        self.online = mlp()
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=s.lr, fused=True)
        self.batch, self.settings = batch, s
        self.updates = 0

    def update(self) -> None:
        s = self.settings
        idx = torch.randint(0, len(self.actions), (self.batch,))
        obs, next_obs = self.obs.index_select(0, idx), self.next_obs.index_select(0, idx)
        with torch.no_grad():
            best = self.online(next_obs).argmax(dim=1, keepdim=True)
            next_q = self.target(next_obs).gather(1, best).squeeze(1)
            y = self.rewards[idx] + s.gamma * next_q * (1 - self.dones[idx])
        q = self.online(obs).gather(1, self.actions[idx].unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.online.parameters(), s.grad_clip)
        self.optimizer.step()
        self.updates += 1
        if self.updates % s.target_update_interval == 0:
            self.target.load_state_dict(self.online.state_dict())


class CleanRLStyle:
    """A CleanRL-style eager DQN loop, written for this benchmark (not CleanRL's code).

    Plain preallocated tensors as replay, uniform randint sampling, a target network refreshed by a
    hard copy every `target_every` updates, squared TD error, and Adam with torch's defaults.
    """

    def __init__(
        self, data: dict[str, np.ndarray], batch: int, gamma: float = 0.99, target_every: int = 1000
    ):
        torch.manual_seed(0)
        self.obs = torch.from_numpy(data["states"])
        self.next_obs = torch.from_numpy(data["next_states"])
        self.actions = torch.from_numpy(data["actions"])
        self.rewards = torch.from_numpy(data["rewards"])
        self.dones = torch.from_numpy(data["dones"].astype(np.float32))
        self.q_network = mlp()
        self.target_network = copy.deepcopy(self.q_network)
        self.optimizer = torch.optim.Adam(self.q_network.parameters(), lr=1e-4)
        self.batch, self.gamma, self.target_every = batch, gamma, target_every
        self.step = 0

    def update(self) -> None:
        idx = torch.randint(0, len(self.actions), (self.batch,))
        with torch.no_grad():
            target_max, _ = self.target_network(self.next_obs[idx]).max(dim=1)
            td_target = self.rewards[idx] + self.gamma * target_max * (1 - self.dones[idx])
        old_val = self.q_network(self.obs[idx]).gather(1, self.actions[idx].unsqueeze(1)).squeeze(1)
        loss = F.mse_loss(td_target, old_val)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        if self.step % self.target_every == 0:
            self.target_network.load_state_dict(self.q_network.state_dict())


SB3_GRADIENT_STEPS = 20


def sb3_train(data: dict[str, np.ndarray], batch: int) -> tuple[Callable[[], object] | None, str]:
    """SB3's DQN.train on a filled SB3 replay buffer; (None, reason) when SB3 cannot be used."""
    try:
        import gymnasium as gym
        from stable_baselines3 import DQN
        from stable_baselines3.common.logger import configure
    except Exception as exc:  # noqa: BLE001 - ImportError, or an incompatible build failing at import
        return None, f"{type(exc).__name__}: {exc}"

    class TelemetryEnv(gym.Env):  # type: ignore[misc]
        """Only the spaces matter: DQN.train never steps the environment."""

        observation_space = gym.spaces.Box(-np.inf, np.inf, (FEATURE_DIM,), np.float32)
        action_space = gym.spaces.Discrete(N_ACTIONS)

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            return np.zeros(FEATURE_DIM, np.float32), {}

        def step(self, action: int) -> Any:
            return np.zeros(FEATURE_DIM, np.float32), 0.0, True, False, {}

    n = len(data["actions"])
    model = DQN(
        "MlpPolicy",
        TelemetryEnv(),
        learning_rate=1e-4,
        buffer_size=n,
        learning_starts=0,
        batch_size=batch,
        gamma=0.99,
        max_grad_norm=10.0,
        policy_kwargs={"net_arch": list(HIDDEN)},
        device="cpu",
        seed=0,
        verbose=0,
    )
    model.set_logger(configure(None, [""]))
    rb = model.replay_buffer
    assert rb is not None
    rb.observations[:n, 0] = data["states"]
    rb.next_observations[:n, 0] = data["next_states"]
    rb.actions[:n, 0, 0] = data["actions"]
    rb.rewards[:n, 0] = data["rewards"]
    rb.dones[:n, 0] = data["dones"]
    rb.full = True
    return lambda: model.train(
        gradient_steps=SB3_GRADIENT_STEPS, batch_size=batch
    ), "stable-baselines3 " + _version("stable-baselines3")


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------- targets learned per second


def targets_learned(
    buffer: ReplayBuffer, data: dict[str, np.ndarray], mean_known: float, rounds: int, seconds: float
) -> dict[str, Any]:
    """Q-value targets per second at batch 64: replay rows vs five single-action transitions per row."""
    b = TARGETS_BATCH
    settings = LearnerSettings(batch_size=b, device="cpu", seed=0)
    five = FiveRowReference(data, 5 * b, settings)
    rates = side_by_side(
        {"rows (streamdqn row_loss)": streamdqn_update(buffer, b), "five-row reference": five.update},
        rounds=rounds, seconds=seconds,
    )
    per_update = {"rows (streamdqn row_loss)": b * mean_known, "five-row reference": float(5 * b)}
    designs = {
        name: {"updates_per_s": rate, "targets_per_update": per_update[name],
               "targets_per_s": rate * per_update[name]}
        for name, rate in rates.items()
    }
    ours, reference = designs["rows (streamdqn row_loss)"], designs["five-row reference"]
    return {
        "batch_rows": b,
        "mean_known_per_row": mean_known,
        "designs": designs,
        "ratio": ratio(ours["targets_per_s"], reference["targets_per_s"]),
        "updates_ratio": ratio(ours["updates_per_s"], reference["updates_per_s"]),
    }


# ---------------------------------------------------------------- where the time goes


def update_breakdown(buffer: ReplayBuffer, batch: int, steps: int) -> dict[str, float]:
    """DQNLearner.update's steps, timed one by one (microseconds per update, mean over steps)."""
    learner = DQNLearner(LearnerSettings(batch_size=batch, device="cpu", seed=0), FEATURE_DIM, N_ACTIONS)
    s = learner.settings
    parts = {
        "sample": 0.0,
        "row_loss (3 forwards)": 0.0,
        "backward": 0.0,
        "clip_grad_norm_": 0.0,
        "adam step (fused)": 0.0,
        "target sync + stats": 0.0,
    }
    names = list(parts)
    for i in range(steps + 20):
        t = [time.perf_counter()]
        sample = buffer.sample(batch)
        t.append(time.perf_counter())
        loss, td_abs, q_max = row_loss(learner.online, learner.target, sample, s.gamma, s.double_dqn)
        t.append(time.perf_counter())
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(learner.online.parameters(), s.grad_clip)
        t.append(time.perf_counter())
        learner.optimizer.step()
        t.append(time.perf_counter())
        learner.counters.updates += 1
        learner._sync_target()
        torch.stack([loss.detach(), td_abs.mean(), q_max.mean()]).tolist()
        t.append(time.perf_counter())
        if i >= 20:  # warm-up excluded
            for k, name in enumerate(names):
                parts[name] += (t[k + 1] - t[k]) * 1e6 / steps
    return parts


# ---------------------------------------------------------------- main


def run(smoke: bool) -> dict[str, Any]:
    rounds, seconds = (1, 0.1) if smoke else (5, 0.8)
    fill = 5_000 if smoke else FILL
    replay_rows = simulated_rows(fill)
    data = random_transitions(5 * fill)  # the peers' replay: five transitions per row's step
    buffer = ReplayBuffer(fill, "cpu", seed=0)
    buffer.push(replay_rows)
    mean_known = float(replay_rows.known.sum(axis=1).mean())
    print(f"replay: {replay_rows.size:,} rows from simulated events, {mean_known:.2f} known targets per row; "
          f"peers: {5 * fill:,} single-action transitions")

    torch.set_num_threads(1)
    results: dict[str, Any] = {"batches": {}}
    sb3_reason = ""
    for batch in BATCHES:
        candidates: dict[str, Callable[[], object]] = {
            "bare": bare_step(replay_rows, batch),
            "bare_ddqn": bare_double_dqn_step(replay_rows, batch),
            "streamdqn": streamdqn_update(buffer, batch),
            "cleanrl": CleanRLStyle(data, batch).update,
        }
        sb3, sb3_reason = sb3_train(data, batch)
        rates = side_by_side(candidates, rounds=rounds, seconds=seconds)
        if sb3 is not None:
            # SB3 runs G gradient steps per call (its own loop); the rate is per gradient step.
            rates.update(
                side_by_side({"sb3": sb3}, rounds=rounds, seconds=seconds, per_call=SB3_GRADIENT_STEPS)
            )
        results["batches"][str(batch)] = rates
    if sb3_reason.startswith("stable-baselines3"):
        results["sb3"] = sb3_reason
    else:
        results["sb3"] = f"unavailable ({sb3_reason})"
        print(f"sb3: unavailable ({sb3_reason})")

    names = ["bare", "bare_ddqn", "streamdqn", "cleanrl", "sb3"]
    rows = []
    for batch in BATCHES:
        r = results["batches"][str(batch)]
        rows.append(
            [
                f"batch {batch}",
                *(r.get(n, float("nan")) for n in names),
                ratio(r["streamdqn"], r["bare"]),
                ratio(r["streamdqn"], r["bare_ddqn"]),
                ratio(r["streamdqn"], r["cleanrl"]),
                ratio(r["streamdqn"], r.get("sb3", float("nan"))),
            ]
        )
    table(
        ["", *[f"{n} up/s" for n in names], "sdqn/bare", "sdqn/ddqn-limit", "sdqn/cleanrl", "sdqn/sb3"],
        rows,
        title=f"updates/s, 1 torch thread, median of {rounds} alternating round(s) of {seconds:g} s",
    )

    learned = targets_learned(buffer, data, mean_known, rounds, seconds)
    results["targets_learned"] = learned
    table(
        ["design (batch 64 rows = 320 transitions)", "updates/s", "targets/update", "targets/s"],
        [[name, v["updates_per_s"], v["targets_per_update"], v["targets_per_s"]]
         for name, v in learned["designs"].items()],
        title=f"targets learned per second, median of {rounds} alternating round(s) of {seconds:g} s",
    )
    print(f"  rows / five-row reference, targets/s: {learned['ratio']:.2f}x "
          f"(updates/s: {learned['updates_ratio']:.2f}x)")

    threads: dict[str, dict[str, float]] = {}
    for batch in BATCHES:
        updates = {n: streamdqn_update(buffer, batch) for n in (1, 2)}
        samples: dict[int, list[float]] = {1: [], 2: []}
        for r in range(rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                torch.set_num_threads(n)  # once per window: changing it resizes torch's thread pool
                ops_per_second(updates[n], seconds / 2, min_ops=2)  # warm-up at this thread count
                samples[n].append(ops_per_second(updates[n], seconds))
        threads[str(batch)] = {str(n): statistics.median(v) for n, v in samples.items()}
    torch.set_num_threads(1)
    table(
        ["", "1 thread up/s", "2 threads up/s", "2/1"],
        [[f"batch {b}", t["1"], t["2"], ratio(t["2"], t["1"])] for b, t in threads.items()],
        title="streamdqn update at 1 vs 2 torch threads (nothing else running in this process)",
    )
    results["threads"] = threads

    steps = 5 if smoke else 400
    parts = {str(b): update_breakdown(buffer, b, steps) for b in BATCHES}
    table(
        ["step", *(f"batch {b} (us)" for b in BATCHES)],
        [[name, *(parts[str(b)][name] for b in BATCHES)] for name in parts[str(BATCHES[0])]]
        + [["total", *(sum(parts[str(b)].values()) for b in BATCHES)]],
        title=f"where a streamdqn update's time goes (mean of {steps} updates, 1 thread)",
    )
    results["breakdown_us"] = parts

    targets = []
    for batch in BATCHES:
        r = results["batches"][str(batch)]
        targets.append(Target(f"learner_b{batch}_vs_bare", ratio(r["streamdqn"], r["bare"]), TARGET_BARE))
        targets.append(
            Target(f"learner_b{batch}_vs_ddqn_limit", ratio(r["streamdqn"], r["bare_ddqn"]), TARGET_BARE)
        )
        if "sb3" in r:
            targets.append(Target(f"learner_b{batch}_vs_sb3", ratio(r["streamdqn"], r["sb3"]), TARGET_SB3))
    results["targets"] = report_targets(targets, smoke)
    return {"bench": "learner", "smoke": smoke, "rounds": rounds, "seconds_per_round": seconds, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; targets not judged")
    args = parser.parse_args(argv)
    header("learner", args.smoke, "DQN update rate vs the compute limit, a CleanRL-style loop and SB3")
    emit(run(args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
