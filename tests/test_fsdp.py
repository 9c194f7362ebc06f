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


def test_mixed_precision_keys_are_checked() -> None:
    from llm.checks import SettingError
    from llm.model.sharding import precision_policy

    policy = precision_policy("bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert precision_policy(None).param_dtype is None  # float32 throughout
    with pytest.raises(SettingError, match=r"trainer.strategy.mixed_precision='fp16': one of"):
        precision_policy("fp16")  # no loss scaling under FSDP2: its gradients would underflow


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
        last = out / "checkpoints" / "last.ckpt"
        if "fsdp" in str(extra):  # the summary's next steps start with making one file
            assert f"llm export ckpt_path={last} out=" in proc.stdout, proc.stdout[-2000:]
        return last

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


def _folder_like_a_sharded_run(path: Path) -> Path:
    """A distributed checkpoint's layout (its files' contents are not read by these checks)."""
    path.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"):
        (path / name).write_bytes(b"")
    return path


def test_a_distributed_checkpoint_is_named_with_the_command_that_makes_one_file(
    tmp_path: Path, llm_main: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verbs that read one file, a resume without a sharded strategy and an export without
    out= each say what the folder is and what to run."""
    from llm.checkpoint import CheckpointError, read_checkpoint, read_resume_state

    folder = _folder_like_a_sharded_run(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=rf"llm export ckpt_path={folder} out=<file>\.ckpt"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match=r"with a sharded strategy \(trainer=fsdp\)"):
        read_resume_state(folder, sharded=False)
    assert llm_main("generate", f"ckpt_path={folder}") == 1
    assert f"ckpt_path={folder} is a distributed checkpoint" in capsys.readouterr().err
    assert llm_main("export", f"ckpt_path={folder}", f"hf_dir={tmp_path / 'hf'}") == 1
    assert "add out=<file>.ckpt" in capsys.readouterr().err
    assert llm_main("export", f"ckpt_path={folder}", f"out={folder / 'in.ckpt'}") == 1
    assert "lies inside ckpt_path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing written


def test_a_killed_saves_temp_folder_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """A sharded save writes `.last.ckpt.<random>.tmp/` beside `last.ckpt`; a kill before the
    swap leaves it, and the next run's checkpoint callback removes it (files and folders)."""
    from llm.io import remove_temp_files

    _folder_like_a_sharded_run(tmp_path / ".last.ckpt.x1y2.tmp")
    (tmp_path / ".step2.ckpt.abcd.tmp").write_bytes(b"partial")
    kept = _folder_like_a_sharded_run(tmp_path / "last.ckpt")
    removed = remove_temp_files(tmp_path, ".*.ckpt.*.tmp")
    assert sorted(removed) == [".last.ckpt.x1y2.tmp", ".step2.ckpt.abcd.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and kept.is_dir()


def test_an_unsharded_optimizer_state_is_keyed_by_the_optimizers_own_order(
    optim_settings: dict[str, Any],
) -> None:
    """An unsharded run's (or `llm export`'s) optimizer state numbers the parameters through
    the optimizer's groups (decayed matrices first), not in the module's order: the sharded
    load names each entry after the parameter the optimizer holds at that place."""
    from llm.model import GPT, GPTConfig
    from llm.training.optim import build_optimizer
    from llm.training.sharding import optimizer_state_by_name

    module = torch.nn.Module()
    module.add_module("model", GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11)))
    optimizer = build_optimizer(module.model, optim_settings)
    _, loss = module.model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    optimizer.step()
    named = optimizer_state_by_name(optimizer.state_dict(), optimizer, module)
    params = dict(module.named_parameters())
    assert set(named["state"]) == set(params)
    for name, state in named["state"].items():  # each moment belongs to its own parameter
        assert state["exp_avg"].shape == params[name].shape
        torch.testing.assert_close(state["exp_avg"], optimizer.state[params[name]]["exp_avg"])
    decayed = named["param_groups"][0]["params"]
    assert decayed[0].startswith("model.") and all(params[n].dim() >= 2 for n in decayed)
