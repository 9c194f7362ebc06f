"""Sharded training (FSDP2, `trainer=fsdp`) on CPU processes over gloo: the sharding plan, a real
two-process run through `llm train trainer=fsdp_cpu` against DDP on the same recipe, its
distributed checkpoint (one file per rank), the resume from it, and `llm export`'s single file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _fsdp_plan import free_port, plan
from helpers import run_cli, tiny_overrides, write_corpus

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="no torch.distributed gloo"
)


def test_sharding_plan_on_two_gloo_processes(tmp_path: Path) -> None:
    """One FSDP unit per block plus the GPT's root; every weight split in two along its rows
    (31 rows: rank 0 holds 16); one AdamW step equals the unsharded step."""
    mp.spawn(plan, args=(2, free_port(), tmp_path / "plan.pt"), nprocs=2)
    out = torch.load(tmp_path / "plan.pt", weights_only=True)
    assert out["units"] == ["model.h.0", "model.h.1", "model"]
    shapes = out["shapes"]
    assert shapes["model.embed.wte.weight"] == ((16, 32), (31, 32))
    assert shapes["model.h.0.mlp.c_fc.weight"] == ((64, 32), (128, 32))
    assert shapes["model.h.1.ln_1.weight"] == ((16,), (32,))
    assert shapes["model.embed.wpe.weight"] == ((8, 32), (16, 32))
    assert out["diff"] < 1e-6  # Adam's first step is lr * sign(grad): 1e-3 where signs differ


def _read(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_fsdp_cpu_run_resumes_and_exports_like_ddp(tmp_path: Path) -> None:
    """`trainer=fsdp_cpu` (2 ranks) stopped after 2 of 4 steps and resumed from its distributed
    checkpoint ends with the weights and optimizer state of an uninterrupted DDP run of the
    same recipe (both reduce the same gradients; FSDP2 reduce-scatters what DDP all-reduces)."""
    corpus = write_corpus(tmp_path)

    def train(name: str, steps: int, *extra: str) -> Path:
        out = tmp_path / name
        overrides = [
            *tiny_overrides(tmp_path, corpus),
            "model.dropout=0.0",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "optim.warmup_steps=1",
            "optim.decay_steps=4",
            "callbacks.sample_text=null",
            "callbacks.attention=null",
            f"output_dir={out}",
            *extra,
        ]
        proc = run_cli("train", *overrides, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "checkpoints" / "last.ckpt"

    ddp = train("ddp", 4, "trainer=ddp_cpu", "trainer.strategy=ddp")
    half = train("half", 2, "trainer=fsdp_cpu")
    # a distributed checkpoint: one shard file per rank, in a folder put in place whole
    assert half.is_dir()
    names = sorted(p.name for p in half.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"], names
    assert not list(half.parent.glob(".*")), "a temp folder was left behind"
    resumed = train("resumed", 4, "trainer=fsdp_cpu", f"ckpt_path={half}")

    # every other verb reads one file: they say how to make it
    from llm.checkpoint import CheckpointError, load_language_model

    with pytest.raises(CheckpointError, match=r"llm export ckpt_path=.* out="):
        load_language_model(resumed)
    single = tmp_path / "resumed.ckpt"
    proc = run_cli("export", f"ckpt_path={resumed}", f"out={single}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"consolidated checkpoint: {single}" in proc.stdout

    a, b = _read(ddp), _read(single)
    assert a["global_step"] == b["global_step"] == 4 and b["kind"] == "lm"
    assert a["hyper_parameters"] == b["hyper_parameters"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-5, rtol=0)
    # the optimizer state in the unsharded layout: same groups, moments of the same parameters
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    for i, state in oa["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob["state"][i][key], state[key], atol=1e-5, rtol=1e-4)
    lm = load_language_model(single)  # what generate, chat and evaluate load
    assert lm.model.config.n_layer == 2
