"""How a GPT task is split over processes with FSDP2 (``torch.distributed.fsdp.fully_shard``):
each transformer block is one unit (its weights gathered just before it runs and freed after),
the rest of the GPT (embeddings, final norm, the head tied to the embedding) the root unit;
optionally each block recomputes its activations in backward. The strategy that applies it
under the Trainer is :class:`llm.training.sharding.FSDP2Strategy`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm import checks
from llm.model.gpt import GPT

# no fp16: without loss scaling (which FSDP2 does not do) its gradients underflow
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def precision_policy(mixed_precision: str | None, reduce_dtype: str | None = "fp32") -> Any:
    """FSDP2's MixedPrecisionPolicy: the weights gathered (and computed) in ``mixed_precision``,
    gradients reduced in ``reduce_dtype``; the sharded master weights and the optimizer state
    stay float32. None: everything in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for key, value in (("mixed_precision", mixed_precision), ("reduce_dtype", reduce_dtype)):
        if value is not None and value not in DTYPES:
            raise checks.SettingError(
                f"trainer.strategy.{key}={value!r}: one of {sorted(DTYPES)} or null"
            )
    if mixed_precision is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[mixed_precision],
        reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
    )


def shard_task(
    module: nn.Module,
    mesh: Any,
    policy: Any = None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> list[str]:
    """Shard ``module`` (a TaskModule) in place over ``mesh``; returns the names of the units.

    Every GPT among its children: one unit per block, then the GPT itself (the root of its
    blocks: embeddings, final norm and the head tied to the embedding, which must share a
    unit). Any other child with weights (a classifier's head) is a unit of its own, so that
    every weight is sharded and its gradient reduced.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if policy is not None:
        kwargs["mp_policy"] = policy
    units = []
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, GPT):
            for i, block in enumerate(child.h):
                if activation_checkpointing:  # keeps the parameter names (no wrapper module)
                    checkpoint(block)
                fully_shard(block, **kwargs)
                units.append(f"{name}.h.{i}")
            fully_shard(child, **kwargs)
            # GPT methods a task calls instead of forward (a classifier's hidden_states) gather
            # the root's weights too; never one forward calls (its end would free them early)
            for method in getattr(module, "gpt_entry_points", ()):
                register_fsdp_forward_method(child, method)
        else:
            fully_shard(child, **kwargs)
        units.append(name)
    return units


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to any of ``module``'s submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())
