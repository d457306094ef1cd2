"""The exceptions streamdqn raises.

    StreamDQNError
    ├── ConfigError            a setting is missing or invalid (names the key)
    ├── CheckpointError        no checkpoint, or one that fails to load or verify
    ├── SnapshotError          export, check, parity or publish of a snapshot failed
    │   ├── SnapshotVerifyError    a snapshot's sha256 or signature does not match (pulled or stored)
    │   ├── SnapshotNotFoundError  no such version: never published, pruned, or not a version name
    │   └── SnapshotConflictError  a channel change that the store's state does not allow
    │                              (nothing to promote or demote, no previous stable, not pinned)
    └── BrokerError            the embedded broker could not be started

Bad telemetry is never an exception: `telemetry.decode` returns it as rejects.
"""


class StreamDQNError(Exception):
    """Base of every error streamdqn raises on purpose."""


class ConfigError(StreamDQNError):
    """A configuration value is missing or invalid."""


class CheckpointError(StreamDQNError):
    """A checkpoint is missing, corrupt or incompatible."""


class SnapshotError(StreamDQNError):
    """A snapshot could not be exported, checked or published."""


class SnapshotVerifyError(SnapshotError):
    """A snapshot's sha256 or signature does not match its manifest."""


class SnapshotNotFoundError(SnapshotError):
    """A version that a channel change or pin names does not exist (or is not a version at all)."""


class SnapshotConflictError(SnapshotError):
    """A channel change that the current channels, history or pins do not allow."""


class BrokerError(StreamDQNError):
    """The embedded Kafka-compatible broker could not be started."""
