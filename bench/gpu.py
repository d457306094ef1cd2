"""GPU: the fast path on one CUDA device, in one short run (< 3 minutes); exits cleanly without CUDA.

    updates     DQN updates/s at batch 64 and 256 (replay rows: each teaches all five Q-values,
                streamdqn.learning.learner.row_loss), all from a ReplayBuffer on the GPU:
                  eager       DQNLearner.update(buffer.sample(b)) with cuda_graph off (its stats
                              .tolist() waits for the GPU once per update)
                  eager-async the same steps without reading stats back each update
                  graphed     DQNLearner.update(buffer.sample(b)) as the daemon runs it on CUDA
                              (cuda_graph on): forward + backward + clip + fused Adam(capturable=True)
                              captured once per batch size (streamdqn.learning.graphs) and replayed, static
                              inputs filled from replay samples; stats read back each update
                  graphed (no sampling)  the same update on one pre-drawn sample
    pushes      ReplayBuffer.push(512 replay rows from numpy, all 13 columns) to the GPU: streamdqn's
                pinned staging + non_blocking copy, vs a plain pageable .to(device), vs one reused
                pinned staging buffer per column
    ingest      IngestPipeline.process on pre-built records (no broker) pushing into a GPU replay
                buffer, with a ThreadRunner learner on the GPU: each alone and both at once

    python bench/gpu.py [--smoke]
The last line is one JSON object (with "skipped" when there is no CUDA). `--cpu-check` runs the
non-graph parts on the CPU with tiny sizes, to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import emit, header, random_rows, ratio, table

from streamdqn.learning.learner import DQNLearner, row_loss
from streamdqn.learning.replay.buffer import ReplayBuffer, RowBatch
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import N_ACTIONS, ROW_FIELDS, ROW_LAYOUT

BATCHES = (64, 256)
PUSH = 512


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], seconds: float, device: torch.device, per_call: int = 1) -> float:
    """Calls per second including the device's work (synchronized before and after)."""
    for _ in range(10):
        fn()
    synchronize(device)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(20):
            fn()
        done += 20
        synchronize(device)
    return done * per_call / (time.perf_counter() - started)


def filled_buffer(capacity: int, device: torch.device) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, device, seed=0)
    for start in range(0, capacity, 100_000):
        buffer.push(random_rows(min(100_000, capacity - start), seed=start))
    return buffer


def eager_async(learner: DQNLearner) -> Callable[[RowBatch], None]:
    """DQNLearner.update's steps without the per-update stats read-back."""
    s = learner.settings

    def update(sample: RowBatch) -> None:
        loss, _, _ = row_loss(learner.online, learner.target, sample, s.gamma, s.double_dqn)
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(learner.online.parameters(), s.grad_clip)
        learner.optimizer.step()
        learner.counters.updates += 1
        learner._sync_target()

    return update


def bench_updates(
    device: torch.device, seconds: float, graphs: bool, capacity: int, errors: dict[str, str]
) -> dict[str, dict[str, float]]:
    buffer = filled_buffer(capacity, device)
    out: dict[str, dict[str, float]] = {}
    for batch in BATCHES:
        settings = LearnerSettings(batch_size=batch, device=str(device), cuda_graph=False, seed=0)
        eager = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
        no_sync = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
        step_async = eager_async(no_sync)
        r = {
            "eager": rate(lambda: eager.update(buffer.sample(batch)), seconds, device),  # noqa: B023
            "eager-async": rate(lambda: step_async(buffer.sample(batch)), seconds, device),  # noqa: B023
        }
        if graphs:
            graphed = DQNLearner(settings.model_copy(update={"cuda_graph": True}), FEATURE_DIM, N_ACTIONS)
            fixed = buffer.sample(batch)
            # rate() warms up with ten calls: the learner captures its graph on the fourth.
            r["graphed"] = rate(lambda: graphed.update(buffer.sample(batch)), seconds, device)  # noqa: B023
            step = graphed.graphed_step
            if step is not None and step.captured:
                print(f"batch {batch}: captured with fused capturable Adam")
                r["graphed (no sampling)"] = rate(lambda: graphed.update(fixed), seconds, device)  # noqa: B023
            else:  # the learner fell back to eager updates: report it, keep measuring the rest
                errors[str(batch)] = (step.error if step is not None else None) or "no graph was captured"
                print(f"graph capture failed (batch {batch}): {errors[str(batch)][:500]}")
                del r["graphed"]
        out[str(batch)] = r
    return out


