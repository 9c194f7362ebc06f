"""Hydra sweeper that drives current Optuna (>=4) through Hydra's launcher.

The PyPI ``hydra-optuna-sweeper`` pins ``optuna<3``, whose SQLite storage does not work with
SQLAlchemy 2; this plugin keeps the same ``-m hparams_search=...`` experience on current Optuna.
The work is done in :mod:`llm.sweeps.optuna_sweeper` (imported when a sweep runs); this
package holds only what Hydra's plugin scanner must find.
"""
