"""Structured config of the ``llm_optuna`` sweeper, registered as ``hydra/sweeper=llm_optuna``.

No ``from __future__ import annotations`` here: OmegaConf needs real types, and Hydra's plugin
scanner executes this module in a way that breaks dataclasses with string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def _default_sampler() -> dict[str, Any]:
    return {"_target_": "optuna.samplers.TPESampler", "seed": None}


@dataclass
class LLMOptunaSweeperConf:
    """Every field can be overridden on the command line as ``hydra.sweeper.<field>=...``."""

    _target_: str = "hydra_plugins.llm_optuna_sweeper.llm_optuna_sweeper.LLMOptunaSweeper"
    # One study is one search; workers and resumed runs join it by name in the same storage.
    study_name: str = "llm"
    # SQLAlchemy URL; null keeps the study in memory (no resume, no pruning from the jobs).
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"
    direction: str = "minimize"
    # Trials the *study* should hold when done, counting earlier runs of it (see docs/sweeps.md).
    n_trials: int = 20
    # Trials asked and handed to the launcher at once (parallel launchers run them together).
    n_jobs: int = 1
    # `_target_` mappings instantiated with hydra.utils.instantiate; pruner null: never prune.
    sampler: Any = field(default_factory=_default_sampler)
    pruner: Any = None
    # Search space: `key: <Hydra sweep syntax>`, e.g. `optim.lr: tag(log, interval(1e-4, 1e-2))`.
    params: dict[str, Any] | None = None
    # Seconds between heartbeats of running trials; a trial silent for `grace_period` (default
    # 2 x interval) is a killed worker's and is marked failed when a worker next looks. (A worker
    # on the same host fails a trial whose process is gone at once, heartbeat or not.)
    heartbeat_interval: int | None = 60
    grace_period: int | None = None


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="llm_optuna",
    node=LLMOptunaSweeperConf,
    provider="llm_optuna_sweeper",
)
