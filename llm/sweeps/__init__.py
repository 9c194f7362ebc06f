"""Sweeps: the training side of an Optuna search (pruning) and the report of a sweep's runs."""
