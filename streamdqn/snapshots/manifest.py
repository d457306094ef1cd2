"""The snapshot manifest: one typed, versioned schema, written by the daemon and by offline training
alike and read back strictly. No torch or onnx here (the sandbox-side client reads manifests too).

`manifest.json` is this struct as JSON. Its `signature` (when the publisher signs) covers the canonical
JSON of every other field (streamdqn.snapshots.signing.signed_payload), and `sha256` is the model
file's, so the signature covers the model as well.
"""

from __future__ import annotations

from typing import Any

import msgspec

from streamdqn.errors import SnapshotError

SCHEMA_VERSION = 2
"""2: one normalizer representation (count, mean, std, clip), typed sections. 1 (unversioned) wrote
{mean, std, clip} from the daemon and {count, mean, m2, clip} from offline training."""


class Normalizer(msgspec.Struct, forbid_unknown_fields=True):
    """The input normalization baked into the model: z = clip((x - mean) / std, ±clip)."""

    count: float  # feature vectors the statistics were computed from
    mean: list[float]
    std: list[float]
    clip: float


class FeatureSpecInfo(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    names: list[str]


class OnnxInfo(msgspec.Struct, forbid_unknown_fields=True):
    opset: int
    inputs: dict[str, list[str | int]]
    outputs: dict[str, list[str | int]]


class Signature(msgspec.Struct, forbid_unknown_fields=True):
    algorithm: str
    value: str


class PolicyInfo(msgspec.Struct, forbid_unknown_fields=True):
    """What the publisher knows about the policy it exports (the manifest minus what the store adds)."""

    updates: int
    events_learned: int
    transitions_learned: int
    feature_spec: FeatureSpecInfo
    action_names: list[str]
    reward_table: dict[str, Any]
    normalizer: Normalizer
    learner: dict[str, Any]
    device: str
    ignore_margin: float = 0.0
    evaluation: dict[str, Any] = msgspec.field(default_factory=dict)
    """The publish gate's verdict (daemon) or the training episodes' metrics (offline)."""


class Manifest(PolicyInfo, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Everything a sandbox needs to know about a published model."""

    schema_version: int  # required, so that an unversioned (schema 1) manifest never reads as current
    version: int
    created_at: float
    sha256: str
    model_file: str = "model.onnx"
    onnx: OnnxInfo | None = None
    parity_max_abs_diff: float = 0.0
    packages: dict[str, str] = msgspec.field(default_factory=dict)
    signature: Signature | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


_DECODER = msgspec.json.Decoder(Manifest)


def parse_manifest(data: bytes, source: str) -> Manifest:
    """A manifest.json's bytes as a Manifest; SnapshotError names the source and what is wrong."""
    try:
        manifest = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"{source}: not a streamdqn manifest (schema {SCHEMA_VERSION}): {exc}") from None
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"{source}: manifest is not valid JSON: {exc}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise SnapshotError(f"{source}: manifest schema {manifest.schema_version}, this streamdqn reads "
                            f"{SCHEMA_VERSION}; publish it again with this version")
    return manifest
