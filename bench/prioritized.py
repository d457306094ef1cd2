"""Prioritized replay: PrioritizedSampler draws and priority updates against today's uniform sampling.

Capacity 1,000,000 (smoke: 10,000), every slot written and given a priority |N(0, 1)|, so the tree is
full and uneven as in steady state. At batch 64 (the default) and 256, in alternating rounds:

    uniform (reference)   torch.randint + index_select of a [capacity, 30] float32 tensor: what the
                          uniform sampler costs a replay sample now
    indices               PrioritizedSampler.indices: stratified draws down the sum tree + weights
    indices + gather      the same, then the index_select of the rows: a prioritized replay sample
    update_priorities     the learner's |TD errors| written back (leaves, then ancestors per level)
    sample + update       indices + gather + update_priorities: what prioritization costs a step

and, for the ingest side, on_write(512) (the push size of bench/replay.py) next to the 512-row slice
copy into the [capacity, 30] tensor it comes with.

    python bench/prioritized.py [--smoke] [--device cuda]
No target is set for these; the ratios to the uniform reference are reported. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from _common import emit, header, ratio, side_by_side, table

from streamdqn.learning.replay.prioritized import PrioritizedSampler
from streamdqn.stream.features import FEATURE_DIM

BATCHES = (64, 256)
PUSH = 512
REFERENCE = "uniform (reference)"
WRITE_REFERENCE, WRITE = f"{PUSH}-row slice copy (reference)", f"on_write({PUSH})"


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn, waiting for the GPU to finish it: otherwise only the kernel launches are timed."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def filled_sampler(capacity: int, device: torch.device) -> PrioritizedSampler:
    sampler = PrioritizedSampler(capacity, device, seed=0)
    generator = torch.Generator().manual_seed(1)
    for start in range(0, capacity, 65_536):
        positions = torch.arange(start, min(capacity, start + 65_536))
        sampler.on_write(positions)
        sampler.update_priorities(positions, torch.randn(len(positions), generator=generator))
    return sampler


def sample_ops(
    sampler: PrioritizedSampler, rows: torch.Tensor, batch: int, device: torch.device
) -> dict[str, Callable[[], object]]:
    capacity = sampler.capacity
    generator = torch.Generator(device=device).manual_seed(2)
    positions = torch.randint(0, capacity, (batch,), device=device, generator=generator)
    td_errors = torch.randn(batch, device=device, generator=generator)

    def uniform() -> object:
        return rows.index_select(0, torch.randint(0, capacity, (batch,), device=device, generator=generator))

    def gather() -> object:
        return rows.index_select(0, sampler.indices(capacity, batch)[0])

    def step() -> object:
        drawn, _ = sampler.indices(capacity, batch)
        rows.index_select(0, drawn)
        sampler.update_priorities(drawn, td_errors)
        return drawn

    ops: dict[str, Callable[[], object]] = {
        REFERENCE: uniform,
        "indices": lambda: sampler.indices(capacity, batch),
        "indices + gather": gather,
        "update_priorities": lambda: sampler.update_priorities(positions, td_errors),
        "sample + update": step,
    }
    return {name: synced(fn, device) for name, fn in ops.items()}


def write_ops(
    sampler: PrioritizedSampler, rows: torch.Tensor, device: torch.device
) -> dict[str, Callable[[], object]]:
    positions = torch.arange(PUSH, device=device)
    batch = torch.randn(PUSH, FEATURE_DIM, device=device)
    ops: dict[str, Callable[[], object]] = {
        WRITE_REFERENCE: lambda: rows[:PUSH].copy_(batch),
        WRITE: lambda: sampler.on_write(positions),
    }
    return {name: synced(fn, device) for name, fn in ops.items()}


def run(smoke: bool, device: torch.device) -> dict[str, Any]:
    capacity = 10_000 if smoke else 1_000_000
    rounds, seconds = (1, 0.1) if smoke else (5, 0.6)
    torch.set_num_threads(1)  # the learner's and the ingest loop's setting in the daemon
    sampler = filled_sampler(capacity, device)
    rows = torch.randn(capacity, FEATURE_DIM, device=device)

    results: dict[str, dict[str, float]] = {}
    for batch in BATCHES:
        results[f"batch_{batch}"] = side_by_side(sample_ops(sampler, rows, batch, device),
                                                 rounds=rounds, seconds=seconds)
    names = list(results[f"batch_{BATCHES[0]}"])
    table(
        ["operation", *(f"b{b} calls/s" for b in BATCHES), *(f"b{b} rows/s" for b in BATCHES)],
        [
            [name, *(results[f"batch_{b}"][name] for b in BATCHES),
             *(results[f"batch_{b}"][name] * b for b in BATCHES)]
            for name in names
        ],
        title=f"capacity {capacity:,} (full), {device}, 1 torch thread, "
        f"median of {rounds} alternating round(s)",
    )
    ratios = {
        f"batch_{b}": {name: ratio(results[f"batch_{b}"][name], results[f"batch_{b}"][REFERENCE])
                       for name in names if name != REFERENCE}
        for b in BATCHES
    }
    table(
        ["x / uniform reference", *(f"batch {b}" for b in BATCHES)],
        [[name, *(ratios[f"batch_{b}"][name] for b in BATCHES)] for name in names if name != REFERENCE],
        title="ratios (calls/s; < 1 is slower than the uniform sample)",
    )

    writes = side_by_side(write_ops(sampler, rows, device), rounds=rounds, seconds=seconds)
    table(["operation", "calls/s", "/ slice copy"],
          [[name, writes[name], ratio(writes[name], writes[WRITE_REFERENCE])] for name in writes],
          title="ingest side")
    print("\nno target is set for prioritized replay; the ratios above are the result")
    return {
        "bench": "prioritized",
        "smoke": smoke,
        "device": str(device),
        "capacity": capacity,
        "ops_per_s": {**results, f"write_{PUSH}": writes},
        "ratios_to_uniform": ratios,
        f"on_write_{PUSH}_to_slice_copy": ratio(writes[WRITE], writes[WRITE_REFERENCE]),
        "targets": {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; targets not judged")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    header("prioritized", args.smoke, "PrioritizedSampler draws and updates vs randint + index_select")
    emit(run(args.smoke, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
