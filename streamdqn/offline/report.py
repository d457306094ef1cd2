"""The picture of a run's training history (streamdqn.history), for users without Grafana: `streamdqn
report --state DIR --out report.png` draws episode return, loss, the
achieved samples per inserted row and snapshot versions over time.
"""

from __future__ import annotations

from pathlib import Path

from streamdqn.history import HISTORY_FILE, read_history


def plot_report(state_dir: Path, out: Path) -> int:
    """Draw the history of `state_dir` into a PNG at `out`; returns the number of points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(state_dir) / HISTORY_FILE
    if not path.is_file():
        from streamdqn.errors import StreamDQNError

        raise StreamDQNError(f"no training history at {path}: run `streamdqn train` or the daemon first")
    points = read_history(state_dir)
    t0 = points[0].time if points else 0.0
    minutes = [(p.time - t0) / 60 for p in points]
    panels = [
        ("episode return", [p.episode_return for p in points]),
        ("loss", [p.loss for p in points]),
        ("samples per insert", [p.samples_per_insert for p in points]),
        ("snapshot version", [p.snapshot_version for p in points]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 10), sharex=True)
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.plot(minutes, values, marker="." if len(points) < 50 else None)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"streamdqn training — {state_dir}")
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(points)
