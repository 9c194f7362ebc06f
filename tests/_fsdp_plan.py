"""The rank function of test_fsdp's sharding-plan test, in a module of its own: the spawned
processes import it, and it imports neither Lightning nor the test helpers (seconds each)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}  # helpers.TINY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plan(rank: int, world: int, port: int, out: Path) -> None:
    """One rank: shard a tiny GPT task with activation checkpointing, take one AdamW step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from llm.model import GPT, GPTConfig
    from llm.model.sharding import precision_policy, shard_task

    def task() -> torch.nn.Module:  # a TaskModule's layout: the GPT as its child "model"
        torch.manual_seed(0)
        module = torch.nn.Module()
        module.add_module("model", GPT(GPTConfig(**TINY, vocab_size=31, block_size=16)))
        return module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        whole, module = task(), task()
        names = list(module.state_dict())
        mesh = init_device_mesh("cpu", (world,))
        units = shard_task(module, mesh, precision_policy(None), activation_checkpointing=True)
        assert list(module.state_dict()) == names  # same keys: checkpoints stay compatible
        shapes = {}
        for name, p in module.named_parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
            shapes[name] = (tuple(p.to_local().shape), tuple(p.shape))
        # the head is tied to the embedding: one parameter, in the root unit
        assert module.model.lm_head.weight is module.model.embed.wte.weight
        x = torch.randint(0, 31, (2 * world, 16), generator=torch.Generator().manual_seed(1))
        for m, batch in ((module, x.chunk(world)[rank]), (whole, x)):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            _, loss = m.model(batch, batch)
            loss.backward()
            opt.step()
        diff = max(
            (p.full_tensor() - q).abs().max().item()
            for p, q in zip(module.parameters(), whole.parameters(), strict=True)
        )
        if rank == 0:
            torch.save({"units": units, "shapes": shapes, "diff": diff}, out)
    finally:
        dist.destroy_process_group()
