"""The offline training loop's options, and how keyword hyperparameters are routed to them or to the
learner (no torch here: the CLI builds `streamdqn train --help` from these fields)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamdqn.errors import ConfigError
from streamdqn.learning.settings import LearnerSettings


class OfflineOptions(BaseModel):
    """Knobs of the offline training loop that are not learner hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)

    replay_capacity: Annotated[int, Field(ge=1)] = 100_000
    """Replay buffer capacity, in rows."""
    learning_starts: Annotated[int, Field(ge=1)] = 64
    """Updates start once the buffer holds this many rows."""
    updates_per_transition: Annotated[float, Field(ge=0)] = 1.0
    """Replay ratio: updates per new row."""
    feature_clip: Annotated[float, Field(gt=0)] = 10.0
    """Normalized features are clipped to ±this."""
    reward_clip: Annotated[float, Field(gt=0)] = 10.0
    """Rewards given in events are clipped to ±this."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 50
    """Write a checkpoint every this many episodes."""
    log_every: Annotated[int, Field(ge=1)] = 10
    """Report progress every this many episodes."""
    torch_threads: Annotated[int, Field(ge=0)] = 1
    """torch intra-op threads; 0 keeps torch's default."""
    calibrate_ignore_margin: bool = True
    """At the end, tune the greedy policy's bias towards `ignore` on the training episodes (as the
    logistic baseline tunes its threshold on its fit split)."""
    calibration_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of the file's episodes kept out of training for that calibration (0: calibrate in-sample)."""


def split_hyperparameters(hyperparameters: dict[str, Any]) -> tuple[LearnerSettings, OfflineOptions]:
    """Route keyword hyperparameters to LearnerSettings or OfflineOptions; unknown or invalid ones are
    ConfigErrors that name them."""
    learner_keys = set(LearnerSettings.model_fields)
    option_keys = set(OfflineOptions.model_fields)
    unknown = set(hyperparameters) - learner_keys - option_keys
    if unknown:
        known = ", ".join(sorted(learner_keys | option_keys))
        raise ConfigError(f"unknown hyperparameter(s) {', '.join(sorted(unknown))}; known: {known}")
    try:
        return (
            LearnerSettings(**{k: v for k, v in hyperparameters.items() if k in learner_keys}),
            OfflineOptions(**{k: v for k, v in hyperparameters.items() if k in option_keys}),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ConfigError(f"invalid hyperparameter(s): {problems}") from None
