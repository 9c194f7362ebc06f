"""A sweep's job, seen from inside: is this run an Optuna trial (its pruning callback), and how
it tells the sweeper that it was pruned or stopped."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any


def is_multirun() -> bool:
    """Whether this job is one of a ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def swept_keys(args: Sequence[str]) -> list[str]:
    """The keys a ``-m`` command line sweeps (``key=a,b``, ``range(...)``, ``choice(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        parsed = OverridesParser.create().parse_overrides(words)
    except Exception:  # not Hydra's to refuse here: the sweep itself reports a bad override
        return []
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]


def sweep_axes() -> set[str] | None:
    """The keys this sweep's jobs differ in (a grid's swept keys, an Optuna search's space);
    None outside a sweep."""
    if not is_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    params = HydraConfig.get().sweeper.get("params") or {}
    return set(swept_keys(sys.argv[1:])) | {str(k) for k in params}


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
