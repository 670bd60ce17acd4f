"""Training: the multi-task loss, the optimizer and its schedules, the loop, checkpoints."""
