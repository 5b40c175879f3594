"""Training jobs, data, configs, checkpoints and evaluation."""
