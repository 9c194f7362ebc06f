"""A sweep's job, seen from inside: is this run an Optuna trial (its pruning callback), and how
it tells the sweeper that it was pruned or stopped."""

from __future__ import annotations

import os
from typing import Any


def is_multirun() -> bool:
    """Whether this job is one of a ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_pruning() -> Any | None:
    """The pruning callback of this job's Optuna trial (``-m hparams_search=...``), else None."""
    from llm.sweeps.env import ENV_TRIAL

    if not os.environ.get(ENV_TRIAL):  # plain runs do not import optuna
        return None
    from llm.sweeps.pruning import pruning_callback_from_env

    return pruning_callback_from_env()


def end_sweep_job(pruning: Any, interrupted: BaseException | None) -> None:
    """Tell the sweeper how this job ended: pruned (``optuna.TrialPruned``) or interrupted.

    Ctrl-C/SIGTERM stops a job cleanly; under a sweep the sweep must stop too, not go on to
    the next job (an Optuna trial is then recorded as interrupted, not as a result).
    """
    if pruning is not None:
        pruning.check_pruned()
    if interrupted is not None and (pruning is not None or is_multirun()):
        raise interrupted
