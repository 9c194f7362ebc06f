"""How a run's checkpoints are written, so that ``checkpoints/last.ckpt`` is always the run's
newest state and no kill can leave it half written.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file beside its target,
  syncs it and renames it over the target. (Lightning's own save goes through fsspec, whose
  local "transaction" writes in the system temp folder and then copies the file into place:
  a kill during the copy leaves a truncated checkpoint.)
- :class:`RunCheckpoint` is Lightning's ModelCheckpoint with two rules of this project: the
  last state is written at every validation whatever the loss did (Lightning rewrites
  ``last.ckpt`` only when it also writes a top-k file) and always under the one name
  ``last.ckpt`` (no ``last-v1.ckpt`` after a resume); and the file names it restores from a
  checkpoint must lie in its own folder (it deletes the old best file it reads there, so a
  crafted checkpoint could otherwise delete any file the user can write).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from llm import faults
from llm.io import inside, remove_temp_files, temp_file_beside

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the target's folder, fsync, then ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        fd, tmp = temp_file_beside(path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                faults.point("checkpoint.write")  # written, not yet in place
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def in_folder(folder: str | os.PathLike[str] | None, path: Any) -> bool:
    """Whether ``path`` resolves to a file within ``folder`` (``..`` and links followed)."""
    if not folder or not path:
        return False
    return inside(path, folder) and Path(path).resolve() != Path(folder).resolve()


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is the newest state and whose restored paths are
    confined to ``dirpath`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("enable_version_counter", False)  # never last-v1.ckpt
        super().__init__(*args, **kwargs)
        self._last_saved_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            removed = remove_temp_files(self.dirpath, ".*.ckpt.*.tmp")  # a killed save's
            if removed:
                log.info("removed the partial checkpoints of a killed save: %s", ", ".join(removed))

    @property
    def last_path(self) -> Path:
        assert self.dirpath is not None
        return Path(self.dirpath) / LAST

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if not self.save_last:
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write ``last.ckpt`` now (GracefulShutdown's stop); returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        if self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore, minus every path outside ``dirpath`` (dropped, with a word).

        A checkpoint from another folder (a run resumed into a new one) restores nothing: its
        best score has no file here, and this folder's best is chosen among its own files.
        """
        stored = state_dict.get("dirpath")
        if self.dirpath and stored and Path(stored).resolve() != Path(self.dirpath).resolve():
            log.info("resuming into %s: the best checkpoint is chosen anew here", self.dirpath)
            return
        state = dict(state_dict)
        dropped = []
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(key) and not in_folder(self.dirpath, state[key]):
                dropped.append(str(state[key]))
                state[key] = ""
        best_k = state.get("best_k_models") or {}
        kept = {p: v for p, v in best_k.items() if in_folder(self.dirpath, p)}
        dropped += [str(p) for p in best_k if p not in kept]
        state["best_k_models"] = kept
        if state.get("kth_best_model_path") not in kept:
            state["kth_best_model_path"] = ""
        if dropped:
            log.warning(
                "ignoring checkpoint paths outside %s stored in the resumed checkpoint: %s",
                self.dirpath,
                ", ".join(sorted(set(dropped))),
            )
        state.setdefault("best_model_path", "")
        super().load_state_dict(state)
