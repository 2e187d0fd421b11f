"""Run outputs: predictions, memory statistics, metrics, and loggers (W&B)."""
