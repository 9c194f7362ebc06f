"""The training side of an Optuna search: find this job's trial and prune it on val loss.

The ``llm_optuna`` sweeper (``hydra_plugins/llm_optuna_sweeper``) gives each trial's job the
storage URL, study name and trial number as environment variables; :func:`trial_from_env`
turns them back into a live ``optuna.Trial`` so :class:`StepPruningCallback` can report to it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import hydra
import lightning as L
import optuna

from llm.sweeps.env import ENV_STORAGE, ENV_STUDY, ENV_TRIAL

log = logging.getLogger(__name__)


def trial_from_env(
    environ: dict[str, str] | None = None, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Trial | None:
    """The running trial this process trains for, or None outside an Optuna search.

    The storage does not keep the study's pruner, so pass the sweeper's (see
    :func:`sweeper_pruner`); None never prunes.
    """
    env = os.environ if environ is None else environ
    number = env.get(ENV_TRIAL)
    if number is None:
        return None
    missing = [k for k in (ENV_STORAGE, ENV_STUDY) if not env.get(k)]
    if missing:
        raise RuntimeError(f"{ENV_TRIAL}={number} is set but {', '.join(missing)} is not")
    study = optuna.load_study(
        study_name=env[ENV_STUDY],
        storage=env[ENV_STORAGE],
        pruner=pruner or optuna.pruners.NopPruner(),
    )
    for frozen in study.get_trials(deepcopy=False):
        if frozen.number == int(number):
            if frozen.state != optuna.trial.TrialState.RUNNING:
                raise RuntimeError(
                    f"Trial {number} of study {env[ENV_STUDY]!r} is {frozen.state.name}, not "
                    "RUNNING: only the sweeper that asked for it may train it"
                )
            return optuna.Trial(study, frozen._trial_id)
    raise RuntimeError(f"Study {env[ENV_STUDY]!r} in {env[ENV_STORAGE]} has no trial {number}")


class StepPruningCallback(L.Callback):
    """Report ``monitor`` to the trial after each validation and stop the run if it is pruned.

    Unlike optuna-integration's ``PyTorchLightningPruningCallback`` (which reports at
    ``current_epoch``), this reports at ``trainer.global_step``: pretraining is step-based and
    validates every ``val_check_interval`` steps inside one long epoch, so epochs would collide.
    A pruned run stops cleanly (checkpoints and logs are kept); call :meth:`check_pruned` after
    ``fit`` to raise ``optuna.TrialPruned`` for the sweeper.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/loss") -> None:
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            log.warning("Pruning: metric %r was not logged; nothing reported", self.monitor)
            return
        step = int(trainer.global_step)
        prune = False
        if trainer.is_global_zero:
            number = float(value)
            if math.isfinite(number):  # a NaN run is not pruned: it ends as a FAIL trial
                self.trial.report(number, step=step)
                prune = self.trial.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = step
            trainer.should_stop = True
            log.info(
                "Trial %d pruned at step %d (%s=%s)", self.trial.number, step, self.monitor, value
            )

    def check_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` if this run was stopped by the pruner."""
        if self.pruned_at is not None:
            raise optuna.TrialPruned(
                f"Trial {self.trial.number} pruned at step {self.pruned_at} on {self.monitor}"
            )


def sweeper_pruner() -> optuna.pruners.BasePruner | None:
    """The pruner configured as ``hydra.sweeper.pruner`` for this job (None if there is none)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    cfg = HydraConfig.get().sweeper.get("pruner")
    return None if cfg is None else hydra.utils.instantiate(cfg)


def pruning_callback_from_env(**kwargs: Any) -> StepPruningCallback | None:
    """A :class:`StepPruningCallback` for this job's trial, or None outside an Optuna search."""
    trial = trial_from_env(pruner=sweeper_pruner())
    return None if trial is None else StepPruningCallback(trial, **kwargs)
