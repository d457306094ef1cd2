"""Concurrent: ingest and learning at once on this machine, learner as a thread vs as a process.

Ingest here is IngestPipeline.process on pre-built msgpack Records (one simulated event each, 4
partitions, batches of 2000 as the daemon's max_poll_records) in the main thread, with the
daemon's housekeeping (the normalization handed to the learner every 0.5 s). No broker: that
is bench/ingest.py's subject, and here it would only add noise. The learner is streamdqn's own
runner (ThreadRunner, or ProcessRunner over a shared-memory ReplayBuffer), batch 64, one torch
thread, replay pre-filled.

For each mode, in alternating rounds of T seconds:
    ingest alone    the learner idles (its insert budget is set to zero, so it sleeps)
    learner alone   ingest idles
    both            ingest at full speed with the learner running
then the curve: ingest paced at fixed event rates with the learner running, updates/s for each.

    python bench/concurrency.py [--smoke]
Targets (full-speed ingest): ingest >= 0.7x alone and learner >= 0.7x alone, per mode. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch
from _common import Target, emit, header, random_rows, ratio, report_targets, table
from _workload import BATCH_RECORDS, N_ACTIONS, Ingest, build_records

from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.runners import LearnerRunner, ProcessRunner, RunnerOptions, ThreadRunner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.sources import Record

RATES = (1_000, 10_000, 50_000)
TARGET = 0.7
RUNNING = 10**15  # "rows inserted" that leaves the learner an unlimited update budget


def updates(runner: LearnerRunner) -> int:
    return runner.stats().updates


def make_runner(mode: str, capacity: int, prefill: int) -> tuple[LearnerRunner, ReplayBuffer]:
    settings = LearnerSettings(device="cpu", seed=0)
    options = RunnerOptions(
        FEATURE_DIM, N_ACTIONS, min_size=1000, updates_per_transition=1.0, torch_threads=1
    )
    learner = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    runner: LearnerRunner
    if mode == "process":
        lock = ProcessRunner.make_lock()
        buffer = ReplayBuffer(capacity, "cpu", seed=0, shared=True, lock=lock)
        runner = ProcessRunner(settings, None, buffer, lock, options, learner.online.state_dict())
    else:
        buffer = ReplayBuffer(capacity, "cpu", seed=0)
        runner = ThreadRunner(learner, buffer, options)
    buffer.push(random_rows(prefill))
    return runner, buffer


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU time (user + system) of a process, or of one of its threads, from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def context_switches(pid: int, tid: int | None = None) -> tuple[int, int]:
    """(voluntary, involuntary): waits (a lock, the GIL, sleep) vs preemptions by other runnable tasks."""
    path = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    values = {}
    with open(path) as f:
        for line in f:
            if "ctxt_switches" in line:
                key, value = line.split(":")
                values[key.strip()] = int(value)
    return values["voluntary_ctxt_switches"], values["nonvoluntary_ctxt_switches"]


def learner_clock(runner: LearnerRunner) -> tuple[int, int | None]:
    """(pid, tid) whose CPU time is the learner's: its thread here, or its own process."""
    if isinstance(runner, ProcessRunner):
        return runner._process.pid, None
    assert isinstance(runner, ThreadRunner)
    assert runner._thread is not None
    return os.getpid(), runner._thread.native_id


class Window:
    """Wall time, updates, and the CPU time of the ingest thread and of the learner, over a window."""

    def __init__(self, runner: LearnerRunner) -> None:
        self.runner = runner
        self.learner = learner_clock(runner)
        self.ingest = (os.getpid(), threading.main_thread().native_id)

    def __enter__(self) -> Window:
        self.t0, self.u0 = time.perf_counter(), updates(self.runner)
        self.ci0, self.cl0 = cpu_seconds(*self.ingest), cpu_seconds(*self.learner)
        self.sw0 = context_switches(*self.learner)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.updates_per_s = (updates(self.runner) - self.u0) / self.wall
        self.ingest_cores = (cpu_seconds(*self.ingest) - self.ci0) / self.wall
        self.learner_cores = (cpu_seconds(*self.learner) - self.cl0) / self.wall
        sw = context_switches(*self.learner)
        self.learner_waits_per_s = (sw[0] - self.sw0[0]) / self.wall
        self.learner_preempted_per_s = (sw[1] - self.sw0[1]) / self.wall


