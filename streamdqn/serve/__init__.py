"""HTTP: snapshots for the sandboxes, /metrics for Prometheus (its collector), probes for systemd/k8s."""
