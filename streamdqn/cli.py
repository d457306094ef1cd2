"""streamdqn learns, from the telemetry that malware sandboxes stream to Kafka, when to ignore, contain,
terminate, quarantine or review a running sample, and serves the policy as versioned ONNX snapshots
that the sandboxes pull over HTTP.

examples:
  streamdqn demo --duration 60                     # broker + simulated sandboxes + the daemon, in one go
  streamdqn run --config /etc/streamdqn/streamdqn.toml"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic.fields import FieldInfo

from streamdqn.errors import StreamDQNError

EXIT_USAGE = 2


def _simulate(args: argparse.Namespace) -> int:
    from streamdqn.offline.simulator import format_for_path, simulate, without_labels, write_events

    fmt = args.format or format_for_path(args.out)
    events = simulate(args.episodes, args.seed, malicious_fraction=args.malicious_fraction,
                      sandboxes=args.sandboxes)
    verdicts: list[dict[str, object]] = []
    if args.verdicts_out:
        events = without_labels(events, verdicts, delay_seconds=args.verdict_delay)
    count = write_events(args.out, events, fmt=fmt)
    print(f"wrote {count} events of {args.episodes} episodes to {args.out} ({fmt})")
    if args.verdicts_out:
        write_events(args.verdicts_out, verdicts, fmt="jsonl")
        print(f"wrote {len(verdicts)} verdicts to {args.verdicts_out} (the events carry no labels)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from streamdqn.offline.train import train

    hyper = {name: getattr(args, name) for name in _TRAIN_OPTIONS if hasattr(args, name)}
    _, returns, _ = train(args.events, args.episodes, state_dir=args.state_dir, seed=args.seed,
                          progress=not args.quiet, strict=args.strict, **hyper)
    last = returns[-min(100, len(returns)):]
    print(f"trained {len(returns)} episodes; mean return of the last {len(last)}: "
          f"{sum(last) / len(last):+.3f}")
    print(f"checkpoints: {args.state_dir / 'checkpoints'}  "
          f"snapshot: {args.state_dir / 'snapshots' / 'latest'}  "
          f"curves: {args.state_dir / 'report.png'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from streamdqn.offline.evaluate import evaluate, format_report, write_decisions

    report = evaluate(args.snapshot, args.events, seed=args.seed)
    if args.decisions_out:
        write_decisions(args.decisions_out, report.decisions)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from streamdqn.config import load_settings
    from streamdqn.daemon import serve
    from streamdqn.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(json_format=settings.log.json_format, level=settings.log.level)
    return asyncio.run(serve(settings))


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from streamdqn.daemon.demo import DemoOptions, run_demo
    from streamdqn.logs import configure_logging

    configure_logging(json_format=False, level="WARNING" if args.quiet else "INFO")
    options = DemoOptions(args.duration, args.rate, args.state_dir, args.port, args.publish_interval,
                          args.seed, args.inline_labels, (args.verdict_delay_min, args.verdict_delay_max),
                          args.never_labelled)
    return asyncio.run(run_demo(options))


def _pull(args: argparse.Namespace) -> int:
    from streamdqn.client.pull import format_pull_result, pull
    from streamdqn.snapshots.signing import load_verifier

    token = args.token_file.read_text().strip() if args.token_file else ""
    verifier = load_verifier(args.verify_alg, str(args.verify_key)) if args.verify_key else None
    print(format_pull_result(pull(args.url, args.out, token=token, verifier=verifier,
                                  sandbox_id=args.sandbox_id)))
    return 0


def _snapshots(args: argparse.Namespace) -> int:
    from streamdqn.snapshots.rollout_cli import RolloutCommand, run_rollout

    root = args.dir if args.dir is not None else args.state_dir / "snapshots"
    print(run_rollout(RolloutCommand(args.action, root, getattr(args, "version", None),
                                     getattr(args, "sandbox_id", None), getattr(args, "reason", ""),
                                     args.json)))
    return 0


def _snapshot_version(text: str) -> int:
    """A version argument: a canonical ASCII decimal, so "١٢" or "012" is refused rather than read as 12."""
    from streamdqn.snapshots.layout import parse_version

    version = parse_version(text.strip())
    if version is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a snapshot version (1 to 12 ASCII digits, no sign, no leading zero)")
    return version


def _report(args: argparse.Namespace) -> int:
    from streamdqn.offline.report import plot_report

    n = plot_report(args.state, args.out)
    print(f"wrote {args.out} ({n} points from {args.state})")
    return 0


def _version() -> str:
    import torch

    from streamdqn import __version__

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return f"streamdqn {__version__} (torch {torch.__version__}, device {device})"


class _VersionAction(argparse.Action):
    """--version, computed only when asked for (it imports torch)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version, torch's and the device")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(_version())
        parser.exit()


