"""The offline mode: train from a telemetry file, evaluate snapshots against baselines, the simulator,
recorded-episode datasets and the training report."""
