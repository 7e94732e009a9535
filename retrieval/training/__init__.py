"""Fine-tuning an Embedder: the Lightning module, loss and miner glue, learning-rate schedules
and layer decay, checkpoints, loggers (Weights & Biases, CSV) and quieter third-party output."""
