"""Beyond one process group on one machine, on this CPU: two torchrun "nodes" (the README's two
commands) train to the weights of one node's two processes; a launcher whose world disagrees
with the config is refused at start; a SLURM job warned of preemption saves, requeues itself
(a fake ``scontrol`` records it) and resumes exactly; a checkpoint resumes on another number
of processes in the same global order.

Tolerances: runs of the same world agree to float32 rounding (1e-6). Across worlds (two DDP
ranks against one process accumulating two batches, the same global batch) the gradient is the
same sum in another order (gloo's all-reduce, then a division, against two backward passes
each scaled by 1/2), so the weights differ by float32 rounding carried through the steps:
measured 1e-7 to 3e-6 after 8 steps; 1e-5 is the bound.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ENV, ROOT, compose, tiny_overrides, write_corpus

from llm.checks import SettingError
from llm.data.datamodule import ResumableDistributedSampler, ResumableRandomSampler
from llm.training.cluster import check_world

ACROSS_WORLDS = 1e-5  # see the module docstring
TORCHRUN = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "llm-train",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}
LAUNCHER_VARIABLES = (*TORCHRUN, *SLURM, "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher's variables (the test sets those it means)."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _trainer(**keys: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, **keys})


@pytest.mark.parametrize(
    ("env", "keys", "says"),
    [
        (  # torchrun --nnodes=2 --nproc-per-node=1, config for one node
            {**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"},
            {"num_nodes": 1, "strategy": "ddp"},
            ["trainer.num_nodes=1", "torchrun started 2 node(s)", "--nnodes=1"],
        ),
        (  # torchrun --nproc-per-node=2, devices=1
            {**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"},
            {"num_nodes": 2, "devices": 1, "strategy": "ddp"},
            ["trainer.devices=1", "started 2 process(es) per node", "--nproc-per-node=2"],
        ),
        (  # ddp_spawn under torchrun would start processes of its own
            {**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"},
            {"num_nodes": 2, "strategy": "ddp_spawn"},
            ["trainer.strategy=ddp_spawn", "trainer.strategy=ddp"],
        ),
        (  # sbatch --nodes=2, config for one node
            {**SLURM, "SLURM_NNODES": "2", "SLURM_NTASKS": "2"},
            {"num_nodes": 1},
            ["trainer.num_nodes=1", "SLURM started 2 node(s)", "--nodes=1"],
        ),
        (  # --ntasks-per-node=2, devices=1
            {**SLURM, "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "2"},
            {"devices": 1},
            ["trainer.devices=1", "started 2 process(es) per node", "--ntasks-per-node=2"],
        ),
        (  # several nodes asked for, no launcher: would wait for them forever
            {},
            {"num_nodes": 2, "strategy": "ddp"},
            ["trainer.num_nodes=2", "no launcher", "torchrun"],
        ),
    ],
)
def test_a_world_the_launcher_did_not_make_is_refused_naming_both_numbers(
    no_launcher: pytest.MonkeyPatch, env: dict[str, str], keys: dict[str, Any], says: list[str]
) -> None:
    for name, value in env.items():
        no_launcher.setenv(name, value)
    with pytest.raises(SettingError) as caught:
        check_world(_trainer(**keys))
    for text in says:
        assert text in str(caught.value), str(caught.value)


def test_worlds_that_agree_pass(no_launcher: pytest.MonkeyPatch) -> None:
    check_world(_trainer())  # one process, no launcher
    check_world(_trainer(devices=2, strategy="ddp_spawn"))  # Lightning starts them
    for name, value in {**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        no_launcher.setenv(name, value)
    check_world(_trainer(num_nodes=2, devices=2, strategy="ddp"))


def test_the_mismatch_is_refused_by_llm_train_before_any_data(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path, llm_main: Any, capsys: Any
) -> None:
    for name, value in {**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}.items():
        no_launcher.setenv(name, value)
    corpus = write_corpus(tmp_path)
    args = [
        *tiny_overrides(tmp_path, corpus),
        "trainer=ddp_cpu",
        "trainer.strategy=ddp",
        "trainer.devices=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert llm_main("train", *args) != 0
    err = capsys.readouterr().err
    assert "trainer.num_nodes=1, but torchrun started 2 node(s)" in err, err
    assert "Traceback" not in err and not (tmp_path / "data").exists()  # nothing read


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("consumed", [0, 12, 30, 31])
def test_a_changed_world_continues_the_global_order(before: int, after: int, consumed: int) -> None:
    """Stopped ``consumed`` samples into the order on ``before`` ranks and resumed on
    ``after``: the windows taken after the change are the rest of the order, each once (bar
    the padding to equal batch counts, taken from the order's start as DistributedSampler's)."""
    n, seed = 41, 5
    order = list(ResumableRandomSampler(n, seed))

    def shares(world: int, skip: int) -> list[list[int]]:
        if world == 1:
            return [list(ResumableRandomSampler(n, seed, skip=skip))]
        return [list(ResumableDistributedSampler(n, seed, r, world, skip)) for r in range(world)]

    straight = shares(before, 0)
    if before > 1:  # the first `consumed` positions of the order are what the ranks took
        taken = [s[i] for i in range(consumed // before) for s in straight]
        assert taken == order[: len(taken)]
    rest = shares(after, consumed)
    assert len({len(s) for s in rest}) == 1  # equal counts: no rank waits in a collective
    seen = sorted(i for s in rest for i in s)
    pad = -(n - consumed) % after
    assert seen == sorted(order[consumed:] + order[:pad])


# -- training runs: a tiny recipe on two gloo processes ---------------------------------------

STEPS, HALF = 8, 4
# trainer=ddp_cpu's two gloo processes, forked from this one rather than spawned: the same DDP,
# without two fresh interpreters importing torch and Lightning for every run
TWO_PROCESSES = ("trainer=ddp_cpu", "trainer.strategy=ddp_fork")


def _recipe(tmp: Path, corpus: Path) -> list[str]:
    return [
        *tiny_overrides(tmp, corpus),
        "model.dropout=0.0",
        "trainer.limit_val_batches=1",
        "optim.warmup_steps=1",
        f"optim.decay_steps={STEPS}",  # the same schedule in every part of a resumed run
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        "callbacks.model_checkpoint.save_top_k=-1",  # every validation's file: step 4's too
    ]


def _weights(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def _assert_same(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa["global_step"] == wb["global_step"] == STEPS
    for k, v in wa["state_dict"].items():
        torch.testing.assert_close(wb["state_dict"][k], v, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One node, two processes (``trainer=ddp_cpu``): the run the others are compared with."""
    from llm.cli.train import train

    tmp = tmp_path_factory.mktemp("one_node")
    corpus = write_corpus(tmp)
    run = tmp / "run"
    train(
        compose(
            "train",
            [
                *TWO_PROCESSES,
                *_recipe(tmp, corpus),
                f"output_dir={run}",
                f"trainer.max_steps={STEPS}",
                f"trainer.val_check_interval={HALF}",
            ],
        )
    )
    ckpts = run / "checkpoints"
    return {
        "tmp": tmp,
        "corpus": corpus,
        "last": ckpts / "last.ckpt",
        "half": next(ckpts.glob(f"step{HALF:06d}-*.ckpt")),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readme_torchrun_commands() -> list[str]:
    """The README's two torchrun commands (one per node), as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [
        line.split("  #")[0].strip()
        for line in text.splitlines()
        if line.startswith("torchrun --nnodes=2")
    ]


@pytest.mark.slow
def test_two_torchrun_nodes_train_to_the_weights_of_one_node(
    one_node: dict[str, Path], tmp_path: Path
) -> None:
    """The README's two commands, started together as on two machines (here both on
    127.0.0.1): one run folder written by global rank 0 alone, the weights of one node's two
    processes."""
    commands = readme_torchrun_commands()
    assert len(commands) == 2 and ["--node-rank=0" in c for c in commands] == [True, False]
    port, run = _free_port(), tmp_path / "two_nodes"
    recipe = {a.split("=", 1)[0]: a for a in _recipe(one_node["tmp"], one_node["corpus"])}
    recipe["trainer.max_steps"] = f"trainer.max_steps={STEPS}"
    recipe["trainer.val_check_interval"] = f"trainer.val_check_interval={HALF}"
    procs = []
    for command in commands:
        argv = shlex.split(command)
        argv = [a.replace("--master-port=29500", f"--master-port={port}") for a in argv]
        argv = [f"hydra.run.dir={run}" if a.startswith("hydra.run.dir=") else a for a in argv]
        argv = [a for a in argv if a.split("=", 1)[0] not in recipe] + list(recipe.values())
        torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the venv's torchrun
        procs.append(
            subprocess.Popen(
                [*torchrun, *argv[1:]],
                cwd=tmp_path,
                env=ENV,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert "Best val/loss:" in outputs[0] and "Best val/loss:" not in outputs[1]
    assert outputs[1].count("validation at step") == 0  # rank 1 says nothing of its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two_nodes"]  # one folder, no outputs/
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert log.count("validation at step 8") == 1, log  # written once, by rank 0
    assert not list(run.glob("*ddp_process*"))
    _assert_same(one_node["last"], run / "checkpoints" / "last.ckpt", ACROSS_WORLDS)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_and_back(one_node: dict[str, Path]) -> None:
    """2 -> 1: step 4 of the two-process run, resumed on one process accumulating two batches
    (the same 8 windows a step). 1 -> 2: a one-process run of 4 steps resumed on two
    processes. Both end at the two-process run's weights within ACROSS_WORLDS, with the train
    order at the same global sample."""
    from llm.cli.train import train

    tmp, recipe = one_node["tmp"], _recipe(one_node["tmp"], one_node["corpus"])
    one = [*recipe, "trainer.accumulate_grad_batches=2", f"trainer.val_check_interval={2 * HALF}"]
    to_one = train(
        compose(
            "train",
            [
                *one,
                f"trainer.max_steps={STEPS}",
                f"ckpt_path={one_node['half']}",
                f"output_dir={tmp / 'to_one'}",
            ],
        )
    )
    last = Path(to_one["last_model_path"])
    _assert_same(one_node["last"], last, ACROSS_WORLDS)
    order = _weights(last)["TextDataModule"]
    assert order["train_samples_consumed"] == STEPS * 2 * 4  # 8 steps of 2 x 4 windows
    assert order["train_batches_consumed"] == 2 * STEPS  # recounted in one process's batches

    half = train(
        compose("train", [*one, f"trainer.max_steps={HALF}", f"output_dir={tmp / 'one_half'}"])
    )
    train(
        compose(
            "train",
            [
                *TWO_PROCESSES,
                *recipe,
                f"trainer.max_steps={STEPS}",
                f"trainer.val_check_interval={HALF}",
                f"output_dir={tmp / 'to_two'}",
                f"ckpt_path={half['last_model_path']}",
            ],
        )
    )
    last = tmp / "to_two" / "checkpoints" / "last.ckpt"
    _assert_same(one_node["last"], last, ACROSS_WORLDS)
    order = _weights(last)["TextDataModule"]
    assert order["train_samples_consumed"] == STEPS * 2 * 4 and order["world_size"] == 2


@pytest.mark.slow
def test_a_preempted_slurm_job_saves_requeues_and_resumes_exactly(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path, llm_main: Any
) -> None:
    """SLURM's warning signal (SIGUSR1, as ``--signal=SIGUSR1@90`` sends) at a step's end:
    Lightning's auto-requeue saves ``<run>/hpc_ckpt_1.ckpt`` and runs ``scontrol requeue
    <job>`` (a fake one on PATH records it); the same command started again resumes from that
    checkpoint to the weights of an uninterrupted run."""
    from llm.cli.train import train

    corpus = write_corpus(tmp_path)
    recipe = [
        *_recipe(tmp_path, corpus),
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={HALF}",
    ]
    straight = train(compose("train", [*recipe, f"output_dir={tmp_path / 'straight'}"]))

    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(record))}\n')
    scontrol.chmod(0o755)
    for name, value in SLURM.items():
        no_launcher.setenv(name, value)
    no_launcher.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "job"
    command = [*recipe, f"hydra.run.dir={run}"]  # what the sbatch script's srun runs

    from llm import faults

    faults._seen.clear()  # this process's count of the event
    no_launcher.setenv("LLM_FAULT", "fit.step@2:SIGUSR1")  # the signal during step 2
    assert llm_main("train", *command) == 128 + signal.SIGUSR1
    assert record.read_text().split() == ["requeue", "4242"]
    hpc = run / "hpc_ckpt_1.ckpt"
    assert _weights(hpc)["global_step"] == 3  # saved at the end of the step after it

    no_launcher.delenv("LLM_FAULT")
    assert llm_main("train", *command) == 0  # the requeued job: the same command
    assert record.read_text().split() == ["requeue", "4242"]  # not requeued again
    assert "resuming the requeued SLURM job from" in (run / "train.log").read_text()
    _assert_same(Path(straight["last_model_path"]), run / "checkpoints" / "last.ckpt", 1e-6)
