"""The training-curves picture: a real PNG from a real history file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from streamdqn.cli import main
from streamdqn.errors import StreamDQNError
from streamdqn.history import HISTORY_FILE, HistoryPoint, append_history, read_history
from streamdqn.offline.report import plot_report


def _history(state: Path, n: int = 30) -> None:
    for i in range(n):
        append_history(state, HistoryPoint(1_700_000_000 + 10 * i, 100 * i, 50 * i, math.sin(i / 4),
                                           1.0 / (i + 1), max(0.1, 1 - i / 20), i // 10))


def test_history_round_trip_skips_a_torn_line_and_keeps_nan(tmp_path: Path) -> None:
    _history(tmp_path, 3)
    append_history(tmp_path, HistoryPoint(1.0, 1, 1, float("nan"), float("nan"), 0.5, 0))
    with open(tmp_path / HISTORY_FILE, "a") as f:
        f.write('{"time": 3, "eve')  # a crash mid-append
    points = read_history(tmp_path)
    assert len(points) == 4
    assert math.isnan(points[-1].episode_return)
    assert points[0].events == 0


def test_report_png_has_size_and_is_not_blank(tmp_path: Path) -> None:
    _history(tmp_path)
    out = tmp_path / "report.png"
    assert main(["report", "--state", str(tmp_path), "--out", str(out)]) == 0
    pixels = image.imread(out)
    assert pixels.shape[0] >= 600
    assert pixels.shape[1] >= 600
    # Not blank: plenty of pixels differ from the background colour.
    background = pixels[0, 0]
    differs = np.abs(pixels - background).sum(axis=-1) > 0.1
    assert differs.mean() > 0.01


def test_report_without_history_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StreamDQNError, match="streamdqn train"):
        plot_report(tmp_path, tmp_path / "r.png")
