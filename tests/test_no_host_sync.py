"""No step of any task reads a tensor on the host, except on logging steps: on a GPU each read
waits for the device. `scripts/gpu_check.py` holds the real step to that on CUDA (NoSyncCheck);
here the tasks' own step code is held to it on the CPU, by counting every host read it makes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import pytest
import torch
from helpers import ROOT
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from llm.finetuning.classify import ClassifierModule
from llm.training.module import GPTLitModule

MODEL = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 40}
OPTIM = {
    **OmegaConf.to_container(OmegaConf.load(ROOT / "conf/optim/adamw.yaml")),
    "warmup_steps": 0,
}
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def host_reads() -> Iterator[list[str]]:
    """Every host read of a tensor while the block runs (its method's name)."""
    seen: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return saved[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield seen
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _counted(cls: type) -> type:
    """``cls`` with the host reads of its step and its gradient clipping counted per step."""

    class Counted(cls):  # type: ignore[misc, valid-type]
        reads: dict[int, list[str]]

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            with host_reads() as seen:
                loss = super().training_step(batch, batch_idx)
            self.reads.setdefault(self.global_step, []).extend(seen)
            return loss

        def configure_gradient_clipping(self, *args: Any, **kwargs: Any) -> None:
            with host_reads() as seen:
                super().configure_gradient_clipping(*args, **kwargs)
            self.reads.setdefault(self.global_step, []).extend(seen)

    return Counted


def _pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DPO's batch: every chosen row, then every rejected row."""
    return {k: torch.cat([i[k][0:1] for i in items] + [i[k][1:2] for i in items]) for k in "xy"}


def _fit(module: Any, data: Any, tmp_path: Any, collate: Any = None) -> dict[int, list[str]]:
    from lightning.pytorch.loggers import TensorBoardLogger

    module.reads = {}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        log_every_n_steps=3,  # steps 0 and 3 log (and read the loss); 1, 2, 4, 5 must not
        gradient_clip_val=1.0,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
    )
    trainer.fit(module, DataLoader(data, batch_size=4, collate_fn=collate))
    return module.reads


@pytest.mark.parametrize("task", ["lm", "classifier", "dpo"])
def test_a_step_reads_nothing_on_the_host_but_on_logging_steps(task: str, tmp_path: Any) -> None:
    """(GRPO is not among them: its step samples and scores on the host, by nature.)"""
    torch.manual_seed(0)
    collate = None
    if task == "dpo":
        from llm.finetuning.preference import PreferenceModule

        module = _counted(PreferenceModule)(model=MODEL, optim=OPTIM)
        module.freeze_reference()
        x = torch.randint(0, 40, (24, 2, 16))
        y = torch.roll(x, -1, 2)
        y[:, :, :5] = -100  # the prompt
        data, collate = [{"x": a, "y": b} for a, b in zip(x, y, strict=True)], _pairs
    elif task == "lm":
        module = _counted(GPTLitModule)(model=MODEL, optim=OPTIM)
        x = torch.randint(0, 40, (24, 16))
        data = TensorDataset(x, torch.roll(x, -1, 1))
    else:
        module = _counted(ClassifierModule)(model=MODEL, optim=OPTIM, labels=["a", "b"])
        x = torch.randint(0, 40, (24, 16))
        data = TensorDataset(x, torch.full((24,), 16), torch.randint(0, 2, (24,)))
    reads = _fit(module, data, tmp_path, collate)
    assert sorted(reads) == [0, 1, 2, 3, 4, 5]
    assert {step: r for step, r in reads.items() if step % 3 and r} == {}  # silent steps
    assert reads[0] and reads[3]  # logging steps read the loss (and the gradient norm)
