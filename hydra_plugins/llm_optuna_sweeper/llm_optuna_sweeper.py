"""The Hydra ``Sweeper`` class Hydra discovers here; the work is done in
:mod:`llm.sweeps.optuna_sweeper`, imported only when a sweep runs (plugin discovery stays cheap)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Importing the config module registers `hydra/sweeper=llm_optuna` in Hydra's ConfigStore.
from .config import LLMOptunaSweeperConf  # noqa: F401


class LLMOptunaSweeper(Sweeper):
    """Optuna search over Hydra overrides; see :class:`LLMOptunaSweeperConf` for the knobs."""

    def __init__(self, **kwargs: Any) -> None:
        from llm.sweeps.optuna_sweeper import LLMOptunaSweeperImpl

        self.sweeper = LLMOptunaSweeperImpl(**kwargs)

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