def measure_mode(
    mode: str, records: list[Record], seconds: float, rounds: int, curve_seconds: float, capacity: int
) -> dict[str, Any]:
    runner, buffer = make_runner(mode, capacity, prefill=20_000)
    ingest = Ingest(records, buffer, runner)
    ingest.full_speed(min(1.0, seconds))  # warm-up: first-call costs, page faults in the ring
    runner.note_ingested(0, 0)  # idle until told otherwise
    runner.start()
    try:
        runner.note_ingested(RUNNING, 0)
        deadline = time.monotonic() + 120
        while updates(runner) < 20:  # a process has to spawn and import torch first
            if time.monotonic() > deadline or not runner.alive():
                raise RuntimeError(f"the {mode} learner did not start")
            time.sleep(0.05)
        names = ("ingest_alone", "learner_alone", "ingest_both", "learner_both")
        samples: dict[str, list[float]] = {k: [] for k in names}
        # Cores used (CPU seconds per second) by the ingest thread and the learner in each window: what
        # the learner lost to the GIL or to other processes shows up here, not as a lock inside streamdqn.
        cores: dict[str, list[float]] = {
            k: [] for k in ("ingest_alone", "learner_alone", "both_ingest", "both_learner")
        }
        switches: dict[str, list[float]] = {
            k: [] for k in ("waits_alone", "preempted_alone", "waits_both", "preempted_both")
        }
        for r in range(rounds):
            order = ("alone", "both") if r % 2 == 0 else ("both", "alone")
            for what in order:
                if what == "alone":
                    runner.note_ingested(0, 0)
                    time.sleep(0.05)  # let an update in flight finish
                    with Window(runner) as w:
                        samples["ingest_alone"].append(ingest.full_speed(seconds))
                    cores["ingest_alone"].append(w.ingest_cores)
                    runner.note_ingested(RUNNING, 0)
                    with Window(runner) as w:
                        time.sleep(seconds)
                    samples["learner_alone"].append(w.updates_per_s)
                    cores["learner_alone"].append(w.learner_cores)
                    switches["waits_alone"].append(w.learner_waits_per_s)
                    switches["preempted_alone"].append(w.learner_preempted_per_s)
                else:
                    with Window(runner) as w:
                        samples["ingest_both"].append(ingest.full_speed(seconds))
                    samples["learner_both"].append(w.updates_per_s)
                    cores["both_ingest"].append(w.ingest_cores)
                    cores["both_learner"].append(w.learner_cores)
                    switches["waits_both"].append(w.learner_waits_per_s)
                    switches["preempted_both"].append(w.learner_preempted_per_s)
        result: dict[str, Any] = {k: statistics.median(v) for k, v in samples.items()}
        result["cores"] = {k: statistics.median(v) for k, v in cores.items()}
        result["learner_context_switches_per_s"] = {k: statistics.median(v) for k, v in switches.items()}
        result["rounds"] = samples
        curve = {}
        for rate in RATES:
            with Window(runner) as w:
                achieved = ingest.paced(rate, curve_seconds)
            curve[str(rate)] = {
                "events_per_s": achieved,
                "updates_per_s": w.updates_per_s,
                "ingest_cores": w.ingest_cores,
                "learner_cores": w.learner_cores,
            }
        result["curve"] = curve
    finally:
        runner.stop()
    result["ingest_ratio"] = ratio(result["ingest_both"], result["ingest_alone"])
    result["learner_ratio"] = ratio(result["learner_both"], result["learner_alone"])
    return result


