"""bench/quality.py's ablation mode: variants parsed, references shared, tables and --combine."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("sklearn", reason="the hgb reference needs scikit-learn (the `bench` extra)")

# bench scripts import their siblings by name (their directory is first on sys.path); do the same.
BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
quality: ModuleType = importlib.import_module("quality")

SMALL = ["--smoke", "--seeds", "0", "--train-episodes", "10", "--reference-folds", "2"]


def test_a_variant_splits_at_commas_before_a_key_only() -> None:
    variant = quality._variant("hidden=[128,128],lr=1e-4,dueling=true")
    assert variant.hyperparameters == {"hidden": [128, 128], "lr": 1e-4, "dueling": True}
    assert variant.name == "hidden=[128,128],lr=1e-4,dueling=true"


def test_ablation_runs_the_defaults_first_then_each_improvement_or_the_named_variants() -> None:
    assert quality.parse_args(["--ablation"]).variants == list(quality.ABLATION)
    named = quality.parse_args(["--variant", "n_steps=5"])
    assert named.ablation
    assert [v.name for v in named.variants] == ["defaults", "n_steps=5"]
    single = quality.parse_args(["--set", "n_steps=3", "--set", "dueling=true"])
    assert not single.ablation
    assert [v.name for v in single.variants] == ["n_steps=3,dueling=true"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--variant", "defaults=1", "--variant", "defaults=1"])


def test_a_cell_is_the_median_with_the_range_unless_the_seeds_agree() -> None:
    spread = {"median": 0.5104, "min": 0.5021, "max": 0.512}
    assert quality._cell(spread, "return") == "+0.510 [+0.502, +0.512]"
    assert quality._cell({"median": 0.0, "min": 0.0, "max": 0.0}, "percent") == "0.0 %"
    assert quality._cell({"median": None, "min": None, "max": None}, "steps") == "-"


def _run(argv: list[str], log: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert quality.main(argv) == 0
    log.write_text(out.getvalue(), encoding="utf-8")
    result: dict[str, Any] = json.loads(out.getvalue().splitlines()[-1])
    return result


def test_an_ablation_equals_separate_runs_and_combines_into_one_table(tmp_path: Path) -> None:
    both = _run([*SMALL, "--variant", "n_steps=3"], tmp_path / "both.log")
    defaults = _run(SMALL, tmp_path / "defaults.log")
    n_steps = _run([*SMALL, "--set", "n_steps=3"], tmp_path / "n_steps.log")

    def seed0(result: dict[str, Any], variant: int = 0) -> dict[str, Any]:
        metrics: dict[str, Any] = result["variants"][variant]["per_seed"][0]["metrics"]
        return metrics

    # The references and baselines are fitted once and shared: the same in both variants.
    shared = {n: m for n, m in seed0(both).items() if n != "streamdqn"}
    assert shared == {n: m for n, m in seed0(both, 1).items() if n != "streamdqn"}
    # Sharing changes nothing: each variant scores as its own run does.
    assert seed0(both)["streamdqn"] == seed0(defaults)["streamdqn"]
    assert seed0(both, 1)["streamdqn"] == seed0(n_steps)["streamdqn"]
    assert seed0(both)["streamdqn"] != seed0(both, 1)["streamdqn"]

    table = [line for line in (tmp_path / "both.log").read_text().splitlines() if line.startswith("|")]
    combined = io.StringIO()
    with contextlib.redirect_stdout(combined):
        assert quality.main(["--combine", str(tmp_path / "defaults.log"), str(tmp_path / "n_steps.log")]) == 0
    combined_table = [line for line in combined.getvalue().splitlines() if line.startswith("|")]
    # Training times differ between runs; every other cell of the two tables is the same.
    assert [row.rsplit("|", 2)[0] for row in combined_table] == [row.rsplit("|", 2)[0] for row in table]
    labels = [row.split(" | ")[0] for row in table[2:4]]
    assert labels == ["| streamdqn `defaults`", "| streamdqn `n_steps=3`"]


def test_combine_refuses_runs_on_different_seeds(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    for path, seeds in ((first, [0]), (second, [1])):
        path.write_text(json.dumps({"bench": "quality", "seeds": seeds, "variants": []}) + "\n")
    with pytest.raises(SystemExit, match="seeds"):
        quality.combine([first, second])
