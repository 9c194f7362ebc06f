"""Hydra sweeper that drives current Optuna (>=4) through Hydra's launcher.

The PyPI ``hydra-optuna-sweeper`` pins ``optuna<3``, whose SQLite storage does not work with
SQLAlchemy 2; this plugin keeps the same ``-m hparams_search=...`` experience on current Optuna.
Heavy imports live in ``_impl`` (Hydra's plugin scanner skips modules starting with ``_``).
"""