def run(smoke: bool) -> dict[str, Any]:
    seconds, rounds, curve_seconds = (0.3, 1, 0.2) if smoke else (3.0, 2, 4.0)
    n_records = 4_000 if smoke else 60_000
    torch.set_num_threads(1)
    records = build_records(n_records)
    print(
        f"ingest: IngestPipeline.process on {len(records):,} pre-built msgpack Records in batches of "
        f"{BATCH_RECORDS} (no broker; bench/ingest.py covers it); learner batch 64, 1 torch thread"
    )
    modes = {
        mode: measure_mode(mode, records, seconds, rounds, curve_seconds, capacity=200_000)
        for mode in ("thread", "process")
    }
    table(
        [
            "learner as",
            "ingest alone ev/s",
            "with learner ev/s",
            "ratio",
            "learner alone up/s",
            "with ingest up/s",
            "ratio",
        ],
        [
            [
                m,
                r["ingest_alone"],
                r["ingest_both"],
                r["ingest_ratio"],
                r["learner_alone"],
                r["learner_both"],
                r["learner_ratio"],
            ]
            for m, r in modes.items()
        ],
        title=f"full-speed ingest with the learner, median of {rounds} alternating round(s) of {seconds:g} s",
    )
    table(
        [
            "learner as",
            "ingest alone",
            "learner alone",
            "both: ingest",
            "both: learner",
            "learner waits/s",
            "learner preempted/s",
        ],
        [
            [
                m,
                r["cores"]["ingest_alone"],
                r["cores"]["learner_alone"],
                r["cores"]["both_ingest"],
                r["cores"]["both_learner"],
                f"{r['learner_context_switches_per_s']['waits_alone']:.0f} -> "
                f"{r['learner_context_switches_per_s']['waits_both']:.0f}",
                f"{r['learner_context_switches_per_s']['preempted_alone']:.0f} -> "
                f"{r['learner_context_switches_per_s']['preempted_both']:.0f}",
            ]
            for m, r in modes.items()
        ],
        title="cores used (CPU s per s, /proc) by the ingest thread and the learner in those windows, "
        "and the learner's context switches (alone -> both)",
    )
    print(
        "  (2 cores in all: what ingest and the learner do not use went to other processes. Waits are\n"
        "   voluntary switches: the GIL, a lock, a sleep. Preemptions: another runnable task took the core.)"
    )
    rows = []
    for rate in RATES:
        t, p = modes["thread"]["curve"][str(rate)], modes["process"]["curve"][str(rate)]
        rows.append(
            [
                f"{rate:,} ev/s",
                t["events_per_s"],
                t["updates_per_s"],
                ratio(t["updates_per_s"], modes["thread"]["learner_alone"]),
                p["events_per_s"],
                p["updates_per_s"],
                ratio(p["updates_per_s"], modes["process"]["learner_alone"]),
            ]
        )
    table(
        [
            "paced ingest",
            "thread: ev/s",
            "thread: up/s",
            "vs alone",
            "process: ev/s",
            "process: up/s",
            "vs alone",
        ],
        rows,
        title=f"updates/s at fixed ingest rates ({curve_seconds:g} s each; ev/s = achieved)",
    )
    targets = []
    for mode, r in modes.items():
        targets.append(Target(f"concurrent_{mode}_ingest_with_learner", r["ingest_ratio"], TARGET))
        targets.append(Target(f"concurrent_{mode}_learner_with_ingest", r["learner_ratio"], TARGET))
    verdicts = report_targets(targets, smoke)
    return {
        "bench": "concurrency",
        "smoke": smoke,
        "seconds": seconds,
        "rounds": rounds,
        "ingest": "IngestPipeline.process on pre-built Records (no broker)",
        "modes": modes,
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; targets not judged")
    args = parser.parse_args(argv)
    header("concurrency", args.smoke, "ingest and learner at once: thread vs process")
    emit(run(args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
