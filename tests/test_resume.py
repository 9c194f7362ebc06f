"""Stopping and resuming: data position, weights and val loss match an uninterrupted run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import ENV, ROOT, compose, tiny_overrides, write_corpus
from omegaconf import DictConfig

from llm.data.datamodule import (
    ResumableDistributedSampler,
    ResumableLoader,
    ResumableOrder,
    ResumableRandomSampler,
)


def test_resumable_sampler_is_seeded_per_epoch_and_skips() -> None:
    s = ResumableRandomSampler(20, seed=3)
    first = list(s)
    assert sorted(first) == list(range(20)) and first == list(ResumableRandomSampler(20, 3))
    s.set_epoch(1)
    assert list(s) != first
    resumed = ResumableRandomSampler(20, seed=3, skip=8)
    assert len(resumed) == 20 and list(resumed) == first[8:]
    assert list(resumed) == first  # the skip applies to the first iteration only


def test_restoring_the_order_sets_no_warning_filter_and_the_loader_resumes() -> None:
    """The loader continues where the checkpoint left off, and says so to Lightning with
    state_dict / load_state_dict, so no process-wide filter hides Lightning's warning."""

    class Order(ResumableOrder):
        seed, batch_size = 3, 2

    order, before = Order(), list(warnings.filters)
    order.load_state_dict({"train_batches_consumed": 2, "train_samples_consumed": 4, "seed": 3})
    assert warnings.filters == before
    loader = ResumableLoader(list(range(10)), batch_size=2, sampler=order.train_sampler(10))
    full = list(ResumableRandomSampler(10, seed=3))
    assert [b.tolist() for b in loader] == [full[i : i + 2] for i in range(4, 10, 2)]
    assert loader.state_dict() == {} and loader.load_state_dict({}) is None


