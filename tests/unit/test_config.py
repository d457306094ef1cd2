"""Settings: TOML file, STREAMDQN_* environment overrides with `__` nesting, errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamdqn.config import Settings, load_settings
from streamdqn.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("STREAMDQN_"):
            monkeypatch.delenv(name)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamdqn.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.model_dump() == Settings().model_dump()
    assert settings.learner.hidden == (256, 256)
    assert settings.kafka.topic == "sandbox-telemetry"


def test_toml_sets_nested_values(tmp_path: Path) -> None:
    path = toml(
        tmp_path, '[learner]\nlr = 0.5\nhidden = [32, 16]\n\n[kafka]\ntopic = "t1"\n\n[log]\njson = true\n'
    )
    settings = load_settings(path)
    assert settings.learner.lr == 0.5
    assert settings.learner.hidden == (32, 16)
    assert settings.kafka.topic == "t1"
    assert settings.log.json_format is True
    assert settings.learner.gamma == 0.99  # untouched keys keep their defaults


def test_environment_overrides_the_file_with_double_underscore_nesting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = toml(tmp_path, '[learner]\nlr = 0.5\nbatch_size = 32\n\n[kafka]\ntopic = "from-file"\n')
    monkeypatch.setenv("STREAMDQN_LEARNER__LR", "0.25")
    monkeypatch.setenv("STREAMDQN_KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("STREAMDQN_LEARNER__HIDDEN", "[8, 8]")
    monkeypatch.setenv("STREAMDQN_LEARNER__DOUBLE_DQN", "false")
    monkeypatch.setenv("STREAMDQN_TANSU", "/opt/tansu")  # another component's variable: not a setting
    settings = load_settings(path)
    assert settings.learner.lr == 0.25
    assert settings.kafka.topic == "from-env"
    assert settings.learner.hidden == (8, 8)
    assert settings.learner.double_dqn is False
    assert settings.learner.batch_size == 32  # from the file
    assert load_settings(path, learner={"lr": 0.125}).learner.lr == 0.125  # explicit overrides win


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[learner]\nlearning_rate = 0.1\n", "learner.learning_rate"),
        ("[lerner]\nlr = 0.1\n", "lerner"),
        ("verbose = true\n", "verbose"),
        ("[learner]\nlr = -1\n", "learner.lr"),
        ('[learner]\nlr = "fast"\n', "learner.lr"),
        ("[replay]\ncapacity = 0\n", "replay.capacity"),
        ('[learner]\nmode = "fiber"\n', "learner.mode"),
        ("[learner]\nhidden = [32, 0]\n", "learner.hidden.1"),
        ("[learner]\nlr = inf\n", "learner.lr"),
        ("[learner]\nupdates_per_transition = inf\n", "learner.updates_per_transition"),
        ("[publish]\ngate_return_tolerance = nan\n", "publish.gate_return_tolerance"),
    ],
)
def test_unknown_key_or_bad_value_in_the_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(toml(tmp_path, text))
    message = str(info.value)
    assert key in message
    assert str(tmp_path) in message
    assert "STREAMDQN_" + key.replace(".", "__").upper() in message  # and how to set it from the environment


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("STREAMDQN_LEARNER__LEARNING_RATE", "0.1", "learner.learning_rate"),
        ("STREAMDQN_LEARNER__LR", "fast", "learner.lr"),
        ("STREAMDQN_REPLAY__MIN_SIZE", "-3", "replay.min_size"),
        ("STREAMDQN_LERNER__LR", "0.1", "STREAMDQN_LERNER__LR"),  # misspelt section: not silently ignored
        ("STREAMDQN_LEARNER__HIDDEN", "[32,", "learner"),  # not JSON
    ],
)
def test_unknown_key_or_bad_value_in_the_environment_names_the_key(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_settings()
    assert "None" not in str(info.value)


def test_bad_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"streamdqn\.toml") as info:
        load_settings(toml(tmp_path, "[learner\nlr = 0.1\n"))
    assert "line 1" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.learner.lr = 1.0  # type: ignore[misc]
