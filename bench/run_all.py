"""Run every benchmark, each in its own process, and summarize the ratios and targets.

    python bench/run_all.py [--smoke] [--json-out FILE] [--only a,b] [--skip a,b] [--jobs N]

Each benchmark prints its own table and ends with one JSON line; this collects those lines, prints
one summary of every target (met / missed / not judged), and with --json-out writes them all to
FILE. The full run takes several minutes on 2 cores and runs one benchmark at a time (they measure
the machine, so they must not share it). --smoke runs tiny sizes for CI, where only "does it run"
matters, two at a time unless --jobs says otherwise.

Exit status: 1 if a benchmark crashed (no JSON result, or a non-zero exit in smoke mode); missed
targets never fail the run: these are measurements, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import command_line, load_line, machine, table

HERE = Path(__file__).resolve().parent
# Order: cheap and independent first; quality (owned with the offline trainer) last, as it is the longest.
BENCHES = (
    "ingest", "learner", "replay", "concurrency", "memory", "publish", "daemon", "freshness", "gpu",
    "quality",
)
TIMEOUT_S = {"smoke": 300, "full": 1800}


@dataclass
class Outcome:
    name: str
    returncode: int
    seconds: float
    result: dict[str, Any] | None
    output: list[str] = field(default_factory=list)

    @property
    def crashed(self) -> bool:
        return self.result is None


def last_json(lines: list[str]) -> dict[str, Any] | None:
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "bench" in value:
                return value
    return None


_print_lock = threading.Lock()


def run_one(name: str, smoke: bool, stream: bool) -> Outcome:
    """Run bench/NAME.py; stream its output live (sequential runs) or print it when done (parallel)."""
    command = [sys.executable, str(HERE / f"{name}.py"), *(["--smoke"] if smoke else [])]
    started = time.perf_counter()
    lines: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE.parent
    )
    assert process.stdout is not None
    timer = threading.Timer(TIMEOUT_S["smoke" if smoke else "full"], process.kill)
    timer.start()
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if stream and not line.startswith('{"bench"'):
                print(line, end="", flush=True)
        returncode = process.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - started
    outcome = Outcome(name, returncode, seconds, last_json(lines), lines)
    with _print_lock:
        if not stream:
            print("\n".join(line for line in lines if not line.startswith('{"bench"')), flush=True)
        status = "crashed" if outcome.crashed else f"exit {returncode}"
        print(f"-- {name}: {status}, {seconds:.1f} s\n", flush=True)
    return outcome


def summarize(outcomes: list[Outcome], smoke: bool) -> list[list[object]]:
    rows: list[list[object]] = []
    for o in outcomes:
        if o.result is None:
            rows.append([o.name, "-", "-", "-", f"CRASHED (exit {o.returncode})"])
            continue
        if o.result.get("skipped"):
            rows.append([o.name, "-", "-", "-", f"skipped: {o.result['skipped']}"])
            continue
        targets = o.result.get("targets") or {}
        for target_name, t in targets.items():
            if not isinstance(t, dict) or "ratio" not in t:
                continue
            bound = f"{'<=' if t.get('at_most') else '>='} {t['target']}"
            verdict = (
                "not judged (smoke)" if smoke or t.get("met") is None else ("MET" if t["met"] else "MISSED")
            )
            rows.append(
                [o.name, target_name, t["ratio"] if t["ratio"] is not None else float("nan"), bound, verdict]
            )
        for key, label in (
            ("pull_304_vs_plain_get", "pull 304 / plain GET"),
            ("daemon_over_raw_msgpack", "streamdqn run / raw getmany, msgpack"),
            ("daemon_over_raw_json", "streamdqn run / raw getmany, JSON"),
            ("freshness_mean_s", "freshness mean s"),
            ("default_predicted_mean_s", "freshness at 300 s, mean s"),
        ):
            if key in o.result:
                value = o.result[key]
                shown = float("nan") if value is None else float(value)
                rows.append([o.name, label, shown, "", "(no target)"])
        if "target_met" in o.result:
            # quality.py's own verdict: the DQN's median return (over seeds) against the strongest
            # supervised reference's, with a false-positive rate no higher than that reference's.
            margin = o.result.get("return_margin")
            rows.append(
                [
                    o.name,
                    f"DQN - {o.result.get('strongest_reference', 'reference')} median return",
                    float(margin) if margin is not None else float("nan"),
                    ">= 0, FP <= it",
                    "not judged (smoke)" if smoke else ("MET" if o.result["target_met"] else "MISSED"),
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds each (CI); targets not judged"
    )
    parser.add_argument(
        "--json-out", type=Path, help="write every result (and the machine) to this JSON file"
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    parser.add_argument("--skip", help="comma-separated benchmarks to leave out")
    parser.add_argument("--jobs", type=int, help="benchmarks at once (default: 2 with --smoke, else 1)")
    args = parser.parse_args(argv)

    names = [n for n in BENCHES if (HERE / f"{n}.py").is_file()]
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = wanted - set(BENCHES)
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        names = [n for n in names if n in wanted]
    if args.skip:
        names = [n for n in names if n not in {s.strip() for s in args.skip.split(",")}]
    jobs = args.jobs or (2 if args.smoke else 1)
    if not args.smoke and jobs > 1:
        print("note: full runs measure the machine; running benchmarks at once skews every number")

    m = machine()
    print(f"== bench/run_all.py{' --smoke' if args.smoke else ''}: {', '.join(names)}")
    print(
        f"   {m['cpus_usable']} usable CPUs ({m['cpu_model']}), Python {m['python']}, torch {m['torch']}, "
        f"numpy {m['numpy']}; {load_line(m)}; {m['date']}\n",
        flush=True,
    )
    started = time.perf_counter()
    if jobs == 1:
        outcomes = [run_one(n, args.smoke, stream=True) for n in names]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = list(pool.map(lambda n: run_one(n, args.smoke, stream=False), names))
    wall = time.perf_counter() - started

    table(
        ["bench", "measure", "ratio / value", "target", "verdict"],
        summarize(outcomes, args.smoke),
        title=f"summary ({'smoke: nothing judged' if args.smoke else 'full run'}), {wall:.0f} s in all",
    )
    table(["bench", "seconds", "exit"], [[o.name, o.seconds, o.returncode] for o in outcomes])
    failures = [o.name for o in outcomes if o.crashed or (args.smoke and o.returncode != 0)]
    if args.json_out:
        payload = {
            "command": command_line(),
            "smoke": args.smoke,
            "machine": m,
            "wall_s": wall,
            "failures": failures,
            "results": {o.name: o.result for o in outcomes},
            "seconds": {o.name: o.seconds for o in outcomes},
            "exit_codes": {o.name: o.returncode for o in outcomes},
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nresults written to {args.json_out}")
    for o in outcomes:
        if o.name in failures:
            print(f"\n{o.name} failed (exit {o.returncode}); its last output lines:", file=sys.stderr)
            print("\n".join(o.output[-30:]), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
