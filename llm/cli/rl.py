"""``llm rl init=<checkpoint> reward=<name>``: reinforcement learning with a verifiable reward
(GRPO), which is ``llm finetune task=grpo`` with its runs in ``logs/rl/runs/`` (config
``llm/conf/rl.yaml``); the job returns the best val loss, minus the best held-out mean reward."""

from __future__ import annotations

from llm.cli.app import hydra_app
from llm.cli.finetune import finetune_job

main = hydra_app("rl")(finetune_job)
