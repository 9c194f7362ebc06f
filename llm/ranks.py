"""Which process of a distributed run this is, read from the launcher's environment before any
Trainer exists (no torch, no Lightning: the ``llm`` command asks before Hydra starts)."""

from __future__ import annotations

import os

# Set to a rank's number in every process but the one the user started: Lightning's ddp
# re-runs the command per local rank (LOCAL_RANK); torchrun, SLURM and other launchers.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID",
                  "JSM_NAMESPACE_RANK")  # fmt: skip


def is_launching_process() -> bool:
    """Whether this is global rank 0 before any Trainer exists (its rank variables, if any, 0)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


# what every other rank's Hydra is told: the run folder's config and log are rank 0's to write
OTHER_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled")


def other_rank_overrides(args: list[str]) -> list[str]:
    """The overrides a rank other than 0 adds to its command line (those it lacks)."""
    if is_launching_process():
        return []
    keys = {a.split("=", 1)[0] for a in args}
    return [o for o in OTHER_RANK_OVERRIDES if o.split("=", 1)[0] not in keys]