@pytest.mark.parametrize(("n", "world", "batch"), [(103, 2, 4), (100, 4, 3), (13, 2, 3), (9, 3, 5)])
def test_ddp_ranks_share_one_order_and_resume_exactly(n: int, world: int, batch: int) -> None:
    """Each rank's windows are Lightning's wrapper's; after k batches a resumed run goes on
    with the same batches, to the same end of the epoch."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    def batches(sampler: object) -> list[list[int]]:
        order = list(sampler)
        return [order[i : i + batch] for i in range(0, len(order), batch)]

    shares = []
    for rank in range(world):
        ours = ResumableDistributedSampler(n, 3, rank, world)
        ours.set_epoch(2)
        wrapped = DistributedSamplerWrapper(
            ResumableRandomSampler(n, seed=3), num_replicas=world, rank=rank, shuffle=False
        )
        wrapped.set_epoch(2)
        straight = batches(ours)
        assert straight == batches(wrapped) and len(ours) == len(wrapped)
        shares += [i for b in straight for i in b]
        for k in range(len(straight)):
            resumed = ResumableDistributedSampler(n, 3, rank, world, skip=k * batch * world)
            resumed.set_epoch(2)
            assert batches(resumed) == straight[k:] and len(resumed) == len(ours)
            assert batches(resumed) == straight  # the skip applies to one iteration only
    assert set(shares) == set(range(n))  # every window, on some rank


def _cfg(tmp_path: Path, out: Path, steps: int, *extra: str) -> DictConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.is_file():
        write_corpus(tmp_path)
    overrides = [
        *tiny_overrides(tmp_path, corpus),
        "data.stride=16",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "optim.warmup_steps=2",
        "optim.decay_steps=8",  # the 8-step schedule in both halves (null would follow max_steps)
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        "~logger",
        f"output_dir={out}",
        *extra,
    ]
    return compose("train", overrides)


# batch 4: stop mid-epoch 0; 160: three batches an epoch, stop mid-epoch 1; 128: stop at the
# very end of epoch 0 (about 405 train windows). Dropout 0.2 in one case: its masks come from
# the global RNG, whose state the checkpoint keeps. optim=muon: Muon's momentum buffers (for the
# blocks' matrices) and AdamW's moments (the rest) must both come back from the checkpoint.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "dropout", "optim"),
    [
        (4, 0.0, "adamw"),
        (160, 0.0, "adamw"),
        (128, 0.0, "adamw"),
        (4, 0.2, "adamw"),
        (4, 0.0, "muon"),
        (160, 0.2, "muon"),
    ],
)
def test_resume_matches_uninterrupted_run(
    tmp_path: Path, batch: int, dropout: float, optim: str
) -> None:
    from llm.cli.train import train

    opts = (f"data.batch_size={batch}", f"model.dropout={dropout}", f"optim={optim}")
    straight = train(_cfg(tmp_path, tmp_path / "straight", 8, *opts))
    first = train(_cfg(tmp_path, tmp_path / "first", 4, *opts))
    last = first["last_model_path"]
    assert last and Path(last).is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(_cfg(tmp_path, tmp_path / "resumed", 8, *opts, f"ckpt_path={last}"))
    # Lightning's warning for a loader that cannot resume mid-epoch: ours can, and says so
    assert [str(w.message) for w in caught if "not resumable" in str(w.message)] == []

    assert resumed["trainer"].global_step == straight["trainer"].global_step == 8
    a = float(straight["trainer"].callback_metrics["val/loss"])
    b = float(resumed["trainer"].callback_metrics["val/loss"])
    assert abs(a - b) < 1e-6, (a, b)
    sa, sb = straight["module"].state_dict(), resumed["module"].state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0)
    opt_a, opt_b = (r["trainer"].optimizers[0] for r in (straight, resumed))
    assert type(opt_a).__name__ == ("CombinedOptimizer" if optim == "muon" else "AdamW")
    if optim == "muon":  # Muon's momentum buffers continued from the checkpoint's
        muon_a, muon_b = opt_a.optimizers[1], opt_b.optimizers[1]
        pa, pb = muon_a.param_groups[0]["params"], muon_b.param_groups[0]["params"]
        assert len(pa) == len(pb) == 8  # tiny: 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)
        for wa, wb in zip(pa, pb, strict=True):
            buf_a, buf_b = muon_a.state[wa]["momentum_buffer"], muon_b.state[wb]["momentum_buffer"]
            assert buf_a.abs().sum() > 0
            torch.testing.assert_close(buf_b, buf_a, atol=1e-6, rtol=0)
    lrs = [[g["lr"] for g in o.param_groups] for o in (opt_a, opt_b)]
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12)


@pytest.mark.slow
def test_resume_across_shards_matches_uninterrupted_run(tmp_path: Path) -> None:
    """A cache of 64-token shards: windows span shard boundaries, resume is still exact."""
    from llm.cli.train import train

    opts = ("data.batch_size=4", "data.shard_tokens=64")
    straight = train(_cfg(tmp_path, tmp_path / "straight", 8, *opts))
    assert len(straight["trainer"].datamodule.meta["shards"]) > 100
    first = train(_cfg(tmp_path, tmp_path / "first", 4, *opts))
    last = first["last_model_path"]
    resumed = train(_cfg(tmp_path, tmp_path / "resumed", 8, *opts, f"ckpt_path={last}"))
    assert resumed["trainer"].global_step == 8
    a = float(straight["trainer"].callback_metrics["val/loss"])
    b = float(resumed["trainer"].callback_metrics["val/loss"])
    assert abs(a - b) < 1e-6, (a, b)
    sa, sb = straight["module"].state_dict(), resumed["module"].state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0)


class _SigtermAt(L.Callback):
    """Sends this process SIGTERM at the end of training step ``step`` (in-process test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("at", [5, 3])
def test_resume_from_interrupted_checkpoint_matches(tmp_path: Path, at: int) -> None:
    """SIGTERM mid-epoch, seen at the end of the next step: between validations (6), or on a
    step the schedule validates at (4: that validation still runs and is in last.ckpt, as a
    resumed run never makes it up). last.ckpt is the stopped state, resuming is exact."""
    from llm.cli.train import train

    drop = "model.dropout=0.2"
    straight = train(_cfg(tmp_path, tmp_path / "straight", 8, drop))
    kill = [f"+callbacks.zz_kill._target_={__name__}._SigtermAt", f"+callbacks.zz_kill.step={at}"]
    stopped = train(_cfg(tmp_path, tmp_path / "stopped", 8, drop, *kill))
    ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert stopped["last_model_path"] == str(ckpt)
    step = stopped["trainer"].global_step
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == step
    assert step == at + 1
    assert [s for s, _ in saved["val_history"]] == [0, 4]  # with the validation at step 4
    resumed = train(_cfg(tmp_path, tmp_path / "resumed", 8, drop, f"ckpt_path={ckpt}"))
    assert resumed["trainer"].global_step == 8
    steps = [s for s, _ in resumed["module"].val_history]
    assert steps == [s for s, _ in straight["module"].val_history] == [0, 4, 8]
    sa, sb = straight["module"].state_dict(), resumed["module"].state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0)
    a = float(straight["trainer"].callback_metrics["val/loss"])
    b = float(resumed["trainer"].callback_metrics["val/loss"])
    assert abs(a - b) < 1e-6, (a, b)


