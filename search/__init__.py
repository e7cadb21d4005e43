"""Budget-constrained per-layer allocation search built on Optuna."""
