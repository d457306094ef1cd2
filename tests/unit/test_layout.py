"""The package's shape: classes stay small, the lifecycle server smaller still."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "streamdqn"


def class_lengths() -> dict[str, int]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                out[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_no_class_is_over_250_lines_and_the_lifecycle_server_is_under_200() -> None:
    lengths = class_lengths()
    assert lengths, "no classes found: the path is wrong"
    too_long = {name: n for name, n in lengths.items() if n > 250}
    assert not too_long, too_long
    assert lengths["streamdqn/daemon/server.py:Server"] < 200
