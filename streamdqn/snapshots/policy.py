"""A published snapshot as a policy: the `action` output of its ONNX model, run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamdqn.errors import SnapshotError
from streamdqn.stream.features import FEATURE_DIM


class OnnxPolicy:
    """A published snapshot's greedy policy: the `action` output of its ONNX model (onnxruntime, CPU)."""

    def __init__(self, model_path: Path, *, threads: int = 1, chunk_rows: int = 65_536) -> None:
        self.model_path = Path(model_path)
        self.chunk_rows = chunk_rows
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), options, providers=["CPUExecutionProvider"]
            )
        # onnxruntime's errors (InvalidProtobuf, NoSuchFile, Fail…) derive from Exception directly.
        except Exception as exc:
            raise SnapshotError(f"{self.model_path}: onnxruntime cannot load it: {exc}") from exc
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        shape = inputs.get("features")
        if shape is None or len(shape) != 2 or shape[1] != FEATURE_DIM or "action" not in outputs:
            raise SnapshotError(
                f"{self.model_path}: expected input features[N, {FEATURE_DIM}] and output action[N], "
                f"found inputs {inputs} and outputs {sorted(outputs)}; re-export it with this streamdqn"
            )

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != FEATURE_DIM:
            raise ValueError(f"features must be [N, {FEATURE_DIM}], got {x.shape}")
        parts = [
            self._session.run(["action"], {"features": x[i : i + self.chunk_rows]})[0]
            for i in range(0, len(x), self.chunk_rows)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
