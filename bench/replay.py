"""Replay: streamdqn's ReplayBuffer against TorchRL's ReplayBuffer + LazyTensorStorage, same rows.

Replay rows of the ingest stage (streamdqn.stream.rows.ReplayRows: one row per step, its 13 columns:
state and next state float32[30], rewards float32[5], known bool[5], horizon int8, and the columns
that let a verdict relabel a row, 287 bytes in all); capacity 1,000,000 rows (smoke: 10,000), every
buffer filled to capacity first, so every push overwrites the oldest rows as in steady state.
Operations, each from what its caller holds:

    push(512)     streamdqn: ReplayBuffer.push(ReplayRows of numpy arrays), as IngestPipeline hands them
                  torchrl:   TensorDict of torch.from_numpy views of the same 13 columns -> extend (and,
                             as a second row, extend of a TensorDict built beforehand: TorchRL's best case)
    sample(256)   the learner's batch at batch_size 256, and sample(64) at the default 64. streamdqn
                  gathers the five columns an update reads (RowBatch); TorchRL's sample returns all
                  13 (its API has no column subset), the plain ring gathers the same five as streamdqn

A plain preallocated torch ring (slice copies, randint + index_select) written here is the floor
reference. When torchrl cannot be imported, the comparison falls back to that ring and says so.

    python bench/replay.py [--smoke]
Target: streamdqn >= 2x TorchRL on push and on sample. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import Target, emit, header, random_rows, ratio, report_targets, side_by_side, table

from streamdqn.learning.replay.buffer import LEARNED, ReplayBuffer
from streamdqn.stream.rows import ROW_FIELDS, ROW_LAYOUT, ReplayRows

PUSH = 512
SAMPLES = (256, 64)
TARGET = 2.0


class PlainRing:
    """The simplest correct thing: preallocated tensors, slice copies, randint + index_select."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tensors = {
            name: torch.from_numpy(np.zeros((capacity, *shape), dtype))
            for name, (dtype, shape) in ROW_LAYOUT.items()
        }
        self.learned = tuple(self.tensors[name] for name in LEARNED)
        self.cursor = self.size = 0

    def push(self, rows: ReplayRows) -> None:
        n = rows.size
        first = min(n, self.capacity - self.cursor)
        for name, column in zip(ROW_FIELDS, rows, strict=True):
            dst, src = self.tensors[name], torch.from_numpy(column)
            dst[self.cursor : self.cursor + first].copy_(src[:first])
            if first < n:
                dst[: n - first].copy_(src[first:])
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        index = torch.randint(0, self.size, (batch_size,))
        return tuple(t.index_select(0, index) for t in self.learned)


def torchrl_buffer(capacity: int) -> tuple[Any, Callable[[ReplayRows], Any], str]:
    """(buffer, numpy batch -> TensorDict, version); raises ImportError when torchrl is unusable."""
    logging.getLogger("torchrl").setLevel(logging.WARNING)  # it logs every storage initialisation
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage
    from torchrl.data import ReplayBuffer as TorchRLReplayBuffer
    from torchrl.data.replay_buffers.samplers import RandomSampler

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    import torchrl

    def as_td(rows: ReplayRows) -> Any:
        return TensorDict(
            {k: torch.from_numpy(v) for k, v in zip(ROW_FIELDS, rows, strict=True)}, batch_size=[rows.size]
        )

    rb = TorchRLReplayBuffer(storage=LazyTensorStorage(capacity), sampler=RandomSampler())
    return rb, as_td, torchrl.__version__


def fill(capacity: int, push: Callable[[ReplayRows], object]) -> None:
    chunk = random_rows(min(capacity, 65_536), seed=1)
    done = 0
    while done < capacity:
        push(chunk)
        done += chunk.size


def run(smoke: bool) -> dict[str, Any]:
    capacity = 10_000 if smoke else 1_000_000
    rounds, seconds = (1, 0.1) if smoke else (5, 0.6)
    torch.set_num_threads(1)  # the learner's and the ingest loop's setting in the daemon
    batch = random_rows(PUSH, seed=2)

    ours = ReplayBuffer(capacity, "cpu", seed=0)
    fill(capacity, ours.push)
    ring = PlainRing(capacity)
    fill(capacity, ring.push)

    peer = "torchrl"
    try:
        rb, as_td, version = torchrl_buffer(capacity)
        fill(capacity, lambda b: rb.extend(as_td(b)))
        prebuilt = as_td(batch)
        peer_note = f"torchrl {version}: ReplayBuffer + LazyTensorStorage + RandomSampler"
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken extension failing at import
        rb = None
        peer = "plain ring"
        peer_note = (
            f"torchrl unavailable ({type(exc).__name__}: {exc}); comparing with the plain ring instead"
        )
    print(f"peer: {peer_note}")

    push_ops: dict[str, Callable[[], object]] = {
        "streamdqn": lambda: ours.push(batch),
        "plain ring": lambda: ring.push(batch),
    }
    if rb is not None:
        torchrl_rb: Any = rb
        push_ops["torchrl"] = lambda: torchrl_rb.extend(as_td(batch))
        push_ops["torchrl (prebuilt TensorDict)"] = lambda: torchrl_rb.extend(prebuilt)
    results: dict[str, Any] = {"push_512": side_by_side(push_ops, rounds=rounds, seconds=seconds)}
    for size in SAMPLES:
        ops: dict[str, Callable[[], object]] = {
            "streamdqn": functools.partial(ours.sample, size),
            "plain ring": functools.partial(ring.sample, size),
        }
        if rb is not None:
            ops["torchrl"] = functools.partial(rb.sample, batch_size=size)
        results[f"sample_{size}"] = side_by_side(ops, rounds=rounds, seconds=seconds)

    ops_names = list(results)
    impls = list(push_ops)
    table(
        ["implementation", *(f"{op} ops/s" for op in ops_names)],
        [[impl, *(results[op].get(impl, float("nan")) for op in ops_names)] for impl in impls],
        title=f"capacity {capacity:,} rows (full), 1 torch thread, median of {rounds} alternating round(s)",
    )
    table(
        ["streamdqn / x", *ops_names],
        [
            [
                impl,
                *(ratio(results[op]["streamdqn"], results[op].get(impl, float("nan"))) for op in ops_names),
            ]
            for impl in impls
            if impl != "streamdqn"
        ],
        title="ratios",
    )
    targets = []
    if peer == "torchrl":
        targets = [
            Target(f"replay_{op}_vs_torchrl", ratio(results[op]["streamdqn"], results[op]["torchrl"]), TARGET)
            for op in ops_names
        ]
    else:
        print(
            "\nthe 2x target is against TorchRL; without it there is nothing to judge (the ring is a floor)"
        )
    verdicts = report_targets(targets, smoke)
    return {
        "bench": "replay",
        "smoke": smoke,
        "capacity": capacity,
        "row_bytes": ReplayBuffer.bytes_needed(1),
        "peer": peer,
        "peer_note": peer_note,
        "ops_per_s": results,
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; targets not judged")
    args = parser.parse_args(argv)
    header("replay", args.smoke, "ReplayBuffer push/sample vs TorchRL and a plain ring")
    emit(run(args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
