"""Progress written where it goes: plain lines to a file or pipe, a redrawn bar only on a terminal.

The `streamdqn train` tests run the real CLI in a subprocess with stdout and stderr going to a file,
as under systemd or `| tee`.
"""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamdqn.offline.simulator import simulate, write_events
from streamdqn.progress import Progress

REPO = Path(__file__).resolve().parents[2]
EPISODES, LOG_EVERY = 20, 10
BAD_LINES = ['{"sandbox_id": "sbx-00", "episode_id": 1}', '{"truncated": ']
BAR_LINE = re.compile(r"training: (\d+)/20 ep \(\d+ %, [\d.]+ ep/s(, \d+ s left)?\)")
EPISODE_LINE = re.compile(r"episode +(\d+)  greedy return [-+][\d.]+  avg loss \S+  samples/insert \S+  "
                          r"buffer \d+")


@pytest.fixture(scope="module")
def events_with_bad_lines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "events.jsonl"
    write_events(path, simulate(6, seed=3, sandboxes=2))
    with path.open("a") as f:
        f.writelines(line + "\n" for line in BAD_LINES)
    return path


def train(events: Path, state_dir: Path, *extra: str) -> tuple[int, str]:
    """`streamdqn train` with stdout and stderr into one file; (exit code, what it wrote)."""
    log = state_dir.parent / f"{state_dir.name}.log"
    command = [sys.executable, "-m", "streamdqn", "train", "--events", str(events), "--episodes",
               str(EPISODES), "--state-dir", str(state_dir), "--hidden", "8", "--log-every", str(LOG_EVERY),
               "--no-calibrate-ignore-margin", *extra]
    with log.open("wb") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                              check=False).returncode
    return code, log.read_bytes().decode()


def test_train_to_a_file_writes_plain_lines_and_reports_rejects(
    events_with_bad_lines: Path, tmp_path: Path
) -> None:
    code, text = train(events_with_bad_lines, tmp_path / "state")
    assert code == 0, text
    assert "\r" not in text
    lines = text.splitlines()

    episode_lines = [int(m.group(1)) for line in lines if (m := EPISODE_LINE.fullmatch(line))]
    assert episode_lines == list(range(LOG_EVERY, EPISODES + 1, LOG_EVERY))
    # Progress's own lines: every tenth of the total (2 episodes here), the last one at 20/20.
    done = [int(m.group(1)) for line in lines if (m := BAR_LINE.fullmatch(line))]
    assert set(range(2, EPISODES + 1, 2)) <= set(done)
    assert done == sorted(done)
    assert done[-1] == EPISODES

    summary = [line for line in lines if "rejected" in line]
    assert len(summary) == 1
    assert re.search(r"events of 6 episodes; rejected 2 \(", summary[0])
    n = len(events_with_bad_lines.read_text().splitlines())
    assert any(line.startswith(f"  line {n - 1}: validation_error: ") for line in lines)
    assert any(line.startswith(f"  line {n}: decode_error: ") for line in lines)
    assert f"trained {EPISODES} episodes" in text
    assert (tmp_path / "state" / "snapshots" / "latest").is_dir()


def test_strict_train_refuses_the_file_before_training(events_with_bad_lines: Path, tmp_path: Path) -> None:
    code, text = train(events_with_bad_lines, tmp_path / "state", "--strict")
    assert code == 1
    assert "streamdqn train: error:" in text
    assert "rejected 2 (" in text
    assert "--strict" in text
    assert "Traceback" not in text
    assert not BAR_LINE.search(text)
    assert not (tmp_path / "state").exists()  # nothing trained, nothing written


def test_plain_lines_every_n_items_off_a_terminal() -> None:
    stream = io.StringIO()
    with Progress(9, "work", unit="it", stream=stream, every_items=4, every_seconds=3600) as bar:
        for _ in range(9):
            bar.update()
        bar.write("a message")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines[:-1]] == ["4/9", "8/9", "9/9"]  # and the last one
    assert lines[-1] == "a message"
    assert "\r" not in stream.getvalue()


def test_disabled_progress_writes_nothing() -> None:
    stream = io.StringIO()
    with Progress(5, "work", enabled=False, stream=stream, every_items=1) as bar:
        bar.update(5)
        bar.write("hidden")
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_redrawn_bar() -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert tty.isatty()
            with Progress(3, "work", stream=tty, every_items=1) as bar:
                for _ in range(3):
                    bar.update()
            tty.flush()
        text = os.read(leader, 65536).decode(errors="replace")
    finally:
        os.close(follower)
        os.close(leader)
    assert re.search(r"\r(?!\n)", text)  # a carriage return that redraws (not the tty's \r\n)
    assert "work: 1/3" not in text  # the plain-line format is for files and pipes only
