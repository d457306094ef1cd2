"""Memory: resident size of a process holding a full replay buffer, against the buffer's raw bytes.

Each mode runs in a fresh child process (`python bench/memory.py --child CAPACITY --shared {0,1}`)
that imports torch and streamdqn, builds a capacity-1 ReplayBuffer, fills it and samples once, reads
VmRSS from /proc/self/status (the fixed overhead: interpreter + torch + streamdqn), then does the
same with the full-size buffer, filled with ReplayBuffer.push in chunks of 512 replay rows (what
the ingest stage does), and reads VmRSS again (and the peak, VmHWM).

    buffer RSS = RSS(full) - fixed overhead,   compared with ReplayBuffer.nbytes

Replay holds one row per step (all five actions' targets, 287 bytes); the earlier design held five
transitions per step (the step and four counterfactual responses, 253 bytes each). The table also
shows the bytes per step of each, i.e. how many more steps the same memory now holds.

Both the daemon's process mode (shared=True: tensors in shared memory, which RSS counts as
RssShmem) and thread mode (shared=False) are measured.

    python bench/memory.py [--smoke]          capacity 1,000,000 (smoke: 10,000)
Target: RSS <= 1.2 x nbytes + the fixed overhead. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from _common import Target, emit, header, random_rows, report_targets, table

TARGET = 1.2
MIB = 1024 * 1024
# The earlier layout, per transition: state + next state float32[30], action int64, reward float32, done bool.
TRANSITION_BYTES = 2 * 30 * 4 + 8 + 4 + 1
TRANSITIONS_PER_STEP = 5


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(capacity: int, shared: bool) -> None:
    """In one fresh process: RSS with a capacity-1 buffer, then with a full one; one JSON line."""
    import gc

    import torch

    from streamdqn.learning.replay import ReplayBuffer

    torch.set_num_threads(1)
    lock = None
    if shared:
        from streamdqn.learning.runners import ProcessRunner

        lock = ProcessRunner.make_lock()

    def filled(cap: int) -> ReplayBuffer:
        buffer = ReplayBuffer(cap, "cpu", seed=0, shared=shared, lock=lock)
        chunk = random_rows(min(512, cap))
        while buffer.total_pushed < cap:
            buffer.push(chunk)
        buffer.sample(min(64, cap))  # the learner's first touch, as in the daemon
        return buffer

    small = filled(1)
    gc.collect()
    base = {"rss": status_kib("VmRSS") * 1024, "hwm": status_kib("VmHWM") * 1024, "nbytes": small.nbytes}
    big = filled(capacity)
    gc.collect()
    print(
        json.dumps(
            {
                "capacity": capacity,
                "shared": shared,
                "size": len(big),
                "nbytes": big.nbytes,
                "capacity_1": base,
                "rss": status_kib("VmRSS") * 1024,
                "hwm": status_kib("VmHWM") * 1024,
                "rss_anon": status_kib("RssAnon") * 1024,
                "rss_file": status_kib("RssFile") * 1024,
                "rss_shmem": status_kib("RssShmem") * 1024,
            }
        )
    )


def measure(capacity: int, shared: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", str(capacity), "--shared", str(int(shared))],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(smoke: bool) -> dict[str, Any]:
    capacity = 10_000 if smoke else 1_000_000
    results: dict[str, Any] = {}
    targets = []
    rows = []
    # Smoke: only the daemon's default (process mode, shared memory), to stay within seconds.
    for shared in (True,) if smoke else (False, True):
        mode = "shared (process mode)" if shared else "private (thread mode)"
        full = measure(capacity, shared)
        base = full.pop("capacity_1")
        overhead = base["rss"]
        buffer_rss = full["rss"] - overhead
        allowed = TARGET * full["nbytes"] + overhead
        ratio_to_nbytes = buffer_rss / full["nbytes"]
        key = "shared" if shared else "private"
        results[key] = {
            "capacity_1": base,
            "full": full,
            "fixed_overhead_bytes": overhead,
            "buffer_rss_bytes": buffer_rss,
            "buffer_rss_over_nbytes": ratio_to_nbytes,
            "allowed_rss_bytes": allowed,
            "peak_over_final_rss": full["hwm"] / full["rss"],
        }
        rows.append(
            [
                mode,
                full["nbytes"] / MIB,
                overhead / MIB,
                full["rss"] / MIB,
                buffer_rss / MIB,
                ratio_to_nbytes,
                full["hwm"] / MIB,
                full["rss_shmem"] / MIB,
            ]
        )
        # RSS <= 1.2 x nbytes + overhead  <=>  (RSS - overhead) / nbytes <= 1.2
        targets.append(Target(f"memory_{key}_rss_over_nbytes", ratio_to_nbytes, TARGET, at_most=True))
    table(
        [
            "buffer",
            "nbytes MiB",
            "overhead MiB",
            "RSS MiB",
            "RSS-overhead MiB",
            "(RSS-ovh)/nbytes",
            "peak MiB",
            "shmem MiB",
        ],
        rows,
        title=f"ReplayBuffer of {capacity:,} rows, filled; fixed overhead = RSS with capacity 1",
    )
    from streamdqn.learning.replay import ReplayBuffer

    row = ReplayBuffer.bytes_needed(1)
    old_step = TRANSITIONS_PER_STEP * TRANSITION_BYTES
    table(
        ["layout", "bytes per step", "steps in 1 GiB"],
        [
            ["one row per step (now)", float(row), float(2**30 // row)],
            [f"{TRANSITIONS_PER_STEP} transitions per step (before)", float(old_step),
             float(2**30 // old_step)],
        ],
        title=f"per visited step: the row layout holds {old_step / row:.2f}x the steps in the same memory",
    )
    verdicts = report_targets(targets, smoke)
    return {"bench": "memory", "smoke": smoke, "capacity": capacity, **results,
            "row_bytes": row, "old_step_bytes": old_step, "steps_per_byte_vs_before": old_step / row,
            "targets": verdicts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="capacity 10,000; target not judged")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shared", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, bool(args.shared))
        return 0
    header("memory", args.smoke, "RSS of a full ReplayBuffer vs its raw bytes")
    emit(run(args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
