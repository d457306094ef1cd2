"""Settings: one pydantic-settings model, read from a TOML file and STREAMDQN_* environment variables.

Environment variables override the file and use `__` for nesting, e.g. STREAMDQN_KAFKA__BOOTSTRAP_SERVERS.
There is no module-level instance: the CLI builds one with `load_settings()` and hands each part its
own section as plain values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamdqn.errors import ConfigError
from streamdqn.learning.settings import LearnerSettings

Positive = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    # No inf or nan: TOML can spell both, and `lr = inf` would only surface as NaN weights.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class KafkaSettings(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of the Kafka brokers."""
    topic: str = "sandbox-telemetry"
    group_id: str = "streamdqn"
    dlq_topic: str = "sandbox-telemetry-dlq"
    """Dead-letter topic for undecodable or invalid records; empty disables (bad records are then only
    counted)."""
    snapshot_topic: str = "streamdqn-snapshots"
    """Topic on which each published snapshot is announced; empty disables."""
    verdicts_topic: str = "sandbox-verdicts"
    """Topic of verdicts that label episodes after the fact (keyed by sandbox_id, as many partitions as
    the telemetry topic); empty disables, and then every event must carry its label."""
    client_id: str = "streamdqn"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_plain_username: str = ""
    sasl_plain_password: SecretStr = SecretStr("")
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    max_poll_records: Annotated[int, Field(ge=1, le=100_000)] = 2000
    fetch_max_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_partition_fetch_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    poll_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 200
    session_timeout_ms: Annotated[int, Field(ge=6_000, le=1_800_000)] = 10_000
    """How long the broker waits for a silent group member before it hands the member's partitions to
    the others (within the broker's group.min/max.session.timeout.ms). With world_size > 1 every rank is
    a static member (group.instance.id <group_id>-rank-<R>): a rank restarted within this time gets its
    partitions back without a rebalance, and a stopped rank's partitions wait this long."""
    rate_limit_key: Literal["record_key", "header", "sandbox_id"] = "record_key"
    """What identifies a source for the per-source rate cap: the Kafka record key, a header set by the
    host agent (rate_limit_header), or the event's own sandbox_id (which a sample could forge)."""
    rate_limit_header: str = "x-sandbox-host"


