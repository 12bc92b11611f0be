"""Sweeps: search spaces from YAML (config.py), MLflow tracking of sweeps and trials
(tracking.py), figures for the MLflow UI (plots.py), and the model registry (registry.py).
The Ray Tune + Optuna runner builds on these."""
