"""Sweeps: search spaces from YAML (Ray Tune + Optuna and MLflow tracking build on this)."""
