"""Snapshots: what sandboxes run.

    layout    the snapshot directory, read one way by everyone (no torch, no onnx)
    signing   manifest signatures (Ed25519, HMAC-SHA256)
    store     ONNX export, check, parity and atomic versioned publishing (torch, onnx)
    policy    a published snapshot as a policy (onnxruntime)
    gate      when a candidate may replace the published snapshot

Import the module you need: `layout` and `signing` stay light so that the sandbox-side client can use
them without torch.
"""
