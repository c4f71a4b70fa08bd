"""Training on Megatron-Core: run config, data sampling, the step loop, checkpoints, metrics."""
