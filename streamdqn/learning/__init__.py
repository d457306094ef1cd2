"""Learning: the Q-network, the DQN learner, CUDA graphs, where updates run (thread or process), the
replay buffer, and checkpoint files."""
