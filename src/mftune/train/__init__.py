"""Training: the loop, one optimizer step, evaluation, checkpoints, and run tracking."""
