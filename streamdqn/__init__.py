"""streamdqn: online DQN for malware-sandbox telemetry — Kafka in, versioned ONNX policies out."""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["__version__", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: `import streamdqn.stream.wire` must not pay for importing torch.
    if name == "train":
        from streamdqn.offline.train import train

        return train
    raise AttributeError(f"module 'streamdqn' has no attribute {name!r}")
