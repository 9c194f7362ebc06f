"""How the ``llm_optuna`` sweeper tells each trial's job which study and trial it trains for.

Set as environment variables (``hydra.job.env_set``) by ``hydra_plugins/llm_optuna_sweeper``;
read by :mod:`llm.sweeps.pruning` and :mod:`llm.sweeps.report`. Imports nothing heavy, so the
plugin can import it during Hydra's plugin discovery.
"""

ENV_STORAGE = "LLM_OPTUNA_STORAGE"
ENV_STUDY = "LLM_OPTUNA_STUDY"
ENV_TRIAL = "LLM_OPTUNA_TRIAL"
