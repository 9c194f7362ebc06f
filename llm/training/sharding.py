"""Fully sharded training (``trainer=fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``) under
Lightning's ``ModelParallelStrategy``, the strategy Lightning recommends for FSDP2.

- :mod:`llm.model.sharding` is the sharding plan (one FSDP unit per transformer block).
- :class:`FSDP2Strategy` is ``ModelParallelStrategy`` with a one-dimensional mesh (every process
  one data-parallel shard), the plan's settings as config keys (mixed precision, activation
  checkpointing, resharding after forward), and checkpoints written as a distributed checkpoint
  (one file per rank, written in parallel) into a temp folder that then takes the checkpoint's
  place, so no kill leaves a half-written ``last.ckpt`` folder.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from llm import checks
from llm.io import replaced_folder
from llm.model.sharding import is_sharded, precision_policy, shard_task

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2 (no tensor parallelism).

    Args:
        mixed_precision: ``bf16``: the dtype weights are gathered and computed in (FSDP2's
            ``param_dtype``); null (or ``fp32``): float32.
        reduce_dtype: the dtype gradients are reduce-scattered in (``fp32``: summed in float32
            whatever ``mixed_precision`` is).
        activation_checkpointing: recompute each block's activations in backward instead of
            keeping them (less memory, about a third more compute).
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3);
            false keeps them until backward (ZeRO-2: more memory, one all-gather less).
        **kwargs: ModelParallelStrategy's (process_group_backend, timeout). Checkpoints are
            always distributed ones: Lightning's single-file alternative numbers the optimizer
            state in the module's parameter order, which is not this optimizer's (``llm
            export`` writes the one file instead).
    """

    def __init__(
        self,
        mixed_precision: str | None = None,
        reduce_dtype: str | None = "fp32",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        **kwargs: Any,
    ) -> None:
        if not kwargs.pop("save_distributed_checkpoint", True):
            raise checks.SettingError(
                "trainer.strategy.save_distributed_checkpoint=false: a sharded run writes "
                "distributed checkpoints; llm export ckpt_path=<folder> out=<file> makes one file"
            )
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=True, **kwargs)
        self.policy = precision_policy(mixed_precision, reduce_dtype)
        self.activation_checkpointing = checks.flag(
            "trainer.strategy.activation_checkpointing", activation_checkpointing
        )
        self.reshard_after_forward = checks.flag(
            "trainer.strategy.reshard_after_forward", reshard_after_forward
        )
        self.units: list[str] = []

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process a shard (Lightning: one a node)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, module: nn.Module) -> None:
        """Apply the plan to ``module`` (its ``configure_model``), once."""
        if is_sharded(module):
            return
        self.units = shard_task(
            module,
            self.device_mesh["data_parallel"],
            self.policy,
            self.activation_checkpointing,
            self.reshard_after_forward,
        )
        if self.is_global_zero:
            dtype = self.policy.param_dtype
            log.info(
                "FSDP2: %d units (one per block, then the root) sharded over %d processes; "
                "compute in %s; activation checkpointing %s",
                len(self.units),
                self.world_size,
                str(dtype).removeprefix("torch.") if dtype is not None else "float32",
                "on" if self.activation_checkpointing else "off",
            )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """A distributed checkpoint: every rank writes its shard into a temp folder beside
        ``filepath`` (rank 0 also ``meta.pt``: steps, settings, callbacks), and once all have,
        rank 0 puts the folder in the checkpoint's place."""
        path = Path(self.broadcast(filepath))
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(replaced_folder(path)) if self.is_global_zero else None
            tmp = self.broadcast(tmp)
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier("checkpoint shards written")
        self.barrier("checkpoint in place")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """A distributed checkpoint as Lightning reads it; one file (an unsharded run's, or
        ``llm export``'s) with its optimizer state keyed by name first: Lightning would number
        the parameters in the module's order, where the optimizer's groups order them."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            return super().load_checkpoint(path, weights_only)
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        assert self.model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        states = checkpoint.pop("optimizer_states", [])
        for optimizer, state in zip(self.optimizers, states, strict=False):
            named = optimizer_state_by_name(state, optimizer, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)
        return checkpoint


def optimizer_state_by_name(state: dict, optimizer: Any, module: nn.Module) -> dict:
    """``state`` (``Optimizer.state_dict()``: parameters numbered through ``optimizer``'s
    groups in order) keyed by ``module``'s parameter names instead."""
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    count = sum(len(group["params"]) for group in state["param_groups"])
    if count != len(order):
        raise ValueError(
            f"the checkpoint's optimizer state holds {count} parameters, this run's optimizer "
            f"{len(order)}: resume with the optimizer settings it was written with"
        )
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
