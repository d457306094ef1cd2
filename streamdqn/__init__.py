"""streamdqn: online DQN for malware-sandbox telemetry."""
