"""Training: TrainConfig, optimizer and schedule, checkpoints, the Trainer, and the train/compare commands."""
