"""Snapshots: what sandboxes run.

    layout    the snapshot directory, read one way by everyone (no torch, no onnx)
    signing   manifest signatures (Ed25519, HMAC-SHA256)
    store     atomic versioned publishing, channels, pins, retention, under one flock (no torch)
    channels  stable/canary pointers, pins, channels.log and the canary hash (no torch)
    export    ONNX export, check and parity (torch, onnx)
    policy    a published snapshot as a policy (onnxruntime)
    gate      when a candidate may replace the published snapshot (bounds from `stats`, numpy)
    rollout_cli  what `streamdqn snapshots ...` does

Import the module you need: `layout` and `signing` stay light so that the sandbox-side client can use
them without torch.
"""