def test_resume_message_replaces_ckpt_path() -> None:
    from llm.training.shutdown import resume_message

    msg = resume_message("/x/last.ckpt", ["model=tiny", "ckpt_path=/old.ckpt"])
    assert "llm train ckpt_path=/x/last.ckpt model=tiny" in msg
    assert "/old.ckpt" not in msg


def test_resume_hint_names_the_running_entry_point(tmp_path: Path) -> None:
    """An interrupted finetune run says `llm finetune ...`, not `llm train`."""
    from llm.training.shutdown import resume_message

    train_cfg = _cfg(tmp_path, tmp_path / "out", 4)
    ft_cfg = compose("finetune", ["task=text", "init=a.ckpt", "data.path=b.txt"])
    commands = [c.callbacks.graceful_shutdown.command for c in (train_cfg, ft_cfg)]
    assert commands == ["llm train", "llm finetune"]
    msg = resume_message("/x/last.ckpt", ["task=text"], command=commands[1])
    assert msg.endswith("with: llm finetune ckpt_path=/x/last.ckpt task=text")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(15, 143), (2, 130)])  # SIGTERM, Ctrl-C
def test_signal_saves_checkpoint_and_exits_with_its_status(
    tmp_path: Path, signum: int, status: int
) -> None:
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    overrides = [
        *tiny_overrides(tmp_path, write_corpus(tmp_path)),
        "trainer.max_steps=100000",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"output_dir={out}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm", "train", *overrides],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.ckpt").is_file():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, output[-3000:]  # schedulers and `&&` see an interruption
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), output[-3000:]
    assert output.count("Resume with: ") == 1, output[-3000:]  # said once, at the end
    resume = next(line for line in output.splitlines() if line.startswith("Resume with: "))
    assert resume.startswith(f"Resume with: llm train ckpt_path={ckpt} model=tiny ")
    assert "trainer.max_steps=100000" in resume and " hydra.run.dir=" in resume  # its own run
    assert output.rstrip().endswith(resume)  # the last thing it says
    assert "Traceback" not in output
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 3 <= raw["global_step"] < 100000


@pytest.mark.slow
def test_a_run_folder_is_free_again_to_resume_in_once_its_run_ended(
    tmp_path: Path, llm_main: Any
) -> None:
    """The run.lock a run holds ends with it: `ckpt_path=<run>/checkpoints/last.ckpt
    hydra.run.dir=<run>` resumes in the same folder."""
    run = tmp_path / "run"
    args = [*tiny_overrides(tmp_path, write_corpus(tmp_path)), "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "callbacks.sample_text=null",
            "callbacks.attention=null", "~logger", f"hydra.run.dir={run}"]  # fmt: skip
    assert llm_main("train", *args, "trainer.max_steps=2") == 0
    last = run / "checkpoints" / "last.ckpt"
    assert llm_main("train", *args, "trainer.max_steps=4", f"ckpt_path={last}") == 0
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_a_signal_mid_accumulation_stops_after_the_optimizer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during the 2nd batch, seen after the 3rd (the first half of step 2): the stop
    waits for the 4th, so the checkpoint holds step 2 and loses no accumulated gradient."""
    from llm import faults
    from llm.cli.train import train

    faults._seen.clear()
    monkeypatch.setenv(faults.ENV, "fit.step@2:SIGTERM")
    out = tmp_path / "stopped"
    stopped = train(_cfg(tmp_path, out, 8, "trainer.accumulate_grad_batches=2"))
    assert stopped["shutdown"] is not None and stopped["trainer"].global_step == 2
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4
