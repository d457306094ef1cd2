"""The sandbox side: `streamdqn pull`. Importable without torch."""