def _import(args: argparse.Namespace) -> int:
    from streamdqn.offline.importer import import_files

    summary = import_files(args.source, args.inputs, args.out, verdicts_out=args.verdicts_out,
                           labels=args.labels, calls_per_step=args.calls_per_step,
                           step_seconds=args.step_seconds, sandboxes=args.sandboxes)
    for warning in summary.warnings():
        print(f"streamdqn import: {warning}", file=sys.stderr)
    print(summary.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamdqn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="write simulated sandbox telemetry to a file")
    p.add_argument("--episodes", type=int, default=1000, help="number of detonations (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True,
                   help="output file (.jsonl: JSON Lines, .json: JSON array)")
    p.add_argument("--format", choices=["jsonl", "json"], help="override the format implied by --out")
    p.add_argument("--malicious-fraction", type=float, default=0.5)
    p.add_argument("--sandboxes", type=int, default=8)
    p.add_argument("--verdicts-out", type=Path, metavar="FILE",
                   help="write telemetry without labels, and each episode's verdict to this JSON Lines file")
    p.add_argument("--verdict-delay", type=float, default=60.0, metavar="S",
                   help="verdict timestamp after the episode's last event (default 60 s)")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("import", help="turn real API-call traces (MalBehavD-V1 CSV, CAPE/Cuckoo reports) "
                                      "into telemetry; the mapping is in streamdqn/offline/importer.py")
    p.add_argument("source", choices=["malbehavd", "cape"],
                   help="malbehavd: the MalBehavD-V1 CSV; cape: CAPE or Cuckoo 2 report.json files")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="input files (cape: also directories, every *.json under them)")
    p.add_argument("--out", type=Path, required=True,
                   help="telemetry file (.jsonl: JSON Lines, .json: JSON array)")
    p.add_argument("--verdicts-out", type=Path, metavar="FILE",
                   help="write labels to this JSON Lines file and leave them out of the telemetry")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="cape: CSV sha256,is_malicious[,severity]; without it, reports are unlabelled")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--calls-per-step", type=int, metavar="N",
                     help="calls per step (default: malbehavd 5 API names, cape 100 call records)")
    cut.add_argument("--step-seconds", type=float, metavar="S",
                     help="cape: cut steps by time windows of S seconds instead")
    p.add_argument("--sandboxes", type=int, default=8, metavar="N",
                   help="sandbox ids to spread episodes over (default 8)")
    p.set_defaults(func=_import)

    p = sub.add_parser("train", help="train offline from a telemetry file (simulated data when none given)",
                       description="Train offline from a telemetry file and publish the final snapshot. "
                       "Learner and loop options default to the values below; the daemon's [learner] "
                       "section has the same names.")
    p.add_argument("--events", type=Path, help="telemetry file: JSON array or JSON Lines")
    p.add_argument("--episodes", type=int, default=500, help="training episodes (default 500)")
    p.add_argument("--state-dir", type=Path, default=Path("state"), help="checkpoints and snapshots go here")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the episode order, initial weights and replay sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--strict", action="store_true",
                   help="any rejected record is an error (default: report rejects and train on the rest)")
    _add_model_options(p.add_argument_group("learner"), _learner_fields())
    _add_model_options(p.add_argument_group("training loop"), _offline_fields())
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="replay episodes through a snapshot (onnxruntime) against baselines")
    p.add_argument("--snapshot", type=Path, required=True,
                   help="a snapshot version directory, or a snapshots directory (its latest)")
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--decisions-out", type=Path, help="write one JSON line per episode with its decision")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("run", help="the online-learning daemon: Kafka in, ONNX snapshots and metrics out")
    p.add_argument("--config", type=Path,
                   help="TOML config file; STREAMDQN_* environment variables override it")
    p.set_defaults(func=_run)

    p = sub.add_parser("demo", help="embedded broker + simulated sandboxes + the daemon, in one command")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--rate", type=float, default=500.0, help="simulated events per second (default 500)")
    p.add_argument("--state-dir", type=Path, default=Path("state-demo"))
    p.add_argument("--port", type=int, default=8765,
                   help="HTTP port for /metrics and /snapshots (0: any free)")
    p.add_argument("--publish-interval", type=float, default=15.0, help="seconds between snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inline-labels", action="store_true",
                   help="label every event (a training farm) instead of sending verdicts afterwards")
    p.add_argument("--verdict-delay-min", type=float, default=1.0, metavar="S",
                   help="shortest delay from an episode's last event to its verdict (default 1 s)")
    p.add_argument("--verdict-delay-max", type=float, default=5.0, metavar="S",
                   help="longest delay (default 5 s)")
    p.add_argument("--never-labelled", type=float, default=0.03, metavar="SHARE",
                   help="share of episodes whose verdict never comes (default 0.03)")
    p.add_argument("--quiet", action="store_true", help="only warnings and the summary")
    p.set_defaults(func=_demo)

    p = sub.add_parser("pull", help="sandbox side: fetch the latest snapshot if it changed, verified")
    p.add_argument("--url", required=True, help="the daemon's base URL, e.g. http://127.0.0.1:8765")
    p.add_argument("--out", type=Path, required=True, help="local directory for model.onnx and manifest.json")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token, if the server needs one")
    p.add_argument("--verify-key", type=Path, help="public key (ed25519) or shared secret (hmac-sha256)")
    p.add_argument("--verify-alg", choices=["ed25519", "hmac-sha256"], default="ed25519")
    p.add_argument("--sandbox-id", metavar="ID",
                   help="this sandbox's id: the server answers with its pin, the canary or stable")
    p.set_defaults(func=_pull)

    _add_snapshots_parser(sub)

    p = sub.add_parser("report", help="draw training curves (return, loss, replay ratio, snapshots) as a PNG")
    p.add_argument("--state", type=Path, default=Path("state"), help="the state directory of a run")
    p.add_argument("--out", type=Path, default=Path("report.png"))
    p.set_defaults(func=_report)
    return parser


