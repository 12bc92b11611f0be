"""Training: folds, the per-worker loop, Ray Train orchestration, checkpoints and the baseline."""