def bench_pushes(device: torch.device, seconds: float, capacity: int) -> dict[str, float]:
    rows = random_rows(PUSH, seed=1)
    columns = dict(zip(ROW_FIELDS, rows, strict=True))
    ours = ReplayBuffer(capacity, device, seed=0)
    ring = ReplayBuffer(capacity, device, seed=0)  # its storage, written directly below
    pin = device.type == "cuda"
    staging = {
        name: torch.from_numpy(np.zeros((PUSH, *shape), dtype)).pin_memory() if pin
        else torch.from_numpy(np.zeros((PUSH, *shape), dtype))
        for name, (dtype, shape) in ROW_LAYOUT.items()
    }

    def pageable() -> None:
        ring.storage.write({name: torch.from_numpy(a).to(device) for name, a in columns.items()})

    def reused_pinned() -> None:
        for name, a in columns.items():
            staging[name].numpy()[...] = a
        ring.storage.write({name: t.to(device, non_blocking=True) for name, t in staging.items()})
        # A reused staging buffer must not be overwritten before its copy ran; sync per push is the
        # simple price here (a real one would double-buffer with events).
        synchronize(device)

    return {
        "streamdqn push (pin_memory() + non_blocking)": rate(lambda: ours.push(rows), seconds, device),
        "pageable .to(device)": rate(pageable, seconds, device),
        "reused pinned staging + sync": rate(reused_pinned, seconds, device),
    }


def bench_ingest(device: torch.device, seconds: float, n_records: int) -> dict[str, float]:
    from _workload import BATCH_RECORDS, Ingest, build_records

    from streamdqn.learning.runners import RunnerOptions, ThreadRunner

    records = build_records(n_records)
    settings = LearnerSettings(device=str(device), seed=0)
    buffer = filled_buffer(20_000, device)
    learner = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    runner = ThreadRunner(
        learner, buffer, RunnerOptions(FEATURE_DIM, N_ACTIONS, min_size=1000, torch_threads=1)
    )
    ingest = Ingest(records, buffer, runner)
    ingest.full_speed(min(1.0, seconds))
    runner.note_ingested(0, 0)
    runner.start()
    try:
        out = {"ingest alone ev/s": ingest.full_speed(seconds)}
        runner.note_ingested(10**15, 0)
        time.sleep(0.5)
        before, started = runner.stats().updates, time.perf_counter()
        time.sleep(seconds)
        out["learner alone up/s"] = (runner.stats().updates - before) / (time.perf_counter() - started)
        before, started = runner.stats().updates, time.perf_counter()
        out["ingest with learner ev/s"] = ingest.full_speed(seconds)
        out["learner with ingest up/s"] = (runner.stats().updates - before) / (time.perf_counter() - started)
    finally:
        runner.stop()
    out["ingest ratio"] = ratio(out["ingest with learner ev/s"], out["ingest alone ev/s"])
    out["learner ratio"] = ratio(out["learner with ingest up/s"], out["learner alone up/s"])
    print(
        f"(ingest: IngestPipeline.process on {len(records):,} pre-built msgpack records, batches of "
        f"{BATCH_RECORDS}, no broker)"
    )
    return out


def run(smoke: bool, cpu_check: bool) -> dict[str, Any]:
    device = torch.device("cpu" if cpu_check else "cuda")
    seconds = 0.3 if (smoke or cpu_check) else 2.0
    capacity = 20_000 if (smoke or cpu_check) else 1_000_000
    torch.set_num_threads(1)
    name = "CPU (script check only)" if cpu_check else torch.cuda.get_device_name(device)
    print(f"device: {name}")
    errors: dict[str, str] = {}
    updates = bench_updates(device, seconds, graphs=not cpu_check, capacity=capacity, errors=errors)
    kinds = list(dict.fromkeys(k for r in updates.values() for k in r))
    table(
        ["", *(f"{k} up/s" for k in kinds), *(f"{k}/eager" for k in kinds[1:])],
        [
            [
                f"batch {b}",
                *(r.get(k, float("nan")) for k in kinds),
                *(ratio(r.get(k, float("nan")), r["eager"]) for k in kinds[1:]),
            ]
            for b, r in updates.items()
        ],
        title="DQN updates/s on the device (replay on the device)",
    )
    pushes = bench_pushes(device, seconds, capacity)
    table(
        ["push of 512 rows from numpy", "ops/s"],
        list(pushes.items()),
        title="replay pushes to the device",
    )
    ingest = bench_ingest(device, seconds if not smoke else 0.3, 4_000 if (smoke or cpu_check) else 40_000)
    table(["ingest with the learner on the device", "value"], list(ingest.items()))
    return {
        "bench": "gpu",
        "smoke": smoke,
        "device": name,
        "cpu_check": cpu_check,
        "updates_per_s": updates,
        "push_ops_per_s": pushes,
        "ingest": ingest,
        "graph_errors": errors,
        "graphed_vs_eager": {
            b: ratio(r.get("graphed", float("nan")), r["eager"]) for b, r in updates.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="shorter measurements")
    parser.add_argument(
        "--cpu-check", action="store_true", help="run the non-graph parts on the CPU (script check)"
    )
    args = parser.parse_args(argv)
    header("gpu", args.smoke, "eager vs CUDA-graphed updates, device pushes, ingest with a GPU learner")
    if not args.cpu_check and not torch.cuda.is_available():
        print(f"no CUDA: torch {torch.__version__} sees no CUDA device here; nothing to measure (exit 0)")
        emit({"bench": "gpu", "smoke": args.smoke, "skipped": "no CUDA"})
        return 0
    started = time.perf_counter()
    result = run(args.smoke, args.cpu_check)
    result["wall_s"] = time.perf_counter() - started
    print(f"wall time {result['wall_s']:.0f} s")
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
