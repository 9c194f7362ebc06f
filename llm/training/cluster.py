"""The world a launcher made (torchrun, SLURM's srun) against the trainer config, and the
checkpoint a requeued SLURM job resumes from.

Lightning's cluster environments (``TorchElasticEnvironment``, ``SLURMEnvironment``) read the
ranks; what they do not do is refuse, before any process group forms, a ``trainer.num_nodes`` or
``trainer.devices`` that disagrees with the launcher: such a run waits for ranks that never come
(or trains on a world it did not ask for). :func:`check_world` refuses it with both numbers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm import checks

# how Lightning names the checkpoint its SLURM auto-requeue writes in the run folder
# (``_CheckpointConnector.hpc_save_path``), and resumes from when ``ckpt_path`` is not given
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def launcher_world() -> tuple[str, int, int] | None:
    """(launcher, nodes, processes per node) of the launcher that started this process, or
    None where none did (a plain ``llm train``; Lightning then starts the processes itself)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    if TorchElasticEnvironment.detect():
        world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        return "torchrun", max(world // max(per_node, 1), 1), per_node
    if SLURMEnvironment.detect():
        tasks = int(env.get("SLURM_NTASKS", "1"))
        nodes = int(env.get("SLURM_NNODES", "1"))
        per_node = env.get("SLURM_NTASKS_PER_NODE")
        if per_node is None:
            if tasks > 1:
                raise checks.SettingError(
                    f"SLURM started {tasks} tasks (--ntasks={tasks}) without --ntasks-per-node: "
                    "set #SBATCH --ntasks-per-node=<processes per node> (one per GPU), as "
                    "scripts/slurm/train.sbatch does"
                )
            per_node = "1"
        return "SLURM", nodes, int(per_node.split("(")[0])  # "2(x3)": 2 tasks on 3 nodes
    return None


def check_world(trainer_cfg: DictConfig) -> None:
    """Refuse a ``trainer.num_nodes``/``trainer.devices``/``trainer.strategy`` that disagrees
    with the processes the launcher started, naming both numbers (called before any data is
    read or process group formed)."""
    num_nodes = checks.integer("trainer.num_nodes", trainer_cfg.get("num_nodes", 1), minimum=1)
    assert num_nodes is not None
    world = launcher_world()
    if world is None:
        if num_nodes > 1 and "NODE_RANK" not in os.environ:
            raise checks.SettingError(
                f"trainer.num_nodes={num_nodes}, but no launcher started this process (1 node "
                "here): start the same command on every node with torchrun "
                f"(--nnodes={num_nodes} --node-rank=<r> ...) or SLURM's srun "
                "(scripts/slurm/train.sbatch); see the README's multi-node section"
            )
        return
    launcher, nodes, per_node = world
    flag = "--nnodes" if launcher == "torchrun" else "#SBATCH --nodes"
    if num_nodes != nodes:
        raise checks.SettingError(
            f"trainer.num_nodes={num_nodes}, but {launcher} started {nodes} node(s) "
            f"({_launcher_numbers(launcher)}): set trainer.num_nodes={nodes}, or start "
            f"{launcher} with {flag}={num_nodes}"
        )
    devices = _devices(trainer_cfg)
    per_flag = "--nproc-per-node" if launcher == "torchrun" else "#SBATCH --ntasks-per-node"
    if devices is not None and devices != per_node:
        raise checks.SettingError(
            f"trainer.devices={trainer_cfg.get('devices')} ({devices} per node), but {launcher} "
            f"started {per_node} process(es) per node ({per_flag}={per_node}): set "
            f"trainer.devices={per_node}, or start {launcher} with {per_flag}={devices}"
        )
    strategy = str(trainer_cfg.get("strategy") or "")
    if any(s in strategy for s in ("spawn", "fork")):
        raise checks.SettingError(
            f"trainer.strategy={strategy} starts processes of its own, but {launcher} already "
            "started them: set trainer.strategy=ddp (e.g. trainer=ddp_cpu trainer.strategy=ddp)"
        )


def _launcher_numbers(launcher: str) -> str:
    env = os.environ
    if launcher == "torchrun":
        return f"WORLD_SIZE={env.get('WORLD_SIZE')}, LOCAL_WORLD_SIZE={env.get('LOCAL_WORLD_SIZE')}"
    return f"SLURM_NNODES={env.get('SLURM_NNODES')}, SLURM_NTASKS={env.get('SLURM_NTASKS')}"


def _devices(trainer_cfg: DictConfig) -> int | None:
    """The processes per node ``trainer.devices`` asks for, None where it defers to what is
    there (``-1``/``auto`` on a CPU)."""
    devices: Any = trainer_cfg.get("devices")
    if OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    accelerator = str(trainer_cfg.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():  # -1 / auto: every visible GPU
            return torch.cuda.device_count()
    return None


def requeued_checkpoint(folder: str | os.PathLike[str]) -> str | None:
    """The checkpoint Lightning's SLURM auto-requeue saved in ``folder`` (the newest
    ``hpc_ckpt_<n>.ckpt``) when this process runs in a SLURM job, else None.

    Lightning resumes from it by itself when no ``ckpt_path`` is given; naming it lets the run
    treat it as the resume it is (the checkpoint's checks, the curves purged from its step).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or not Path(folder).is_dir():
        return None
    found = [
        (int(m[1]), p) for p in Path(folder).iterdir() if (m := HPC_CHECKPOINT.fullmatch(p.name))
    ]
    return str(max(found)[1]) if found else None
