"""Distributed: data-parallel learners, 1 process vs 2 ranks averaging gradients over Gloo on loopback.

Every candidate runs in spawned processes with one torch thread each: DQNLearner.update(ReplayBuffer
.sample(64)) on the default 30-256-256-5 MLP over a replay shard of random rows of its own.

    1 process               a plain learner, no group: the baseline
    2 processes, no group   two plain learners side by side: what sharing the cores alone costs
    2 ranks                 two learners in one group (streamdqn.learning.distributed), each iteration
                            as the daemon's learner does it: a step together (one small all-reduce that
                            agrees to update and sums the counts), then an update that all-reduces the
                            gradients (one flattened bucket) in the after_backward hook

Each rank does the same number of updates (the collectives keep them in step). Reported: updates/s
per rank, aggregate samples/s over the ranks, both as ratios to 1 process; the hook's time per update
(the all-reduce plus waiting for the slower rank); and a bare all-reduce of the same bucket, back to
back, for the communication cost alone. At the end the ranks' weight hashes must agree.

On a 2-core machine 2 ranks cannot scale much; "2 processes, no group" shows what sharing the cores
alone costs. Measured quiet on 2 cores (2026-12-02, gradient all-reduce only) two plain processes ran
at 2.0x one, 2 ranks at 0.67x aggregate; with the step together added (as the daemon runs it), under
30-41 % CPU pressure from other work: 2 plain processes 0.97x, 2 ranks 0.71x aggregate. Gloo's
all-reduce here costs ~1.2-1.6 ms whatever the size (1 KiB as much as 293 KiB; a raw TCP round trip on
the same loopback is ~70 us), as much as an update of this MLP at batch 64: the collectives' latency,
not bandwidth or compute, sets the rate. Larger batches per rank amortize it; so would NCCL on GPUs
(not measured here).

    python bench/distributed.py [--smoke]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from _common import emit, header, ratio, table

from streamdqn.kafka.broker import free_port
from streamdqn.learning.distributed import GroupSettings, LocalProgress, join_group
from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import N_ACTIONS, ReplayRows

BATCH = 64
HIDDEN = (256, 256)
SIZES = {"smoke": {"updates": 60, "allreduces": 50, "rows": 4096, "rounds": 1},
         "full": {"updates": 1500, "allreduces": 1000, "rows": 50_000, "rounds": 3}}
WARMUP_UPDATES = 10
RESULT_SECONDS = 600


def random_rows(n: int, seed: int) -> ReplayRows:
    rng = np.random.default_rng(seed)
    rows = ReplayRows.empty(n)
    rows.states[:] = rng.normal(size=rows.states.shape)
    rows.next_states[:] = rng.normal(size=rows.next_states.shape)
    rows.rewards[:] = rng.normal(size=rows.rewards.shape)
    rows.known[:] = rng.random(rows.known.shape) < 0.5
    rows.horizon[:] = rng.integers(0, 3, size=n)
    return rows


def weights_sha256(learner: DQNLearner) -> str:
    digest = hashlib.sha256()
    for value in learner.online.state_dict().values():
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


def _rank(rank: int, world_size: int, grouped: bool, port: int, sizes: dict[str, int], results: Any) -> None:
    """One rank (or a process on its own when not grouped): timed updates, then a bare all-reduce loop."""
    torch.set_num_threads(1)
    group = None
    if grouped:
        group = join_group(GroupSettings(rank=rank, world_size=world_size, master_port=port))
    hook_seconds = [0.0]

    def averaged(module: torch.nn.Module) -> None:
        assert group is not None
        start = time.perf_counter()
        group.average_gradients(module)
        hook_seconds[0] += time.perf_counter() - start

    learner_settings = LearnerSettings(hidden=HIDDEN, batch_size=BATCH, device="cpu", seed=0)
    learner = DQNLearner(learner_settings, FEATURE_DIM, N_ACTIONS, after_backward=averaged if group else None)
    buffer = ReplayBuffer(sizes["rows"], "cpu", seed=rank)
    buffer.push(random_rows(sizes["rows"], seed=rank))
    try:
        if group is not None:
            group.broadcast_parameters(learner.online)
            group.broadcast_parameters(learner.target)
        for _ in range(WARMUP_UPDATES):
            learner.update(buffer.sample(BATCH))
        if group is not None:
            group.barrier()
        hook_seconds[0] = 0.0
        local = LocalProgress(ready=True, leaving=False, events=0, transitions=sizes["rows"],
                              normalizer_count=1.0, normalizer_version=0, mean=np.zeros(FEATURE_DIM),
                              std=np.ones(FEATURE_DIM))
        step_seconds = 0.0
        start = time.perf_counter()
        for _ in range(sizes["updates"]):
            if group is not None:  # as the daemon's learner: agree to update, then update
                begun = time.perf_counter()
                group.step_together(local)
                step_seconds += time.perf_counter() - begun
            learner.update(buffer.sample(BATCH))
        elapsed = time.perf_counter() - start
        out = {"updates_per_s": sizes["updates"] / elapsed,
               "hook_us_per_update": 1e6 * hook_seconds[0] / sizes["updates"],
               "step_us_per_update": 1e6 * step_seconds / sizes["updates"],
               "sha256": weights_sha256(learner)}
        if group is not None:
            bucket = torch.cat([p.detach().reshape(-1) for p in learner.online.parameters()])
            group.barrier()
            start = time.perf_counter()
            for _ in range(sizes["allreduces"]):
                torch.distributed.all_reduce(bucket)
            out["allreduce_us"] = 1e6 * (time.perf_counter() - start) / sizes["allreduces"]
        results.put((rank, out))
    finally:
        if group is not None:
            group.close()


def run_world(world_size: int, grouped: bool, sizes: dict[str, int]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world_size, grouped, port, sizes, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=RESULT_SECONDS) for _ in procs)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


# name: (processes, in one group)
CANDIDATES = {
    "1 process": (1, False), "2 processes, no group": (2, False), "2 ranks (Gloo, loopback)": (2, True),
}


def run(smoke: bool) -> dict[str, Any]:
    sizes = SIZES["smoke" if smoke else "full"]
    rounds: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in CANDIDATES}
    for r in range(sizes["rounds"]):
        for name in (list(CANDIDATES) if r % 2 == 0 else list(reversed(CANDIDATES))):
            rounds[name].append(run_world(*CANDIDATES[name], sizes))

    def median(name: str, key: str) -> float:
        """The median over rounds of the mean over a round's processes."""
        return statistics.median(statistics.mean(float(x[key]) for x in rs) for rs in rounds[name])

    one = median("1 process", "updates_per_s")
    rows = []
    for name, (n, _) in CANDIDATES.items():
        each = median(name, "updates_per_s")
        rows.append([name, each, ratio(each, one), n * each * BATCH, ratio(n * each, one)])
    grouped = "2 ranks (Gloo, loopback)"
    per_rank = median(grouped, "updates_per_s")
    alone_together = median("2 processes, no group", "updates_per_s")
    hashes = {x["sha256"] for x in rounds[grouped][-1]}
    hook_us = median(grouped, "hook_us_per_update")
    step_us = median(grouped, "step_us_per_update")
    allreduce_us = median(grouped, "allreduce_us")
    params = sum(p.numel() for p in DQNLearner(
        LearnerSettings(hidden=HIDDEN, device="cpu"), FEATURE_DIM, N_ACTIONS).online.parameters())
    table(["candidate", "updates/s per process", "x 1 process", "samples/s (all)", "x 1 process"], rows,
          title=f"batch {BATCH}, MLP 30-{'-'.join(map(str, HIDDEN))}-5, 1 torch thread per process, "
                f"{sizes['updates']} updates each, median of {sizes['rounds']} round(s)")
    table(["cost", "us"], [
        ["step together per update (small all-reduce: ready? counts, normalizer)", step_us],
        ["after_backward hook per update (all-reduce + waiting for the other rank)", hook_us],
        [f"bare all-reduce of the {params:,}-float bucket ({4 * params / 1024:.0f} KiB), back to back",
         allreduce_us],
        ["one update of 1 process", 1e6 / one],
        ["one update of 2 processes sharing the machine, no group", 1e6 / alone_together],
        ["one update of a rank of 2", 1e6 / per_rank],
    ], title="all-reduce cost")
    print(f"\n  weights agree across the 2 ranks: {len(hashes) == 1} ({', '.join(sorted(hashes))})")
    return {
        "bench": "distributed", "smoke": smoke, "batch": BATCH, "hidden": list(HIDDEN), "parameters": params,
        "updates_per_s": {
            "one_process": one, "two_processes_no_group": alone_together, "per_rank_2": per_rank,
        },
        "per_rank_ratio": ratio(per_rank, one), "aggregate_samples_ratio": ratio(2 * per_rank, one),
        "step_us_per_update": step_us, "hook_us_per_update": hook_us, "allreduce_us": allreduce_us,
        "weights_agree": len(hashes) == 1,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI, seconds long")
    args = parser.parse_args(argv)
    header("distributed", args.smoke, "1 process vs 2 data-parallel ranks (Gloo), all-reduce cost")
    emit(run(args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