class HttpSettings(Section):
    host: str = "127.0.0.1"
    """Interface to bind; loopback by default. Use 0.0.0.0 only behind a firewall or with a token."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    token: SecretStr = SecretStr("")
    """Bearer token required for /snapshots (and /metrics when protect_metrics); empty: no auth."""
    protect_metrics: bool = False
    admin_token: SecretStr = SecretStr("")
    """Bearer token of POST /admin/snapshots/* (promote, demote, rollback, pin, unpin); empty: no admin
    endpoints. Must differ from `token`."""
    public_url: str = ""
    """Base URL announced on the snapshot topic; default http://host:port."""


class StateSettings(Section):
    dir: Path = Path("./state")
    """Checkpoints and snapshots live under this directory."""


class PublishSettings(Section):
    interval_seconds: Positive = 300.0
    keep: Annotated[int, Field(ge=1)] = 20
    min_updates: Annotated[int, Field(ge=0)] = 100
    """Do not publish before the learner has made this many updates."""
    gate: bool = True
    """Publish a candidate only if it passes the publish gate on held-out recent episodes."""
    gate_holdout_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    """Share of episodes (by a stable hash of their key) never learned from and kept for the gate."""
    gate_episodes: Annotated[int, Field(ge=1)] = 500
    gate_min_episodes: Annotated[int, Field(ge=1)] = 50
    gate_return_tolerance: Annotated[float, Field(ge=0)] = 0.05
    gate_max_false_positive_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    gate_max_missed_rate: Annotated[float, Field(ge=0, le=1)] = 0.5
    signing: Literal["none", "ed25519", "hmac-sha256"] = "none"
    signing_key_file: str = ""
    """Ed25519 private key (PEM) or HMAC secret file used to sign each manifest."""


class CheckpointSettings(Section):
    interval_seconds: Positive = 60.0
    keep: Annotated[int, Field(ge=1)] = 3
    include_replay: bool = True
    """Save the replay buffer's contents in checkpoints (restart resumes with the same experience)."""


class LifecycleSettings(Section):
    stop_timeout_seconds: Positive = 30.0
    progress_timeout_seconds: Positive = 120.0
    """Lag above zero with no progress for this long: stop watchdog pings and exit (code 75) for a restart."""
    broker_retry_max_seconds: Positive = 30.0


class LearnerConfig(LearnerSettings):
    """The learner's hyperparameters (streamdqn.learning.settings) and where and how fast it runs."""

    mode: Literal["thread", "process"] = "process"
    """Where updates run: a thread shares the GIL with ingest; a process does not (see the README)."""
    updates_per_transition: Annotated[float, Field(ge=0)] = 0.25
    """The learner's target replay ratio: updates per new replay row; 0 means as fast as possible. When
    the learner cannot keep up, the achieved ratio falls and the stream is still consumed in full."""
    min_samples_per_insert: Annotated[float, Field(ge=0)] = 0.0
    """Pause fetching while the achieved samples per inserted row is below this (0: never pause; see the
    README for what pausing trades)."""
    torch_threads: Annotated[int, Field(ge=0)] = 1
    """torch intra-op threads for the learner; 0 keeps torch's default. One is fastest on 2 cores."""
    process_nice: Annotated[int, Field(ge=0, le=19)] = 10
    """Scheduling niceness added to the learner process (mode "process"): where the CPU is short, the
    stream's ingest goes first and the learner takes what is left (0: equal shares)."""


class ReplaySettings(Section):
    capacity: Annotated[int, Field(ge=1)] = 1_000_000
    min_size: Annotated[int, Field(ge=1)] = 1000
    """Updates start once the buffer holds this many transitions."""


class EpisodeSettings(Section):
    idle_timeout_seconds: Positive = 300.0
    feature_clip: Positive = 10.0
    """Normalized features are clipped to ±this (also a poisoning guard)."""
    reward_clip: Positive = 10.0
    """Precomputed rewards in events are clipped to ±this."""


class VerdictSettings(Section):
    wait_seconds: Positive = 86_400.0
    """How long an unlabelled episode waits for its verdict, and a verdict for its episode (record time)."""
    max_pending_episodes: Annotated[int, Field(ge=1)] = 100_000
    """At most this many of each wait; the oldest expire first (counted)."""


class RolloutSettings(Section):
    canary_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Share of sandboxes (by a stable hash of X-Sandbox-Id) served the canary. 0: no canary, a snapshot
    that passes the gate goes straight to stable."""
    promote_after_episodes: Annotated[int, Field(ge=1)] = 200
    """Labelled canary episodes (by policy_version) needed before a promotion."""
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    """Confidence of the bounds that promote or demote (one-sided)."""
    check_interval_seconds: Positive = 5.0


class DistributedSettings(Section):
    """Several daemons (ranks) learning one policy: one consumer group, gradients averaged every update."""

    world_size: Annotated[int, Field(ge=1)] = 1
    """How many ranks learn together. 1: this daemon learns alone. Under torchrun its RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT are used instead of the three settings below."""
    rank: Annotated[int, Field(ge=0)] = 0
    """This daemon's rank, 0..world_size-1; rank 0 publishes the snapshots."""
    init_method: str = "tcp://127.0.0.1:29400"
    """Where rank 0 serves the rendezvous, as every rank reaches it: tcp://HOST:PORT."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: NCCL when the learner is on CUDA, else Gloo."""
    timeout_seconds: Positive = 120.0
    """How long any collective may take; past it the ranks exit (76) for a restart. A rank whose group is
    not complete yet waits for the others as long as it takes (ingesting meanwhile), warning every time
    this passes."""

    @model_validator(mode="after")
    def _rank_in_world(self) -> DistributedSettings:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        host, port = self.endpoint
        if not host or not 1 <= port <= 65535:
            raise ValueError(f"init_method {self.init_method!r} is not tcp://HOST:PORT")
        return self

    @property
    def endpoint(self) -> tuple[str, int]:
        """(host, port) of init_method; ("", 0) when it is not tcp://HOST:PORT."""
        rest = self.init_method.removeprefix("tcp://")
        host, _, port = rest.rpartition(":")
        if rest == self.init_method or not port.isascii() or not port.isdigit():
            return "", 0
        return host.strip("[]"), int(port)


class IngestSettings(Section):
    max_message_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    max_events_per_message: Annotated[int, Field(ge=1)] = 10_000
    rate_limit_events_per_second: Annotated[float, Field(ge=0)] = 0.0
    """Per-source cap (0: off); excess events are rejected as rate_limited."""
    rate_limit_burst: Annotated[float, Field(ge=1)] = 1000.0


class LogSettings(Section):
    json_format: bool = Field(default=False, alias="json")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Settings(BaseSettings):
    """Everything `streamdqn run` and `streamdqn train` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMDQN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    kafka: KafkaSettings = KafkaSettings()
    http: HttpSettings = HttpSettings()
    state: StateSettings = StateSettings()
    publish: PublishSettings = PublishSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    learner: LearnerConfig = LearnerConfig()
    replay: ReplaySettings = ReplaySettings()
    episodes: EpisodeSettings = EpisodeSettings()
    verdicts: VerdictSettings = VerdictSettings()
    rollout: RolloutSettings = RolloutSettings()
    ingest: IngestSettings = IngestSettings()
    distributed: DistributedSettings = DistributedSettings()
    log: LogSettings = LogSettings()


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Settings from `path` (TOML) overridden by STREAMDQN_* variables; ConfigError names a bad key."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    # pydantic-settings only looks up the variables of known sections, so a misspelt section
    # (STREAMDQN_LERNER__LR) would be silently ignored. Variables without `__` (STREAMDQN_TANSU) are not ours.
    misspelt = sorted(
        name
        for name in os.environ
        if name.upper().startswith("STREAMDQN_")
        and "__" in name
        and name[len("STREAMDQN_") :].split("__")[0].lower() not in Settings.model_fields
    )
    if misspelt:
        raise ConfigError(
            f"unknown configuration section in environment variable(s) {', '.join(misspelt)}; "
            f"known sections: {', '.join(Settings.model_fields)}"
        )

    class _Settings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if path is not None:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
            return sources

    try:
        return _Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            key = ".".join(str(p) for p in error["loc"])
            env = "STREAMDQN_" + "__".join(str(p).upper() for p in error["loc"])
            problems.append(f"{key} (env {env}): {error['msg']}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(problems)) from None
    except ValueError as exc:  # a TOML syntax error, or a STREAMDQN_* value that is not valid JSON
        source = f"{path} or the STREAMDQN_* environment" if path else "the STREAMDQN_* environment"
        raise ConfigError(f"cannot read configuration from {source}: {exc}") from None
