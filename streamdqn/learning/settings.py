"""The learner's hyperparameters: one definition, used by the learner directly, extended by the daemon's
`[learner]` config section, and turned into `streamdqn train`'s options (names, defaults and help).

Each field's docstring is its help text.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Positive = Annotated[float, Field(gt=0)]


class LearnerSettings(BaseModel):
    """Hyperparameters of the DQN learner."""

    # No inf or nan: TOML can spell both, and `lr = inf` would only surface as NaN weights.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)

    hidden: tuple[Annotated[int, Field(ge=1, le=65536)], ...] = (256, 256)
    """Hidden layer sizes of the Q-network's MLP."""
    lr: Positive = 1e-4
    """Adam learning rate."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Decoupled weight decay (AdamW) when > 0; plain Adam at 0."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 0.99
    """Discount factor of the value of waiting."""
    n_steps: Annotated[int, Field(ge=1, le=64)] = 1
    """Ignore's target sums the next n steps' ignore rewards before it bootstraps (truncated at the
    episode's end): the final "missed" penalty reaches back along a chain of ignores n steps at a time."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64
    """Replay rows per update."""
    target_update_interval: Annotated[int, Field(ge=1)] = 1000
    """Copy the online network to the target network every this many updates (when tau is 0)."""
    tau: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Polyak averaging factor per update for the target network; 0 means hard copies."""
    grad_clip: Positive = 10.0
    """Clip the gradient's global norm to this."""
    double_dqn: bool = True
    """Double-DQN targets: the online network picks the next action, the target network values it."""
    prioritized: bool = False
    """Prioritized replay (proportional, Schaul et al. 2016): rows are sampled in proportion to their last
    |TD error| ** priority_alpha, with importance weights ** priority_beta correcting the bias."""
    priority_alpha: Annotated[float, Field(ge=0, le=1)] = 0.6
    """How strongly priorities skew sampling (0: uniform)."""
    priority_beta: Annotated[float, Field(ge=0, le=1)] = 0.4
    """How fully importance weights correct for prioritized sampling (1: fully)."""
    dueling: bool = False
    """Dueling head: Q = V(s) + A(s, a) - mean_a A(s, a) over a shared MLP body."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    cuda_graph: bool = True
    """On CUDA, replay each update from a captured CUDA graph (the same update, launched as one graph)."""
    seed: int | None = None
    """Seed of the network's initial weights and of replay sampling; none: random."""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = self.model_dump(mode="json")
        return d