def _add_snapshots_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshots", help="channels, pins and rollback of a snapshot store",
                       description="Show and change what sandboxes are served: the stable and canary "
                       "channels, a pin that holds stable, and per-sandbox pins. Safe while the daemon "
                       "runs: it serves a change on the next request.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    place = where.add_mutually_exclusive_group(required=True)
    place.add_argument("--dir", type=Path, help="the snapshot store (the daemon's <state-dir>/snapshots)")
    place.add_argument("--state-dir", type=Path, help="the daemon's state directory (its snapshots/)")
    where.add_argument("--json", action="store_true", help="print the result as JSON")
    why = argparse.ArgumentParser(add_help=False)
    why.add_argument("--reason", default="", help="recorded in channels.log with the change")

    actions.add_parser("list", parents=[where], help="channels, pins, versions and recent changes")
    a = actions.add_parser("pin", parents=[where, why],
                           help="point stable at VERSION and hold it there until unpinned "
                           "(with --sandbox-id: serve VERSION to that one sandbox)")
    a.add_argument("version", type=_snapshot_version, metavar="VERSION")
    a.add_argument("--sandbox-id", metavar="ID", help="pin this sandbox, not stable")
    a = actions.add_parser("unpin", parents=[where, why],
                           help="let promotion move stable again (with --sandbox-id: the sandbox "
                           "follows the channels again)")
    a.add_argument("--sandbox-id", metavar="ID", help="unpin this sandbox, not stable")
    a = actions.add_parser("rollback", parents=[where, why],
                           help="point stable at the previous stable version (or --to VERSION); "
                           "refused while stable is pinned")
    a.add_argument("--to", dest="version", type=_snapshot_version, metavar="VERSION")
    a = actions.add_parser("promote", parents=[where, why],
                           help="point stable at the canary (or at VERSION) and clear the canary")
    a.add_argument("version", type=_snapshot_version, nargs="?", metavar="VERSION")
    actions.add_parser("demote", parents=[where, why], help="take the canary out")
    p.set_defaults(func=_snapshots)


_TRAIN_OPTIONS: set[str] = set()


def _learner_fields() -> dict[str, FieldInfo]:
    from streamdqn.learning.settings import LearnerSettings

    # The seed is the command's own --seed (it also orders the episodes).
    return {k: v for k, v in LearnerSettings.model_fields.items() if k != "seed"}


def _offline_fields() -> dict[str, FieldInfo]:
    from streamdqn.offline.options import OfflineOptions

    return dict(OfflineOptions.model_fields)


def _add_model_options(group: argparse._ArgumentGroup, fields: dict[str, FieldInfo]) -> None:
    """One --option per settings field, its help the field's docstring and its default the field's.

    Values are parsed by the settings model itself (the same validation as the config file); an option
    not given is not passed, so the model's default applies.
    """
    for name, info in fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{info.description or ''} (default: {shown})".strip()
        kwargs: dict[str, object] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", type=int, metavar="N")
        elif default is None or info.annotation not in (int, float, str):
            kwargs.update(type=_optional_number, metavar="VALUE")
        else:
            kwargs["type"] = info.annotation
        group.add_argument(flag, **kwargs)  # type: ignore[arg-type]
        _TRAIN_OPTIONS.add(name)


def _optional_number(text: str) -> float | None:
    """A number, or `none` for a setting that can be unset."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StreamDQNError as exc:
        print(f"streamdqn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"streamdqn {args.command}: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
