"""MLflow: where runs are stored (store), sanitised names (names), provenance tags (provenance),
the runs of sweeps and trials (runs), a sweep's results (leaderboard), trials logging through the
driver's node (relay), and the model registry (registry). Every MLflow call of hilbert is here."""
